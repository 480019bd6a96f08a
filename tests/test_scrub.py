"""Damaged files: the background scrubber finds a damaged blob and deletes its entry, `flexcache verify`
lists damage in a stopped data folder, and a damaged write-ahead log's lost puts are counted at startup."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from flexcache.daemon.process import DaemonProcess
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from tests.conftest import NS, connect, metric
from tests.vectors import unit


def put_raw(daemon: DaemonProcess, data: bytes, prompt: str, seed: int) -> str:
    with connect(daemon.target, max_rel_error=None) as c:
        entry_id = c.put(prompt, np.frombuffer(data, dtype=np.uint8), unit(seed))
    assert entry_id is not None
    return entry_id


def verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flexcache.daemon.cli", "verify", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120)


def damage_blob(store: Path, blob: bytes) -> None:
    """Flip 16 bytes in the middle of `blob` where a segment file holds it."""
    probe = blob[len(blob) // 2:len(blob) // 2 + 64]
    hits = [(f, f.read_bytes().find(probe)) for f in (store / "segments").glob("*.seg")]
    ((blob_file, at),) = [(f, at) for f, at in hits if at >= 0]
    with blob_file.open("r+b") as f:
        f.seek(at + 8)
        original = f.read(16)
        f.seek(at + 8)
        f.write(bytes(b ^ 0xFF for b in original))


def test_scrubber_deletes_a_damaged_entry_and_verify_lists_it(start_daemon) -> None:
    daemon = start_daemon(scrub_bytes_per_second=0)
    good, bad = os.urandom(3 << 20), os.urandom(3 << 20)
    good_id, bad_id = put_raw(daemon, good, "good", 1), put_raw(daemon, bad, "bad", 2)
    assert daemon.terminate() == 0
    assert verify(daemon.data_dir).returncode == 0  # a clean folder
    damage_blob(daemon.data_dir / "store", bad)

    found = verify(daemon.data_dir)
    assert found.returncode == 1, found.stdout + found.stderr
    assert bad_id in found.stdout and good_id not in found.stdout
    assert "verified 2 entries" in found.stdout and "1 damaged" in found.stdout

    daemon.settings.update(scrub_bytes_per_second="64MiB", scrub_pause_seconds=0)
    daemon.start()
    deadline = time.monotonic() + 15
    while metric(daemon, "flexcache_scrub_passes_total") < 1:
        assert time.monotonic() < deadline, "the scrubber did not finish a pass"
        time.sleep(0.1)
    assert metric(daemon, "flexcache_corrupt_entries_total", found_by="scrubber") == 1
    assert metric(daemon, "flexcache_scrubbed_bytes_total") >= 3 << 20  # the good entry, whole
    with connect(daemon.target, max_rel_error=None) as c:
        assert c.stats().entries == 1
        assert c.fetch(bad_id) is None and c.lookup(unit(2)).best is None  # gone from the index too
        assert c.lookup(unit(1)).best.entry_id == good_id
        assert bytes(c.fetch(good_id).data) == good
    assert "found by the scrubber" in daemon.log.read_text()

    # Refused while a daemon holds the folder, in one sentence; clean once the daemon has deleted it.
    held = verify(daemon.data_dir)
    assert held.returncode == 2 and "in use by a running daemon" in held.stderr
    assert len(held.stderr.strip().splitlines()) == 1
    assert daemon.terminate() == 0
    clean = verify(daemon.data_dir)
    assert clean.returncode == 0 and "0 damaged" in clean.stdout, clean.stdout + clean.stderr


def test_verify_reports_a_folder_it_cannot_check(tmp_path: Path) -> None:
    missing = verify(tmp_path / "nothing")
    assert missing.returncode == 2 and "holds no store" in missing.stderr
    assert not (tmp_path / "nothing").exists()


def test_client_verify_still_counts_as_client(start_daemon) -> None:
    daemon = start_daemon(scrub_bytes_per_second=0)
    data = os.urandom(2 << 20)
    entry_id = put_raw(daemon, data, "client", 3)
    daemon.terminate()
    damage_blob(daemon.data_dir / "store", data)
    daemon.start()
    with grpc.insecure_channel(daemon.target) as channel:
        answer = pb_grpc.CacheServiceStub(channel).Verify(pb.VerifyRequest(namespace=NS.to_proto(), entry_id=entry_id),
                                                          timeout=10)
    assert answer.deleted
    assert metric(daemon, "flexcache_corrupt_entries_total", found_by="client") == 1
    assert metric(daemon, "flexcache_corrupt_entries_total", found_by="scrubber") == 0


def latent(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, 64 * 1024, dtype=np.uint8)


def wal_files(daemon: DaemonProcess) -> list[Path]:
    return sorted((daemon.data_dir / "store").glob("*.log"), key=lambda p: p.stat().st_size)


def test_damaged_wal_reports_lost_entries_at_startup(start_daemon) -> None:
    daemon = start_daemon(scrub_bytes_per_second=0)  # fsync off (the default): the log is in the page cache
    with connect(daemon.target) as c:
        ids = [c.put(f"prompt {i}", latent(i), unit(i)) for i in range(10)]
    assert all(ids)
    daemon.kill()  # SIGKILL: nothing flushed, the acknowledged puts' batches are in the write-ahead log alone
    wal = wal_files(daemon)[-1]
    size = wal.stat().st_size
    assert size > 10 * 1000  # ten batches of a record, vectors and a Location (the blobs are in segments)
    os.truncate(wal, size // 2)  # about half of the acknowledged puts are gone

    offline = verify(daemon.data_dir)
    assert offline.returncode == 1 and "lost" in offline.stdout, offline.stdout + offline.stderr
    daemon.start()
    with connect(daemon.target) as c:
        entries = c.stats().entries
    lost = metric(daemon, "flexcache_lost_entries_total")
    assert 0 < entries < 10 and lost == 10 - entries
    assert f"startup: {10 - entries} acknowledged puts are missing" in daemon.log.read_text()
    assert f"lost {10 - entries} acknowledged puts" in offline.stdout
    daemon.terminate()
    daemon.start()  # reported once: this start lost nothing
    assert metric(daemon, "flexcache_lost_entries_total") == 0


def test_corrupt_record_in_the_wal_middle_reports_what_recovery_dropped(start_daemon) -> None:
    daemon = start_daemon(scrub_bytes_per_second=0)
    with connect(daemon.target) as c:
        assert all(c.put(f"prompt {i}", latent(i), unit(i)) for i in range(10))
    daemon.kill()
    wal = wal_files(daemon)[-1]
    with wal.open("r+b") as f:  # a scribbled byte in the fourth put's record: its checksum fails
        f.seek(wal.stat().st_size * 4 // 10)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))
    daemon.start()
    with connect(daemon.target) as c:
        entries = c.stats().entries
    assert entries < 10
    assert metric(daemon, "flexcache_lost_entries_total") == 10 - entries


def test_scrubber_keeps_to_its_rate(tmp_path: Path) -> None:
    """In-process: a pass over 6 MiB of blobs at 4 MiB/s takes about 1.5 s, not the milliseconds a
    read at full speed takes."""
    from flexcache.daemon import build
    from flexcache.daemon import config as cfg

    cache = build.open_cache(cfg.resolve(env={}, flags={"data_dir": str(tmp_path / "data"),
                                                        "scrub_bytes_per_second": "0"}))
    try:
        for i in range(3):
            data = os.urandom(2 << 20)
            header = pb.PutHeader(namespace=NS.to_proto(), prompt=f"p{i}")
            header.vectors.full.extend(unit(i).tolist())
            header.blob.codec, header.blob.dtype, header.blob.size = "raw", "uint8", len(data)
            header.blob.shape.append(len(data))
            header.blob.sha256 = hashlib.sha256(data).digest()
            session = cache.begin_put(header)
            for at in range(0, len(data), 1 << 20):
                session.add_chunk(data[at:at + (1 << 20)])
            session.finish()
        cache.start_scrubber(4 << 20, pause_s=0.0)
        start = time.monotonic()
        while (cache.metrics.registry.get_sample_value("flexcache_scrub_passes_total") or 0) < 1:
            assert time.monotonic() - start < 15
            time.sleep(0.01)
        took = time.monotonic() - start
    finally:
        cache.close()
    assert 1.0 <= took <= 10.0, took  # the lower bound is the rate; the upper one loose (a busy machine)
