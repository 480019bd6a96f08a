"""The runnable examples (examples/*.py) against a real daemon, and the README's quickstart block.

Each example runs as a user runs it (a subprocess of this interpreter, from the repository root,
`--target` naming the daemon) against a daemon on its default settings, so a change to the client,
the thresholds or the reference model that breaks an example fails here. The README's "Client
quickstart" block must be the marked region of examples/quickstart.py, so the README never shows
code that does not run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.py"
BEGIN, END = "# --- quickstart begin ---", "# --- quickstart end ---"


def run_example(name: str, target: str) -> subprocess.CompletedProcess[str]:
    """Run examples/<name> as `python examples/<name> --target ...` from the repository root."""
    return subprocess.run([sys.executable, f"examples/{name}", "--target", target], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def quickstart_region() -> str:
    """The lines between the quickstart markers of examples/quickstart.py, dedented."""
    lines = QUICKSTART.read_text().splitlines()
    begin = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    end = [i for i, line in enumerate(lines) if line.strip() == END]
    assert len(begin) == 1 and len(end) == 1 and begin[0] < end[0], "quickstart markers missing or repeated"
    return textwrap.dedent("\n".join(lines[begin[0] + 1:end[0]])).strip("\n")


def readme_quickstart_block() -> str:
    """The first python code block under the README's '## Client quickstart' heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Client quickstart\n", 1)
    assert len(section) == 2, "README has no '## Client quickstart' section"
    body = section[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)\n```", body, re.S)
    assert block, "no python block under '## Client quickstart'"
    return block.group(1)


def test_readme_quickstart_is_the_example_region() -> None:
    assert readme_quickstart_block() == quickstart_region()


@pytest.fixture
def target(start_daemon) -> str:
    """A daemon on its default settings, as `make serve` runs it (its own data folder and ports)."""
    return start_daemon().target


def test_quickstart_misses_then_hits_the_paraphrase(target: str) -> None:
    for _ in range(2):  # a rerun against the same daemon starts with a miss again (a namespace per run)
        result = run_example("quickstart.py", target)
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert re.search(r"^first request:  miss, 50 of 50 steps in [\d.]+ s, stored: ", out, re.M), out
        found = re.search(r"^second request: full hit at K = (\d+) \(similarity [\d.]+ to .*\), (\d+) of 50 steps", out,
                          re.M)
        assert found, out
        k, ran = int(found.group(1)), int(found.group(2))
        assert 0 < k < 50 and ran == 50 - k


def test_composed_serves_one_object_over_another_scene(target: str) -> None:
    result = run_example("composed.py", target)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("\nstored: ") == 2, out
    found = re.search(r"^composed hit at K = (\d+): (\d+) of 50 steps", out, re.M)
    assert found, out
    k, ran = int(found.group(1)), int(found.group(2))
    assert 0 < k <= 5 and ran == 50 - k  # composed hits are capped at composed_max_fraction = 0.1 of the steps
    assert "object from:     'a purple square rising over a red checkerboard'" in out
    assert "background from: 'a white cross drifting right over a night sky with stars'" in out


def test_diffusers_wan_tiny_misses_then_resumes_at_k(target: str) -> None:
    """The diffusers adapter on a tiny random-weight WanPipeline (skipped without diffusers, except in CI)."""
    try:
        import diffusers  # noqa: F401
    except ModuleNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"examples/diffusers_wan.py cannot run, and CI must not skip it: {exc}")
        pytest.skip(f"diffusers not installed ({exc}): pip install -e '.[diffusers]'")
    result = subprocess.run([sys.executable, "examples/diffusers_wan.py", "--tiny", "--target", target], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(r"^(miss|full hit) +K = +(\d+), +(\d+) of 10 steps, +(\d+) transformer calls", result.stdout,
                      re.M)
    assert len(rows) == 3 and rows[0] == ("miss", "0", "10", "10"), result.stdout
    kind, k, ran, calls = rows[1]
    assert kind == "full hit" and 0 < int(k) < 10 and int(ran) == int(calls) == 10 - int(k), result.stdout


def test_an_absent_daemon_fails_the_example_with_a_message() -> None:
    """Against nothing the client misses everywhere, and the example says so and exits 1."""
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_example("quickstart.py", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "expected a full hit" in result.stdout
