"""A daemon for one benchmark cell: a fresh temporary data folder, the shared launcher
(flexcache.daemon.process), always stopped and removed afterwards."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flexcache.daemon.process import DaemonProcess


@contextmanager
def daemon(**settings: object) -> Iterator[DaemonProcess]:
    """`settings` are `flexcache serve` settings by name (max_bytes=..., eviction_policy=...)."""
    folder = Path(tempfile.mkdtemp(prefix="flexcache-bench-"))
    process = DaemonProcess(folder / "data", **{"metrics_listen": "", "log_level": "WARNING", **settings})
    try:
        with process:
            yield process
    finally:
        shutil.rmtree(folder, ignore_errors=True)
