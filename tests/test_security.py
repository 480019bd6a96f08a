"""Tenants that cannot see each other (issue 17), against real daemon processes on loopback with real
certificates (trustme) and real tokens files written by `flexcache tokens`:

- with auth on, tenant B's token cannot look up, fetch (stream or data port), delete, verify,
  overwrite or enumerate (Stats) anything of tenant A; no token is UNAUTHENTICATED; the client sees
  each refusal as a miss with one warning;
- a revoked token stops working within seconds, without a restart;
- TLS on the gRPC port and the data port, a rotated certificate served without a restart, mTLS with a
  certificate bound to a tenant;
- a data-port ticket is redeemed only by the caller it was issued to;
- each entry records its writer, and a namespace can accept hits from chosen writers only.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme

from flexcache.client import CacheClient
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from tests.conftest import NS, connect, metric

A = NS  # tenant "acme"
B = replace(NS, tenant="bolt")
DIM = 384


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def latent(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 3, 8, 8)).astype(np.float32)


def tokens(path: Path, *args: str) -> str:
    """`flexcache tokens ...` as an operator runs it; its stdout (a new token for `add`)."""
    done = subprocess.run([sys.executable, "-m", "flexcache.daemon.cli", "tokens", *args, "--file", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def token_id(path: Path, token: str) -> str:
    from flexcache.daemon import auth

    return auth.token_hash(token)[:auth.ID_CHARS]


@dataclass
class Secured:
    """A daemon with auth on (and TLS when `ca` is set), and the tokens it knows."""

    daemon: object
    file: Path
    token_a: str
    token_b: str
    admin: str
    ca: Path | None = None

    def client(self, namespace=A, token: str | None = "", **options: object) -> CacheClient:
        token = self.token_a if token == "" else token
        tls = {"tls_ca_file": str(self.ca)} if self.ca else {}
        return connect(self.daemon.target, namespace, token=token or None, **tls, **options)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    return tmp_path / "tokens.yaml"


def secured(start_daemon, tokens_file: Path, tls_dir: Path | None = None, **settings: object) -> Secured:
    token_a = tokens(tokens_file, "add", "--tenant", "acme")
    token_b = tokens(tokens_file, "add", "--tenant", "bolt")
    admin = tokens(tokens_file, "add", "--admin")
    ca_file = None
    if tls_dir is not None:
        ca_file = tls_dir / "ca.pem"
        settings.update(tls_cert_file=tls_dir / "server.pem", tls_key_file=tls_dir / "server.key")
    d = start_daemon(auth_tokens_file=tokens_file, trust_ca=ca_file, token=admin, **settings)
    return Secured(d, tokens_file, token_a, token_b, admin, ca_file)


def write_server_cert(folder: Path, ca: trustme.CA) -> None:
    folder.mkdir(exist_ok=True)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    # The key first, then the certificate: a daemon that reads between the two sees a mismatched
    # pair, keeps the old one and takes the new pair at its next check.
    cert.private_key_pem.write_to_path(str(folder / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tls"
    write_server_cert(folder, trustme.CA())
    return folder


def code_of(client: CacheClient) -> grpc.StatusCode | None:
    error = client.last_error
    return error.code() if isinstance(error, grpc.RpcError) else None


def test_a_tenant_cannot_touch_another_tenants_entries(start_daemon, tokens_file: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    s = secured(start_daemon, tokens_file)
    with s.client() as owner:
        eid = owner.put("a secret prompt of acme", latent(1), vec(1), seed=1)
        assert eid is not None
        assert owner.lookup(vec(1)).best is not None
        assert owner.fetch(eid) is not None

    # B's token naming A's tenant: every call is refused, and a miss for B's worker.
    with caplog.at_level(logging.WARNING, logger="flexcache.client"), s.client(A, token=s.token_b) as thief:
        assert thief.lookup(vec(1)) is None
        assert code_of(thief) == grpc.StatusCode.PERMISSION_DENIED
        assert thief.fetch(eid) is None
        assert thief.delete(eid) is None
        assert thief.put("a poisoned latent under acme's prompt", latent(2), vec(1), seed=2) is None
        assert thief.get(vec(1)) is None
    refusals = [r for r in caplog.records if "refused this client's credential" in r.getMessage()]
    assert len(refusals) == 1, "a refused credential is told once"

    # The same over raw gRPC: Verify, the stream Fetch and FetchDirect too.
    metadata = (("authorization", f"Bearer {s.token_b}"),)
    with grpc.insecure_channel(s.daemon.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        for call, request in ((stub.Verify, pb.VerifyRequest(namespace=A.to_proto(), entry_id=eid)),
                              (stub.FetchDirect, pb.FetchRequest(namespace=A.to_proto(), entry_id=eid)),
                              (stub.Delete, pb.DeleteRequest(namespace=A.to_proto(), entry_id=eid))):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=5, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "tenant 'bolt'" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Fetch(pb.FetchRequest(namespace=A.to_proto(), entry_id=eid), timeout=5, metadata=metadata))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # B sees only its own namespaces and totals; the admin sees everyone's.
    with s.client(B, token=s.token_b) as bolt:
        assert bolt.put("bolt's own prompt", latent(3), vec(3), seed=3) is not None
        stats = bolt.stats()
        assert [ns.name.split("/")[0] for ns in stats.namespaces] == ["bolt"]
        assert stats.entries == 1
    admin_stats = s.daemon.stats()
    assert sorted(ns.name.split("/")[0] for ns in admin_stats.namespaces) == ["acme", "bolt"]
    assert admin_stats.entries == 2

    # A's entry is intact, and was never overwritten.
    with s.client() as owner:
        result = owner.lookup(vec(1))
        assert result.best is not None and result.candidates[0].entry_id == eid
        assert owner.fetch(eid) is not None
    assert metric(s.daemon, "flexcache_calls_refused_total", reason="permission_denied") >= 9


def test_no_token_or_an_unknown_one_is_unauthenticated(start_daemon, tokens_file: Path) -> None:
    s = secured(start_daemon, tokens_file)
    for token in (None, "fct_not-a-token-this-daemon-issued"):
        with s.client(token=token) as c:
            assert c.lookup(vec(1)) is None
            assert code_of(c) == grpc.StatusCode.UNAUTHENTICATED
            assert c.put("p", latent(1), vec(1)) is None
    # Health answers without a credential: probes and launchers need no token.
    s.daemon.wait_serving(5)
    assert metric(s.daemon, "flexcache_calls_refused_total", reason="unauthenticated") >= 4


def test_a_revoked_token_stops_working_within_seconds(start_daemon, tokens_file: Path) -> None:
    s = secured(start_daemon, tokens_file)
    with s.client() as c:
        assert c.put("prompt", latent(1), vec(1), seed=1) is not None
        tokens(tokens_file, "revoke", token_id(tokens_file, s.token_a))
        revoked_at = time.monotonic()
        while c.lookup(vec(1)) is not None:
            assert time.monotonic() - revoked_at < 5, "the revoked token still works after 5 s"
            time.sleep(0.1)
        assert code_of(c) == grpc.StatusCode.UNAUTHENTICATED
    with s.client(B, token=s.token_b) as other:  # the others' tokens are unaffected
        assert other.lookup(vec(1)) is not None


def test_tls_serves_both_ports_and_a_rotated_certificate_without_a_restart(start_daemon, tokens_file: Path,
                                                                            tls_dir: Path) -> None:
    s = secured(start_daemon, tokens_file, tls_dir)
    with s.client() as c:
        eid = c.put("prompt", latent(1), vec(1), seed=1)
        assert eid is not None
        sent = metric(s.daemon, "flexcache_data_port_transfers_total", outcome="sent")
        fetched = c.fetch(eid)
        assert fetched is not None
        deadline = time.monotonic() + 5  # counted once the daemon's send returns, which may be after ours
        while metric(s.daemon, "flexcache_data_port_transfers_total", outcome="sent") != sent + 1:
            assert time.monotonic() < deadline, "the fetch went over the TLS data port"
            time.sleep(0.05)
    with connect(s.daemon.target, A, token=s.token_a, timeout_s=2.0) as plain:  # no TLS: no answer
        assert plain.lookup(vec(1)) is None
    done = subprocess.run([sys.executable, "-m", "flexcache.daemon.cli", "stats", "--target", s.daemon.target,
                           "--tls-ca-file", str(s.ca), "--json"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FLEXCACHE_CLIENT_TOKEN": s.token_b + "\n"})
    assert done.returncode == 0, done.stderr
    assert '"entries": "0"' in done.stdout, "tenant bolt's Stats over TLS shows none of acme's entries"

    old_ca = s.ca.read_bytes()
    write_server_cert(tls_dir, trustme.CA())  # cert-manager rotates: a new CA and certificate
    assert s.ca.read_bytes() != old_ca
    deadline = time.monotonic() + 10
    while True:
        with s.client() as fresh:  # trusts only the new CA
            if fresh.lookup(vec(1)) is not None:
                assert fresh.fetch(eid) is not None  # the data port serves the new certificate too
                break
        assert time.monotonic() < deadline, "the rotated certificate is not served within 10 s"
        time.sleep(0.2)
    assert s.daemon.running


def test_mtls_binds_a_client_certificate_to_its_tenant(start_daemon, tokens_file: Path, tls_dir: Path,
                                                       tmp_path: Path) -> None:
    client_ca = trustme.CA()
    client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    worker = client_ca.issue_cert("worker-1.acme", common_name="worker-1.acme")
    worker.private_key_pem.write_to_path(str(tmp_path / "worker.key"))
    worker.cert_chain_pems[0].write_to_path(str(tmp_path / "worker.pem"))
    tokens(tokens_file, "add", "--tenant", "acme", "--certificate", "worker-1.acme")
    s = secured(start_daemon, tokens_file, tls_dir, tls_client_ca_file=tmp_path / "client-ca.pem",
                client_cert=tmp_path / "worker.pem", client_key=tmp_path / "worker.key")
    with s.client(token=None, tls_cert_file=str(tmp_path / "worker.pem"),
                  tls_key_file=str(tmp_path / "worker.key")) as c:
        eid = c.put("prompt", latent(1), vec(1), seed=1)
        assert eid is not None
        result = c.lookup(vec(1))
        assert result.candidates[0].writer == "cert:worker-1.acme"
        assert c.fetch(eid) is not None
    with s.client(B, token=None, tls_cert_file=str(tmp_path / "worker.pem"),
                  tls_key_file=str(tmp_path / "worker.key")) as c:
        assert c.lookup(vec(1)) is None
        assert code_of(c) == grpc.StatusCode.PERMISSION_DENIED
    with s.client(timeout_s=2.0) as no_cert:  # a token, but no certificate: the handshake fails
        assert no_cert.lookup(vec(1)) is None
        assert code_of(no_cert) == grpc.StatusCode.UNAVAILABLE


def test_a_ticket_is_redeemed_only_by_the_caller_it_was_issued_to(start_daemon, tokens_file: Path) -> None:
    from flexcache.v1.wire import data_hello as hello

    s = secured(start_daemon, tokens_file)
    with s.client() as owner:
        eid = owner.put("prompt", latent(1), vec(1), seed=1)
        size = owner.fetch(eid).blob.size
    with grpc.insecure_channel(s.daemon.target) as channel:
        ticket = pb_grpc.CacheServiceStub(channel).FetchDirect(
            pb.FetchRequest(namespace=A.to_proto(), entry_id=eid), timeout=5,
            metadata=(("authorization", f"Bearer {s.token_a}"),))

    def redeem(token: str | None) -> bytes:
        with socket.create_connection(("127.0.0.1", ticket.data_port), timeout=5) as conn:
            conn.sendall(hello(token) + ticket.ticket)
            data = b""
            while len(data) < size:
                try:
                    part = conn.recv(size - len(data))
                except ConnectionResetError:  # closed with the ticket unread: refused
                    break
                if not part:
                    break
                data += part
            return data

    assert redeem(s.token_b) == b"", "another tenant's connection got the blob"
    assert redeem(None) == b"", "a connection without a credential got the blob"
    assert len(redeem(s.token_a)) == size, "the owner can still redeem its ticket"


def test_entries_record_their_writer_and_a_namespace_can_trust_chosen_writers(start_daemon,
                                                                             tokens_file: Path) -> None:
    uploads = tokens(tokens_file, "add", "--tenant", "acme")  # acme's end users' uploads
    s = secured(start_daemon, tokens_file)
    worker_id = f"token:{token_id(tokens_file, s.token_a)}"
    with s.client() as worker:
        good = worker.put("a red fox in the snow", latent(1), vec(1), seed=1)
    with s.client(token=uploads) as user:
        poisoned = user.put("a red fox in the snow", latent(2), vec(1), seed=1)
    assert good and poisoned and good != poisoned, "the same content from two writers is two entries"
    with s.client() as anyone:
        writers = {c.entry_id: c.writer for c in anyone.lookup(vec(1), top_k=4).candidates}
        assert writers == {good: worker_id, poisoned: f"token:{token_id(tokens_file, uploads)}"}
    with s.client(replace(A, writers=(worker_id,))) as trusting:
        result = trusting.lookup(vec(1), top_k=4)
        assert [c.entry_id for c in result.candidates] == [good]
    with s.client(replace(A, writers=("token:nobody",))) as nobody:
        assert not nobody.lookup(vec(1)).best is not None



def test_a_daemon_beyond_loopback_without_tls_or_tokens_starts_with_a_loud_warning(start_daemon, tokens_file: Path,
                                                                                    tls_dir: Path) -> None:
    exposed = start_daemon("exposed", listen="0.0.0.0:0")  # the launcher still reaches it on 127.0.0.1
    log = exposed.log.read_text()
    assert "ERROR" in log and "SECURITY: listening on 0.0.0.0:0 without TLS" in log
    assert "without auth (auth_tokens_file)" in log
    with connect(exposed.target) as c:  # it serves: a warning, not a refusal
        assert c.put("prompt", latent(1), vec(1)) is not None
    s = secured(start_daemon, tokens_file, tls_dir, listen="0.0.0.0:0")
    assert "SECURITY" not in s.daemon.log.read_text()
