"""TLS with certificates that rotate (daemon/tls.py, client/tls.py), with real certificates made by
trustme, a real gRPC server and a real TLS data-port-like socket server:

- gRPC calls the certificate fetcher before every new connection (what rotation relies on);
- a rotated certificate is served without a restart: a client that trusts only the new CA connects;
- a half-written pair (a new certificate, the old key) keeps the old certificate, one warning;
- with a client CA, a client without a certificate (or with one another CA signed) is refused, and
  the server reads a verified client's subject CN over gRPC and over the data port;
- unusable files at startup are one sentence; the settings that go together are checked;
- the client's TLS helpers import neither the daemon nor `cryptography`.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme

from flexcache.client.tls import ClientTLS, ClientTLSError
from flexcache.daemon import config as cfg
from flexcache.daemon import tls

WHO = "/flexcache.test.Who/Who"
HOST = "127.0.0.1"


@dataclass
class Files:
    cert: Path
    key: Path
    client_ca: Path
    ca: Path  # what clients trust

    def write(self, ca: trustme.CA, *, key: bool = True, cert: bool = True) -> None:
        """Write a new server pair that `ca` signed (atomically, each file as cert-manager's Secret
        volume swaps it), and that CA as the clients' trust file."""
        leaf = ca.issue_cert(HOST, "localhost")
        if cert:
            _replace(self.cert, b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        if key:
            _replace(self.key, leaf.private_key_pem.bytes())
        _replace(self.ca, ca.cert_pem.bytes())


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    out = Files(tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "client-ca.crt", tmp_path / "ca.crt")
    out.write(trustme.CA())
    return out


def _who(request: bytes, context: grpc.ServicerContext) -> bytes:
    return (tls.grpc_peer_common_name(context) or "-").encode()


@pytest.fixture
def grpc_server() -> Iterator:
    """Factory: grpc_server(credentials) -> port of a started server answering WHO with the caller's CN."""
    servers: list[grpc.Server] = []

    def start(credentials: grpc.ServerCredentials) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "flexcache.test.Who", {"Who": grpc.unary_unary_rpc_method_handler(_who)})])
        port = server.add_secure_port(f"{HOST}:0", credentials)
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(None)


def call(port: int, client: ClientTLS) -> str:
    """One WHO call on a new channel of its own (a new connection, never a pooled one)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.secure_channel(f"{HOST}:{port}", client.channel_credentials(), options=options) as channel:
        return channel.unary_unary(WHO)(b"", timeout=5).decode()


def refused(port: int, client: ClientTLS) -> bool:
    try:
        call(port, client)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False


def test_grpc_calls_the_fetcher_on_every_new_connection(files: Files, grpc_server) -> None:
    certificates = tls.ServerCertificates(str(files.cert), str(files.key))
    calls = []
    fetch = certificates._fetch

    def counting() -> grpc.ServerCertificateConfiguration | None:
        calls.append(1)
        return fetch()

    certificates._fetch = counting  # type: ignore[method-assign]
    port = grpc_server(certificates.grpc_credentials())
    client = ClientTLS(ca_file=str(files.ca))
    for n in range(1, 4):
        assert call(port, client) == "-"
        assert len(calls) >= n
    with grpc.secure_channel(f"{HOST}:{port}", client.channel_credentials()) as channel:
        stub = channel.unary_unary(WHO)
        stub(b"", timeout=5)
        before = len(calls)
        for _ in range(3):
            stub(b"", timeout=5)
        assert len(calls) == before  # per connection, not per call


def test_a_rotated_certificate_is_served_without_a_restart(files: Files, grpc_server) -> None:
    certificates = tls.ServerCertificates(str(files.cert), str(files.key), reload_s=0.2)
    port = grpc_server(certificates.grpc_credentials())
    old = ClientTLS(ca_file=str(files.ca))
    old_credentials = old.channel_credentials()
    assert call(port, old) == "-"
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.secure_channel(f"{HOST}:{port}", old_credentials, options=options) as kept:
        kept.unary_unary(WHO)(b"", timeout=5)
        new_ca = trustme.CA()
        files.write(new_ca)
        new = ClientTLS(ca_file=str(files.ca))  # trusts only the new CA
        rotated_at = time.monotonic()
        while True:
            try:
                assert call(port, new) == "-"
                break
            except grpc.RpcError:
                assert time.monotonic() - rotated_at < 5, "the new certificate was never served"
                time.sleep(0.1)
        kept.unary_unary(WHO)(b"", timeout=5)  # a connection made before the rotation goes on
    assert certificates.current().generation == 2
    with grpc.secure_channel(f"{HOST}:{port}", old_credentials, options=options) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(WHO)(b"", timeout=5)  # a new connection gets the new certificate
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_half_written_pair_keeps_the_old_certificate(files: Files, grpc_server,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    certificates = tls.ServerCertificates(str(files.cert), str(files.key), reload_s=3600)
    port = grpc_server(certificates.grpc_credentials())
    old_ca = files.ca.with_name("old-ca.crt")
    old_ca.write_bytes(files.ca.read_bytes())
    old = ClientTLS(ca_file=str(old_ca))
    caplog.set_level(logging.WARNING, logger="flexcache.daemon.tls")
    new_ca = trustme.CA()
    files.write(new_ca, key=False)  # the certificate is new, the key still the old one
    for _ in range(3):
        assert not certificates.check_now()
        assert call(port, old) == "-"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not match" in warnings[0].getMessage() and warnings[0].exc_info is None
    files.key.unlink()
    assert not certificates.check_now() and call(port, old) == "-"  # a missing key: still the old pair
    files.write(new_ca)
    assert certificates.check_now()
    assert call(port, ClientTLS(ca_file=str(files.ca))) == "-"
    assert refused(port, old)


def test_mtls_refuses_clients_without_a_certificate_the_client_ca_signed(files: Files, grpc_server,
                                                                          tmp_path: Path) -> None:
    client_ca, stranger_ca = trustme.CA(), trustme.CA()
    files.client_ca.write_bytes(client_ca.cert_pem.bytes())
    certificates = tls.ServerCertificates(str(files.cert), str(files.key), str(files.client_ca))
    assert certificates.client_auth
    port = grpc_server(certificates.grpc_credentials())
    worker = _client_pair(client_ca, "worker-1.acme", tmp_path / "worker")
    stranger = _client_pair(stranger_ca, "worker-1.acme", tmp_path / "stranger")
    assert call(port, ClientTLS(str(files.ca), *worker)) == "worker-1.acme"
    assert refused(port, ClientTLS(ca_file=str(files.ca)))
    assert refused(port, ClientTLS(str(files.ca), *stranger))


def _client_pair(ca: trustme.CA, cn: str, prefix: Path) -> tuple[str, str]:
    leaf = ca.issue_cert(f"{cn}.example", common_name=cn)
    cert, key = prefix.with_suffix(".crt"), prefix.with_suffix(".key")
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return str(cert), str(key)


def test_the_cn_of_a_call_without_a_client_certificate_is_none(files: Files, grpc_server) -> None:
    port = grpc_server(tls.ServerCertificates(str(files.cert), str(files.key)).grpc_credentials())
    assert call(port, ClientTLS(ca_file=str(files.ca))) == "-"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "flexcache.test.Who", {"Who": grpc.unary_unary_rpc_method_handler(_who)})])
    plain = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        with grpc.insecure_channel(f"{HOST}:{plain}") as channel:
            assert channel.unary_unary(WHO)(b"", timeout=5) == b"-"
    finally:
        server.stop(None)


class DataPort:
    """A TLS socket server like the data port: each accepted connection is wrapped with the context
    `ssl_context()` answers then, and is answered with the client's CN (or '-')."""

    def __init__(self, certificates: tls.ServerCertificates) -> None:
        self.certificates = certificates
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5)
            try:
                with self.certificates.ssl_context().wrap_socket(raw, server_side=True) as conn:
                    conn.sendall((tls.peer_common_name(conn) or "-").encode())
            except (ssl.SSLError, OSError):
                raw.close()

    def ask(self, client: ClientTLS) -> str:
        with socket.create_connection((HOST, self.port), timeout=5) as raw, \
                client.data_port_context().wrap_socket(raw, server_hostname=HOST) as conn:
            return conn.recv(256).decode()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.listener.close()


def test_the_data_port_context_rotates_and_reads_the_client_cn(files: Files, tmp_path: Path) -> None:
    client_ca = trustme.CA()
    files.client_ca.write_bytes(client_ca.cert_pem.bytes())
    certificates = tls.ServerCertificates(str(files.cert), str(files.key), str(files.client_ca), reload_s=3600)
    port = DataPort(certificates)
    try:
        worker = _client_pair(client_ca, "worker-1.acme", tmp_path / "worker")
        old = ClientTLS(str(files.ca), *worker)
        assert port.ask(old) == "worker-1.acme"
        with pytest.raises((ssl.SSLError, OSError)):
            port.ask(ClientTLS(ca_file=str(files.ca)))  # no client certificate: the handshake fails
        first = certificates.ssl_context()
        old_context = old.data_port_context()
        assert old.data_port_context() is old_context and certificates.ssl_context() is first  # until a change
        files.write(trustme.CA())
        assert certificates.check_now() and certificates.ssl_context() is not first
        new = ClientTLS(str(files.ca), *worker)
        assert port.ask(new) == "worker-1.acme"
        assert old.data_port_context() is not old_context  # the client's context follows its files too
        assert port.ask(old) == "worker-1.acme"
        with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection((HOST, port.port), timeout=5) as raw:
            old_context.wrap_socket(raw, server_hostname=HOST)
    finally:
        port.close()


def test_peer_common_name_without_a_verified_certificate_is_none(files: Files) -> None:
    port = DataPort(tls.ServerCertificates(str(files.cert), str(files.key)))
    try:
        assert port.ask(ClientTLS(ca_file=str(files.ca))) == "-"
    finally:
        port.close()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert tls.peer_common_name(context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=HOST)) is None


def test_unusable_files_at_startup_are_one_sentence(files: Files, tmp_path: Path) -> None:
    other = trustme.CA().issue_cert(HOST)
    stray_key = tmp_path / "other.key"
    stray_key.write_bytes(other.private_key_pem.bytes())
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    cases = [
        ((files.cert, stray_key, ""), f"the key {stray_key} does not match the certificate {files.cert}"),
        ((tmp_path / "missing.crt", files.key, ""), "cannot read the certificate"),
        ((garbage, files.key, ""), "is not usable PEM"),
        ((files.cert, files.key, garbage), f"the client CA {garbage} holds no usable PEM certificate"),
        ((files.cert, files.key, empty), f"the client CA {empty} is empty"),
    ]
    for (cert, key, ca), sentence in cases:
        with pytest.raises(tls.TLSConfigError) as caught:
            tls.ServerCertificates(str(cert), str(key), str(ca))
        assert sentence in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(tls.TLSConfigError, match="needs both"):
        tls.ServerCertificates(str(files.cert), "")


def test_an_encrypted_key_is_refused_without_a_prompt(files: Files, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization  # trustme's dependency; tests only

    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    result = subprocess.run(
        [sys.executable, "-c", "from flexcache.daemon import tls; import sys\n"
         f"tls.ServerCertificates({str(files.cert)!r}, {str(encrypted)!r})"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and "TLSConfigError" in result.stderr and "encrypted" in result.stderr


def test_client_tls_settings() -> None:
    with pytest.raises(ClientTLSError, match="go together"):
        ClientTLS(cert_file="client.crt")
    with pytest.raises(ClientTLSError, match=r"cannot read the TLS CA file /nonexistent/ca\.crt"):
        ClientTLS(ca_file="/nonexistent/ca.crt").channel_credentials()
    assert not ClientTLS().client_certificate
    assert isinstance(ClientTLS().channel_credentials(), grpc.ChannelCredentials)  # the system's CAs


@pytest.mark.parametrize(("values", "message"), [
    ({"tls_cert_file": "c.pem"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_key_file": "k.pem"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_client_ca_file": "ca.pem"}, "tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file"),
])
def test_tls_settings_that_go_together(values: dict, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.resolve(values, env={})
    assert message in str(caught.value)


def test_tls_settings_resolve() -> None:
    config = cfg.resolve({"tls_cert_file": "c.pem", "tls_key_file": "k.pem", "tls_client_ca_file": "ca.pem",
                          "auth_tokens_file": "tokens.yaml"}, env={})
    assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file, config.auth_tokens_file) == (
        "c.pem", "k.pem", "ca.pem", "tokens.yaml")
    assert cfg.resolve(env={}).tls_cert_file == ""


def test_the_client_tls_helpers_import_neither_the_daemon_nor_cryptography() -> None:
    code = ("import sys, flexcache.client.tls\n"
            "print(' '.join(m for m in ('flexcache.daemon', 'cryptography', 'yaml') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
