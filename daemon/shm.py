"""Same-host handover of fetched blobs through a shared-memory folder (tmpfs), beside the gRPC stream.

A worker on the same machine (or in the same Kubernetes pod, with the folder on a shared
`emptyDir: {medium: Memory}` volume) need not pull a multi-megabyte latent through Python gRPC's
streaming path, which tops out below Redis here (docs/bench_daemon.md). Instead:

1. the client keeps one file `probe-<32 hex>` in its shared-memory folder and names it in
   FetchRequest.shm_probe;
2. if that file exists in the daemon's folder, both processes see the same folder: the daemon writes
   the blob into it (from offset 0, then truncates it to the blob's size), sets
   FetchHeader.in_shm and sends no chunks;
3. the client reads the file and verifies the checksum as for a stream.

The file is overwritten in place on every fetch, so its tmpfs pages are allocated once: writing
8 MiB into a new tmpfs file took 4.0 ms here, into existing pages about a fifth of that. A client
fetches through its file one call at a time (client/shm.py). Anything else (no folder, a probe the
daemon cannot see, a full tmpfs) falls back to the stream, so the handover is an optimisation, never
a requirement. Probe files untouched for `IDLE_PROBE_S` belong to dead clients and are deleted; a
live client re-creates its probe before each fetch.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_NAME = re.compile(r"^probe-[0-9a-f]{32}$")
IDLE_PROBE_S = 900.0
_SWEEP_EVERY_S = 60.0


class Outbox:
    """The daemon's side: write a blob into the probe file of a client that shares the folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._next_sweep = 0.0
        self.sweep()

    def open(self, probe: str) -> int | None:
        """A descriptor for the client's probe file (name already validated), or None if this daemon
        cannot see it: the client is elsewhere, or the name is not a plain file (no symlinks)."""
        self.sweep()
        try:
            fd = os.open(self.folder / probe, os.O_WRONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

    @staticmethod
    def fill(fd: int, chunks: Iterable[bytes], size: int) -> None:
        """Write the blob into the opened probe file and close it; raises OSError (e.g. a full tmpfs)."""
        try:
            written = 0
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(fd, view, written)
                    written += n
                    view = view[n:]
            if written != size:
                raise OSError(f"wrote {written} of {size} bytes")
            os.ftruncate(fd, size)
        except OSError:
            os.ftruncate(fd, 0)  # release what was written; the client streams instead
            raise
        finally:
            os.close(fd)

    def sweep(self) -> None:
        """Delete probe files of clients that died (untouched for IDLE_PROBE_S); at most once a minute."""
        now = time.time()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_S
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for entry in entries:
            try:
                if PROBE_NAME.match(entry.name) and now - entry.stat(follow_symlinks=False).st_mtime > IDLE_PROBE_S:
                    os.unlink(entry.path)
            except OSError:  # removed by its client meanwhile
                pass
