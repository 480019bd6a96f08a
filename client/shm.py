"""The client's side of the same-host handover of fetched blobs (the protocol: daemon/shm.py).

An `Inbox` owns one probe file in the shared-memory folder for its client's lifetime. The daemon
writes fetched blobs into it, so one fetch at a time may use it: `claim()` is non-blocking, and a
thread that finds the inbox busy streams instead.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from pathlib import Path

DEFAULT_DIR = "/dev/shm/flexcache"  # the daemon's default shm_dir
KEEP_BYTES = 64 << 20  # after reading a larger blob, give its tmpfs pages back


class Inbox:
    def __init__(self, folder: str | os.PathLike[str]):
        """Raises OSError when the folder cannot be used (the client then always streams)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.probe = f"probe-{uuid.uuid4().hex}"
        self._path = self.folder / self.probe
        self._lock = threading.Lock()
        self.touch()

    def touch(self) -> None:
        """(Re)create the probe and mark it live: the daemon deletes probes idle for 15 minutes.
        Group-writable, whatever the umask, for a daemon that runs as another user of a shared group
        (the Kubernetes sidecar: fsGroup)."""
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o660)
        try:
            os.fchmod(fd, 0o660)
        finally:
            os.close(fd)
        os.utime(self._path)

    def claim(self) -> bool:
        """Reserve the probe file for one fetch; False if another thread's fetch is using it."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self.touch()
        except OSError:
            self._lock.release()
            return False
        return True

    def release(self) -> None:
        self._lock.release()

    def read(self, size: int) -> bytearray:
        """The blob the daemon wrote into the probe file (exactly `size` bytes)."""
        with open(self._path, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != size:
                raise ValueError(f"shared-memory file {self.probe} does not hold the declared {size} bytes")
            data = bytearray(size)
            view, offset = memoryview(data), 0
            while offset < size and (n := f.readinto(view[offset:])):
                offset += n
        if size > KEEP_BYTES:
            os.truncate(self._path, 0)
        if offset != size:
            raise ValueError(f"shared-memory file {self.probe} ended after {offset} of {size} bytes")
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._path.unlink()
