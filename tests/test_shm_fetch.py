"""Same-host fetches through the shared-memory folder (daemon/shm.py, client/shm.py), and the
fallbacks to the stream: a client the daemon cannot reach, a handover the client cannot read."""

from __future__ import annotations

import os
import threading
import time
import uuid

import grpc
import numpy as np
import pytest

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from tests.conftest import NS, connect
from tests.vectors import unit


def probes(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("probe-"))


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_round_trip_through_shared_memory(daemon, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    latents = [torch.randn(4, 3, 40, 48).to(getattr(torch, dtype)), torch.randn(2, 3, 8, 8).to(getattr(torch, dtype))]
    with connect(daemon.target, shm_dir=daemon.shm_dir) as c:
        entries = [c.put(f"prompt {i}", latent, unit(i)) for i, latent in enumerate(latents)]
        for _ in range(2):  # the same probe file serves fetch after fetch, larger and smaller blobs
            for entry, latent in zip(entries, latents, strict=True):
                assert torch.equal(c.fetch(entry).latent(as_torch=True), latent)
        assert c.last_error is None
        assert probes(daemon.shm_dir) == [c.shm_probe]
    assert probes(daemon.shm_dir) == []  # close() removed its probe


def fetch_messages(target: str, entry: str, probe: str) -> list[pb.FetchResponse]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        return list(stub.Fetch(pb.FetchRequest(namespace=NS.to_proto(), entry_id=entry, shm_probe=probe), timeout=10))


def test_daemon_writes_into_the_probe_and_sends_no_chunks(daemon, tmp_path) -> None:
    data = os.urandom((1 << 20) + 123)
    with connect(daemon.target) as c:
        entry = c.put_blob("p", data, pb.BlobInfo(codec="raw", dtype="uint8", shape=[len(data)]), unit(2))
    probe = daemon.shm_dir / f"probe-{uuid.uuid4().hex}"
    probe.write_bytes(b"z" * (3 << 20))  # left over from a larger blob: truncated to this one
    messages = fetch_messages(daemon.target, entry, probe.name)
    assert len(messages) == 1 and messages[0].header.in_shm
    assert probe.read_bytes() == data

    # A probe the daemon cannot see, or one that is not a plain file, gets the ordinary stream.
    victim = tmp_path / "not-for-the-daemon"
    victim.write_bytes(b"keep")
    link = daemon.shm_dir / f"probe-{uuid.uuid4().hex}"
    link.symlink_to(victim)
    for name in (f"probe-{uuid.uuid4().hex}", link.name):
        messages = fetch_messages(daemon.target, entry, name)
        assert not messages[0].header.in_shm
        assert b"".join(m.chunk for m in messages[1:]) == data
    assert victim.read_bytes() == b"keep"


def test_client_in_another_folder_streams(daemon, tmp_path) -> None:
    latent = np.random.default_rng(3).standard_normal((4, 8, 32, 32)).astype(np.float16)
    with connect(daemon.target, shm_dir=tmp_path / "elsewhere") as c:
        entry = c.put("p", latent, unit(3))
        np.testing.assert_array_equal(c.fetch(entry).latent(), latent)
        assert c.last_error is None and c.shm_probe is not None
    assert probes(daemon.shm_dir) == []


def test_unreadable_handover_falls_back_to_the_stream(daemon, tmp_path, caplog) -> None:
    """The daemon sees a probe of the client's name, but the client reads another folder (two different
    tmpfs mounts, say): the handover is not where the client looks, so the fetch is retried as a
    stream and the client gives shared memory up."""
    latent = np.random.default_rng(4).standard_normal((4, 8, 32, 32)).astype(np.float32)
    with connect(daemon.target, shm_dir=tmp_path / "client-view") as c:
        entry = c.put("p", latent, unit(4))
        (daemon.shm_dir / c.shm_probe).touch()
        np.testing.assert_array_equal(c.fetch(entry).latent(), latent)
        assert "shared-memory fetch" in caplog.text
        assert c.shm_probe is None  # streams from now on
        np.testing.assert_array_equal(c.fetch(entry).latent(), latent)


def test_concurrent_fetches_share_one_client(daemon) -> None:
    """One fetch at a time uses the probe file; the others stream. All get their own blob."""
    latents = [np.random.default_rng(i).standard_normal((4, 8, 64, 64)).astype(np.float32) for i in range(4)]
    with connect(daemon.target, shm_dir=daemon.shm_dir) as c:
        entries = [c.put(f"p{i}", latent, unit(i)) for i, latent in enumerate(latents)]
        failures: list[str] = []

        def worker(i: int) -> None:
            for _ in range(10):
                got = c.fetch(entries[i])
                if got is None or not np.array_equal(got.latent(), latents[i]):
                    failures.append(f"worker {i}: {c.last_error}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []


def test_idle_probes_are_swept_at_startup(daemon) -> None:
    daemon.terminate()
    old, fresh = (daemon.shm_dir / f"probe-{uuid.uuid4().hex}" for _ in range(2))
    other = daemon.shm_dir / "not-ours"
    for path in (old, fresh, other):
        path.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for path in (old, other):
        os.utime(path, (an_hour_ago, an_hour_ago))
    daemon.start()
    assert not old.exists()
    assert fresh.exists() and other.exists()  # a live client's probe, and names that are not ours
