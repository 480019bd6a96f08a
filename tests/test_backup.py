"""Backups and restores (daemon/backup.py, `flexcache backup` and `flexcache restore`, docs/backup.md).

- backup() while a thread keeps putting: the copy opens, every entry it lists reads back whole with
  its sha256, and every put acknowledged before the backup began is in it;
- restored into a fresh data folder, a daemon started on it finds every entry again (the index, which
  is not in the backup, rebuilt from the stored vectors), and the backup stays usable;
- restore refuses a data folder that holds a store (without --force) and one a daemon has open;
- unusable backup paths (relative, existing, no parent, inside the store) are InvalidRequest;
- with real daemons, `flexcache backup` end to end, inside the daemon's backup_dir only; a daemon
  without one takes no backups.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flexcache.daemon import backup as bk
from flexcache.daemon import build
from flexcache.daemon import config as cfg
from flexcache.daemon.cache import Cache
from flexcache.daemon.errors import InvalidRequest
from flexcache.daemon.store import Store
from flexcache.v1 import cache_pb2 as pb
from tests.conftest import NS, assert_one_line, connect, metric, run_cli
from tests.test_durability import latent_for
from tests.vectors import unit


def open_cache(data_dir: Path) -> Cache:
    return build.open_cache(cfg.resolve(env={}, flags={"data_dir": str(data_dir), "max_bytes": "256MiB",
                                                       "scrub_bytes_per_second": "0"}))


def blob_for(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, 96 * 1024 + i, dtype=np.uint8).tobytes()


def put(cache: Cache, i: int) -> str:
    """Entry i in-process, as the daemon's Put stores it: prompt 'p<i>', vector unit(i), blob_for(i)."""
    data = blob_for(i)
    header = pb.PutHeader(namespace=NS.to_proto(), prompt=f"p{i}")
    header.vectors.full.extend(unit(i).tolist())
    header.blob.codec, header.blob.dtype, header.blob.size = "raw", "uint8", len(data)
    header.blob.shape.append(len(data))
    header.blob.sha256 = hashlib.sha256(data).digest()
    session = cache.begin_put(header)
    for at in range(0, len(data), 1 << 20):
        session.add_chunk(data[at:at + (1 << 20)])
    return session.finish().entry_id


def check_whole(store_dir: Path) -> dict[str, int]:
    """Open the store and read every entry it lists: each blob whole, with its recorded size and sha256.
    Entry id -> i (from its prompt)."""
    store = Store(store_dir, max_bytes=256 << 20)
    found = {}
    try:
        for entry_id, header, _ in store.entries():
            data = b"".join(store.read_blob(entry_id))
            assert len(data) == header.blob.size, entry_id
            assert hashlib.sha256(data).digest() == header.blob.sha256, entry_id
            i = int(header.prompt[1:])
            assert data == blob_for(i)
            assert np.allclose(store.vectors(entry_id).full, unit(i), atol=1e-3)
            found[entry_id] = i
    finally:
        store.close()
    return found


# ----------------------------------------------------------------------------- in-process
def test_backup_while_puts_go_on_restores_every_entry_whole(tmp_path: Path, start_daemon) -> None:
    cache = open_cache(tmp_path / "live")
    acknowledged: dict[str, int] = {}
    stop, failed = threading.Event(), []

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set() and i < 600:
                acknowledged[put(cache, i)] = i
                i += 1
        except Exception as exc:  # reported by the test, not lost in the thread
            failed.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            time.sleep(0.005)
        before = dict(acknowledged)  # acknowledged before the backup began: all must be in it
        answer = bk.backup(cache.store, str(tmp_path / "backup"), entries=cache.stats().entries, node="node-a")
        deadline = time.monotonic() + 30  # puts go on during and after it: one more landed at least
        while len(acknowledged) <= len(before) and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        stop.set()
        thread.join(30)
        cache.close()
    assert not failed, failed
    assert len(before) >= 40 and len(acknowledged) > len(before)

    root = tmp_path / "backup"
    assert answer.path == str(root) and answer.entries >= len(before)
    assert answer.bytes > sum(len(blob_for(i)) for i in before.values()) // 2
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == bk.FORMAT and manifest["entries"] == answer.entries
    assert manifest["node"] == "node-a" and manifest["flexcache_version"]
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "store"]

    data = tmp_path / "restored"
    assert bk.restore(root, data) == answer.entries
    assert not (data / "index").exists()  # nothing of the index is copied
    restored = check_whole(data / "store")
    assert before.keys() <= restored.keys()
    assert restored.keys() <= acknowledged.keys()  # nothing but acknowledged puts
    assert (root / "store" / "CURRENT").is_file() and bk.read_manifest(root)  # the backup is still whole

    # A daemon on the restored folder finds every entry: the index rebuilt from the stored vectors.
    daemon = start_daemon("restored")
    with connect(daemon.target) as c:
        assert c.stats().entries == len(restored)
        for entry_id, i in restored.items():
            result = c.lookup(unit(i))
            assert result is not None and result.best is not None and result.best.entry_id == entry_id, i
        fetched = c.fetch(next(iter(restored)))
        assert fetched is not None
    assert metric(daemon, "flexcache_reconciled_total", action="reindexed") == len(restored)

    # The same backup restores again, into another folder.
    assert bk.restore(root, tmp_path / "again") == answer.entries
    assert check_whole(tmp_path / "again" / "store") == restored


def test_restore_refuses_a_data_folder_with_a_store_unless_forced(tmp_path: Path) -> None:
    cache = open_cache(tmp_path / "a")
    try:
        ids = [put(cache, i) for i in range(5)]
        bk.backup(cache.store, str(tmp_path / "bk-a"), entries=5)
    finally:
        cache.close()
    cache = open_cache(tmp_path / "b")
    try:
        other = [put(cache, i) for i in range(100, 103)]
        with pytest.raises(InvalidRequest, match="in use by a running daemon"):  # open: never replaced
            bk.restore(tmp_path / "bk-a", tmp_path / "b", force=True)
    finally:
        cache.close()
    with pytest.raises(InvalidRequest, match="already holds a store"):
        bk.restore(tmp_path / "bk-a", tmp_path / "b")
    assert set(check_whole(tmp_path / "b" / "store")) == set(other)  # untouched

    result = run_cli("restore", "--from", str(tmp_path / "bk-a"), "--data-dir", str(tmp_path / "b"))
    assert_one_line(result, 2, f"flexcache restore: {tmp_path / 'b'} already holds a store")
    result = run_cli("restore", "--from", str(tmp_path / "bk-a"), "--data-dir", str(tmp_path / "b"), "--force")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"restored 5 entries from {tmp_path / 'bk-a'}")
    assert set(check_whole(tmp_path / "b" / "store")) == set(ids)
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".")) == []  # no leftovers

    # An empty store folder is no store: restored into without --force.
    (tmp_path / "c" / "store").mkdir(parents=True)
    assert bk.restore(tmp_path / "bk-a", tmp_path / "c") == 5


def test_restore_refuses_what_is_not_a_backup(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "store").mkdir()  # a backup that failed before its manifest
    with pytest.raises(InvalidRequest, match=r"no manifest\.json"):
        bk.restore(tmp_path / "half", tmp_path / "data")
    (tmp_path / "half" / "manifest.json").write_text('{"format": 99, "entries": 1}')
    with pytest.raises(InvalidRequest, match="format 99"):
        bk.restore(tmp_path / "half", tmp_path / "data")
    (tmp_path / "half" / "manifest.json").write_text('{"format": 1, "entries": 1}')
    with pytest.raises(InvalidRequest, match="no checkpoint"):
        bk.restore(tmp_path / "half", tmp_path / "data")
    assert not (tmp_path / "data").exists()
    result = run_cli("restore", "--from", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "data"))
    assert_one_line(result, 2, f"flexcache restore: {tmp_path / 'missing'} is not a folder")


def test_unusable_backup_paths_are_invalid_requests(tmp_path: Path) -> None:
    cache = open_cache(tmp_path / "data")
    try:
        put(cache, 1)
        (tmp_path / "taken").mkdir()
        for path, words in [("relative/backup", "is relative"), ("", "name the backup folder"),
                            (str(tmp_path / "taken"), "already exists"),
                            (str(tmp_path / "no" / "such" / "parent"), "does not exist; create it first"),
                            (str(tmp_path / "data" / "store" / "inside"), "inside the store's own folder")]:
            with pytest.raises(InvalidRequest, match=words):
                bk.backup(cache.store, path, entries=1)
        assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == []
        if os.geteuid() != 0:  # root writes anywhere
            (tmp_path / "locked").mkdir(mode=0o500)
            with pytest.raises(InvalidRequest, match="may not write"):
                bk.backup(cache.store, str(tmp_path / "locked" / "b"), entries=1)
    finally:
        cache.close()


def test_a_failed_backup_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = open_cache(tmp_path / "data")
    try:
        put(cache, 1)

        def broken(manifest_root: Path, manifest: dict) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(bk, "_write_manifest", broken)
        with pytest.raises(bk.Unavailable, match=r"the backup to .* failed"):
            bk.backup(cache.store, str(tmp_path / "b"), entries=1)
        assert not (tmp_path / "b").exists()
    finally:
        cache.close()


# ----------------------------------------------------------------------------- real daemons
def test_backup_through_the_cli_restores_into_a_new_daemon(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon("first", backup_dir=tmp_path)
    with connect(daemon.target) as c:
        ids = [c.put(f"prompt {i}", latent_for(i), unit(i)) for i in range(12)]
    assert all(ids)
    result = run_cli("backup", "--target", daemon.target, "--path", str(tmp_path / "bk"))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["path"] == str(tmp_path / "bk") and int(answer["entries"]) == 12 and int(answer["bytes"]) > 0

    again = run_cli("backup", "--target", daemon.target, "--path", str(tmp_path / "bk"))
    assert_one_line(again, 1, f"flexcache backup: {daemon.target}: INVALID_ARGUMENT: backup path")
    assert "already exists" in again.stderr
    outside = run_cli("backup", "--target", daemon.target, "--path", "/elsewhere/bk")
    assert_one_line(outside, 1, f"flexcache backup: {daemon.target}: INVALID_ARGUMENT: backup path '/elsewhere/bk' "
                                "is not inside backup_dir")
    escape = run_cli("backup", "--target", daemon.target, "--path", "../bk")
    assert_one_line(escape, 1, f"flexcache backup: {daemon.target}: INVALID_ARGUMENT: backup path '../bk' is not "
                               "inside backup_dir")
    relative = run_cli("backup", "--target", daemon.target, "--path", "bk2")  # inside backup_dir
    assert relative.returncode == 0, relative.stderr
    assert json.loads(relative.stdout)["path"] == str(tmp_path / "bk2")

    busy = run_cli("restore", "--from", str(tmp_path / "bk"), "--data-dir", str(daemon.data_dir))
    assert_one_line(busy, 2, f"flexcache restore: {daemon.data_dir} already holds a store")
    busy = run_cli("restore", "--from", str(tmp_path / "bk"), "--data-dir", str(daemon.data_dir), "--force")
    assert_one_line(busy, 2, f"flexcache restore: the data folder {daemon.data_dir} is in use")
    daemon.terminate()

    restored = run_cli("restore", "--from", str(tmp_path / "bk"), "--data-dir", str(tmp_path / "second"))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.strip().startswith("restored 12 entries")
    second = start_daemon("second")
    with connect(second.target) as c:
        assert c.stats().entries == 12
        for i, entry_id in enumerate(ids):
            result = c.lookup(unit(i))
            assert result is not None and result.best is not None and result.best.entry_id == entry_id
            fetched = c.fetch(entry_id)
            assert fetched is not None
            np.testing.assert_array_equal(fetched.latent(), latent_for(i))


def test_backup_taken_while_a_client_puts(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon("busy", backup_dir=tmp_path)
    acknowledged: dict[str, int] = {}
    stop = threading.Event()

    def writer() -> None:
        with connect(daemon.target) as c:
            i = 0
            while not stop.is_set() and i < 2000:
                entry_id = c.put(f"prompt {i}", latent_for(i), unit(i))
                if entry_id:
                    acknowledged[entry_id] = i
                i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = dict(acknowledged)
        result = run_cli("backup", "--target", daemon.target, "--path", str(tmp_path / "bk"))
    finally:
        stop.set()
        thread.join(60)
    assert result.returncode == 0, result.stderr
    daemon.terminate()
    shutil.rmtree(daemon.data_dir)  # the node lost its disk: only the backup is left
    assert run_cli("restore", "--from", str(tmp_path / "bk"), "--data-dir", str(daemon.data_dir)).returncode == 0
    daemon.start()
    with connect(daemon.target) as c:
        assert c.stats().entries >= len(before)
        for entry_id, i in before.items():
            result = c.lookup(unit(i))
            assert result is not None and result.best is not None and result.best.entry_id == entry_id
            fetched = c.fetch(entry_id)  # verifies size and sha256
            assert fetched is not None
            np.testing.assert_array_equal(fetched.latent(), latent_for(i))


def test_a_daemon_without_a_backup_dir_takes_no_backups(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon("plain")
    result = run_cli("backup", "--target", daemon.target, "--path", str(tmp_path / "bk"))
    assert_one_line(result, 1, f"flexcache backup: {daemon.target}: FAILED_PRECONDITION: this daemon takes no "
                               "backups")
    assert not (tmp_path / "bk").exists()
