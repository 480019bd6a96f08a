"""The embedded index on disk: bounded while puts keep arriving, rebuilt when damaged or foreign."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np

from tests.conftest import connect
from tests.test_durability import latent_for
from tests.vectors import unit

DIM = 128


def disk_bytes(folder: Path) -> int:
    """Allocated bytes under `folder` (files may vanish while the optimizer replaces segments)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(parent, name)).st_blocks * 512
    return total


def test_index_folder_stays_bounded_while_puts_arrive(daemon) -> None:
    """12,000 whole-prompt entries, sampled every 50 ms during the puts: the index folder stays within
    4x the raw float32 vectors (plus a few MiB), never only after a clean close. Before the fix every
    optimizer pass left its input segments on disk and each point paid for three named vectors."""
    n, writers = 12_000, 4
    stop = threading.Event()
    peak = [0, 0]  # disk bytes, points stored when seen

    def sample() -> None:
        while not stop.wait(0.05):
            peak[:] = max(peak, [disk_bytes(daemon.data_dir / "index"), done[0]])

    done = [0]

    def write(w: int) -> None:
        with connect(daemon.target, max_rel_error=None) as c:
            for i in range(w, n, writers):
                assert c.put(f"prompt {i}", np.full(4, i, np.float32), unit(i, DIM)) is not None
                done[0] += 1

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    raw = n * DIM * 4
    assert peak[0] <= 4 * raw + (8 << 20), f"index folder reached {peak[0]} bytes for {raw} bytes of vectors"
    with connect(daemon.target) as c:
        for i in (0, n // 2, n - 1):
            assert c.lookup(unit(i, DIM)).best.prompt == f"prompt {i}"


def _entries(daemon, n: int = 5) -> list[str]:
    with connect(daemon.target) as c:
        ids = [c.put(f"prompt {i}", latent_for(i), unit(i)) for i in range(n)]
    assert daemon.terminate() == 0
    return ids


def _lookups_find(daemon, ids: list[str]) -> None:
    with connect(daemon.target) as c:
        assert [c.lookup(unit(i)).best.entry_id for i in range(len(ids))] == ids


def test_damaged_shard_is_set_aside_and_rebuilt(daemon) -> None:
    ids = _entries(daemon)
    [shard] = (daemon.data_dir / "index").iterdir()
    for path in shard.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\xff" * 7)  # scribbled and truncated
    daemon.start()
    _lookups_find(daemon, ids)
    assert (daemon.data_dir / "index.damaged" / shard.name).is_dir()
    assert "cannot be loaded" in daemon.log.read_text()


def test_folder_of_another_layout_is_removed_and_rebuilt(daemon) -> None:
    """What earlier versions wrote (one shard per namespace holding all three vectors, or one per
    dimension) is not loaded: the store is the source of truth and re-indexes every entry."""
    ids = _entries(daemon)
    index_dir = daemon.data_dir / "index"
    [shard] = index_dir.iterdir()
    shard.rename(index_dir / shard.name.removesuffix(".full"))
    (index_dir / "d384").mkdir()
    daemon.start()
    _lookups_find(daemon, ids)
    assert sorted(p.name for p in index_dir.iterdir()) == [shard.name]
