"""What each side imports: the daemon never imports torch; the client (what a worker installs)
imports neither torch nor the daemon's storage and index packages until a tensor is involved."""

from __future__ import annotations

import subprocess
import sys

import pytest

WORKER_NEVER = ("torch", "rocksdict", "qdrant_client", "qdrant_edge", "prometheus_client", "yaml",
                "flexcache.daemon")


def _imported_after(module: str, forbidden: tuple[str, ...]) -> list[str]:
    code = (f"import sys, {module}; "
            f"print(' '.join(m for m in {forbidden!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("module", ["flexcache.daemon.server", "flexcache.daemon.cli", "flexcache.daemon.process"])
def test_the_daemon_never_imports_torch(module: str) -> None:
    assert _imported_after(module, ("torch",)) == []


@pytest.mark.parametrize("module", ["flexcache.client", "flexcache.client.prompt_split", "flexcache.client.codec",
                                    "flexcache.client.compose", "flexcache.client.masks", "flexcache.v1.wire"])
def test_a_worker_imports_no_torch_and_no_daemon(module: str) -> None:
    assert _imported_after(module, WORKER_NEVER) == []
