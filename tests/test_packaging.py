"""What each install brings, checked by installing the repository into empty virtualenvs:

- `pip install .` is the client a diffusion worker needs: put, lookup and fetch work against a
  daemon, and neither torch nor RocksDB nor Qdrant is installed;
- `pip install '.[daemon]'` runs the daemon, still without torch.

Installing needs the package index (PyPI); without it the test skips and says so.
"""

from __future__ import annotations

import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

from flexcache.daemon.process import DaemonProcess

ROOT = Path(__file__).resolve().parents[1]
NEVER_IN_A_WORKER = ("torch", "rocksdict", "qdrant-client", "qdrant-edge-py")


def _install(folder: Path, spec: str) -> Path:
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    result = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", spec],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        if "Could not find a version" in result.stderr or "NewConnectionError" in result.stderr:
            pytest.skip(f"the package index is unreachable, cannot install {spec}: {result.stderr[-300:]}")
        raise AssertionError(f"pip install {spec} failed:\n{result.stderr[-3000:]}")
    return python


def _installed(python: Path) -> set[str]:
    listing = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                             check=True).stdout
    return {line.split("==")[0].lower() for line in listing.splitlines()}


CLIENT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from flexcache.client import CacheClient, Namespace

    ns = Namespace(tenant="pkg", model="m", width=64, height=64, frames=8, scheduler="flow", total_steps=50)
    v = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    latent = np.random.default_rng(1).standard_normal((4, 2, 8, 8)).astype(np.float32)
    with CacheClient(sys.argv[1], ns, timeout_s=10.0, max_rel_error=0.0) as cache:
        entry = cache.put("a prompt", latent, v, seed=3)
        assert entry is not None, "put failed"
        best = cache.lookup(v).best
        assert best is not None and best.entry_id == entry, "lookup missed"
        np.testing.assert_array_equal(cache.fetch(entry).latent(), latent)
        assert "torch" not in sys.modules
    print("client ok")
""")


def test_base_install_is_a_client_and_the_daemon_extra_runs_without_torch(tmp_path: Path) -> None:
    daemon_python = _install(tmp_path / "daemon-venv", f"{ROOT}[daemon]")
    assert "torch" not in _installed(daemon_python)
    client_python = _install(tmp_path / "client-venv", str(ROOT))
    installed = _installed(client_python)
    assert not installed & set(NEVER_IN_A_WORKER), installed & set(NEVER_IN_A_WORKER)

    with DaemonProcess(tmp_path / "data", python=daemon_python) as daemon:
        result = subprocess.run([client_python, "-c", CLIENT_SCRIPT, daemon.target], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "client ok" in result.stdout

    missing_extra = subprocess.run([client_python, "-m", "flexcache.daemon.cli", "serve", "--data-dir",
                                    str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert missing_extra.returncode != 0
    assert "pip install 'flexcache[daemon]'" in missing_extra.stderr
    assert "Traceback" not in missing_extra.stderr
