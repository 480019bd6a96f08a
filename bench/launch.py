"""Start a real `flexcache serve` for a benchmark: free loopback port, fresh data dir, always stopped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Daemon:
    target: str  # host:port for CacheClient
    pid: int
    data_dir: Path

    def cpu_seconds(self) -> float:
        """User + system CPU the daemon process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def daemon(**settings: object) -> Iterator[Daemon]:
    """`settings` are `flexcache serve` flags by setting name (max_bytes=..., eviction_policy=...)."""
    data_dir = Path(tempfile.mkdtemp(prefix="flexcache-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXCACHE_")}
    cmd = [sys.executable, "-m", "flexcache.daemon.cli", "serve", "--data-dir", str(data_dir / "data"),
           "--listen", "127.0.0.1:0", "--metrics-listen", "", "--log-level", "WARNING"]
    for name, value in settings.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    log = (data_dir / "daemon.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"daemon exited with {proc.wait()}: {(data_dir / 'daemon.log').read_text()}")
            if m := re.match(r"flexcache listening on port (\d+)", line):
                port = int(m.group(1))
        if port is None:
            raise TimeoutError("daemon did not start")
        yield Daemon(f"127.0.0.1:{port}", proc.pid, data_dir / "data")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        proc.stdout.close()
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)
