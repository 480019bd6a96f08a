"""Calibration's fit (client/calibration/fit.py) and the flexcache-calibrate CLI, on trials with known
losses: no model needed. The reference model's own calibration run is tests/model/test_calibration_model.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexcache.client.calibration import Trial, fit
from flexcache.client.calibration.report import markdown, plot

STEPS = 50


def trials(table: str, similarity: float, k: int, loss_mean: float, n: int = 60, sd: float = 2.0,
           background: float = 0.0, seed: int = 0) -> list[Trial]:
    rng = np.random.default_rng([seed, k, int(similarity * 1000), int(background * 1000)])
    return [Trial(table, similarity, background, k, float(x), i, (i + 1,))
            for i, x in enumerate(rng.normal(loss_mean, sd, n))]


def test_largest_k_within_budget_per_bin() -> None:
    data = (trials("whole", 0.999, 10, 0.0) + trials("whole", 0.999, 25, 0.0) + trials("whole", 0.999, 45, 0.2)
            + trials("whole", 0.95, 10, 0.0) + trials("whole", 0.95, 25, 0.3) + trials("whole", 0.95, 45, 6.0)
            + trials("whole", 0.80, 10, 4.0) + trials("whole", 0.80, 25, 9.0))
    result = fit(data, STEPS, max_loss=1.0, confidence=0.9, min_trials=30)
    assert result.granted["whole"][(0.995, 0.0)] == 45
    assert result.granted["whole"][(0.93, 0.0)] == 25
    assert result.granted["whole"][(0.75, 0.0)] == 0
    assert result.whole == ((0.995, 0.9), (0.93, 0.5))
    assert result.composed == () and result.partial_object == ()
    within = {(s.low, s.k): s.within for s in result.stats}
    assert within[(0.93, 45)] is False and within[(0.995, 45)] is True


def test_a_k_is_granted_only_if_every_smaller_k_passes() -> None:
    data = trials("whole", 0.999, 10, 5.0) + trials("whole", 0.999, 25, 0.0)  # K=25 "passes", K=10 does not
    assert fit(data, STEPS, min_trials=30).whole == ()


def test_too_few_trials_grant_nothing_and_bins_without_data_inherit_from_below() -> None:
    few = trials("whole", 0.999, 25, 0.0, n=10)
    assert fit(few, STEPS, min_trials=30).whole == ()
    # Only the 0.85-0.9 bin has data: the more similar bins (no evidence) take its K, the monotone assumption.
    result = fit(trials("whole", 0.86, 20, 0.0), STEPS, min_trials=30)
    assert result.whole == ((0.85, 0.4),)
    assert result.granted["whole"][(0.995, 0.0)] == 20


def test_monotone_a_higher_bin_never_grants_less() -> None:
    # The 0.93 bin fails at K=25 while the 0.85 bin passes there: the lower bin is held to the higher's K.
    data = (trials("whole", 0.94, 10, 0.0) + trials("whole", 0.94, 25, 8.0)
            + trials("whole", 0.86, 10, 0.0) + trials("whole", 0.86, 25, 0.0))
    result = fit(data, STEPS, min_trials=30)
    assert result.granted["whole"][(0.85, 0.0)] == 10 and result.granted["whole"][(0.93, 0.0)] == 10
    assert result.whole == ((0.85, 0.2),)


def test_composed_cells_are_monotone_in_both_similarities_and_dominated_tiers_dropped() -> None:
    data = (trials("composed", 0.95, 5, 0.0, background=0.95) + trials("composed", 0.95, 10, 0.0, background=0.95)
            + trials("composed", 0.85, 5, 0.0, background=0.95) + trials("composed", 0.85, 10, 6.0, background=0.95)
            + trials("composed", 0.95, 5, 0.0, background=0.7) + trials("composed", 0.95, 10, 0.0, background=0.7))
    result = fit(data, STEPS, min_trials=30)
    g = result.granted["composed"]
    assert g[(0.9, 0.9)] == 10 and g[(0.8, 0.9)] == 5 and g[(0.9, 0.65)] == 10
    assert g[(0.8, 0.65)] == 0  # no data, and it dominates nothing that has any
    assert set(result.composed) == {(0.9, 0.65, 0.2), (0.8, 0.9, 0.1)}  # (0.9, 0.9, 0.2) is dominated


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="max_loss"):
        fit([], STEPS, max_loss=float("nan"))
    with pytest.raises(ValueError, match="confidence"):
        fit([], STEPS, confidence=1.0)


def test_report_lists_every_bin_and_the_fitted_tiers(tmp_path: Path) -> None:
    result = fit(trials("whole", 0.999, 25, 0.0) + trials("partial_object", 0.95, 5, 0.0), STEPS, min_trials=30)
    text = markdown(result)
    assert "| whole | 0.995 - 1 | - | 25 | 60 |" in text and "| whole | 0.995:0.50 |" in text
    assert "| partial_object | 0.9:0.10 |" in text
    assert plot(result, tmp_path / "p.png") is not None and (tmp_path / "p.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- CLI
CLI = [sys.executable, "-m", "flexcache.client.calibration.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def write_trials(path: Path, data: list[Trial]) -> Path:
    with path.open("w") as f:
        f.write(json.dumps({"total_steps": STEPS, "prompts": 100}) + "\n")
        for t in data:
            f.write(json.dumps({**t.__dict__, "donors": list(t.donors)}) + "\n")
    return path


def test_cli_refits_saved_trials(tmp_path: Path) -> None:
    saved = write_trials(tmp_path / "trials.jsonl", trials("whole", 0.999, 25, 0.0) + trials("whole", 0.999, 45, 0.0))
    out = tmp_path / "out"
    result = run("--trials", str(saved), "--out", str(out), "--max-loss", "1.0")
    assert result.returncode == 0, result.stderr
    tables = json.loads((out / "tables.json").read_text())
    assert tables["whole"] == [[0.995, 0.9]] and tables["max_loss"] == 1.0
    assert "| whole | 0.995:0.90 |" in (out / "calibration.md").read_text()
    # a stricter budget on the same trials: the fit can refuse what it granted
    strict = run("--trials", str(saved), "--out", str(out), "--max-loss", "0.0")
    refused = json.loads((out / "tables.json").read_text())
    assert strict.returncode == 0 and refused["whole"] == [[-1.0, 0.0]]  # explicit: grants nothing
    assert refused["composed"] == [[-1.0, -1.0, 0.0]] and refused["partial_object"] == [[-1.0, 0.0]]


@pytest.mark.parametrize(("args", "says"), [
    ((), "give --prompts to sample, or --trials"),
    (("--prompts", "/nonexistent/prompts.txt", "--sampler", "json:loads", "--scorer", "json:dumps"), "cannot read"),
    (("--prompts", "PROMPTS", "--sampler", "no_such_module:x", "--scorer", "json:dumps"), "cannot be loaded"),
    (("--prompts", "PROMPTS", "--sampler", "json", "--scorer", "json:dumps"), "must be module:attribute"),
    (("--prompts", "PROMPTS", "--tables", "whole,nope"), "unknown table 'nope'"),
    (("--trials", "PROMPTS"), "is not a trials.jsonl"),
    (("--trials", "TRIALS", "--max-loss", "nan"), "max_loss must be"),
    (("--trials", "TRIALS", "--apply", "127.0.0.1:1"), "--apply needs --namespace"),
    (("--trials", "TRIALS", "--apply", "127.0.0.1:1", "--namespace", "a/b"), "is not tenant/model"),
    (("--trials", "TRIALS", "--out", "/proc/flexcache-calibration"), "cannot write /proc/flexcache-calibration"),
])
def test_cli_bad_input_is_one_sentence_and_exit_2(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue cube\n")
    saved = write_trials(tmp_path / "trials.jsonl", trials("whole", 0.999, 25, 0.0))
    args = tuple(str(prompts) if a == "PROMPTS" else str(saved) if a == "TRIALS" else a for a in args)
    result = run("--out", str(tmp_path / "out"), *args)  # a case's own --out comes last and wins
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flexcache-calibrate: ") and says in lines[0], result.stderr


def test_cli_installs_the_fitted_tables_on_a_daemon(daemon, tmp_path: Path) -> None:
    from flexcache.client import CacheClient, Namespace

    saved = write_trials(tmp_path / "trials.jsonl", trials("whole", 0.999, 25, 0.0) + trials("whole", 0.95, 10, 0.0)
                         + trials("composed", 0.95, 5, 0.0, background=0.95))
    ns = "acme/wan2.1/832x480x81/flow/50"
    result = run("--trials", str(saved), "--out", str(tmp_path / "out"), "--apply", daemon.target, "--namespace", ns)
    assert result.returncode == 0, result.stderr
    assert "installed on" in result.stdout
    with CacheClient(daemon.target, Namespace("acme", "wan2.1", 832, 480, 81, "flow", 50), timeout_s=10) as client:
        tables = client.step_tables()
    assert tables.source == "admin" and tables.whole == ((0.995, 0.5), (0.93, 0.2))
    assert tables.composed == ((0.9, 0.9, 0.1),) and tables.max_loss == 1.0
    assert tables.partial_object == ((-1.0, 0.0),)  # calibrated to nothing, not derived from whole
    with CacheClient(daemon.target, Namespace("acme", "wan2.1", 832, 480, 81, "flow", 50), timeout_s=10) as client:
        assert client.step_tables().grant(0.99, 50, "partial_object") == 0
    dead = run("--trials", str(saved), "--out", str(tmp_path / "out"), "--apply", "127.0.0.1:1", "--namespace", ns)
    assert dead.returncode == 3 and "did not take the tables" in dead.stderr


# ---------------------------------------------------------------------------------------------- shadow samples
def test_shadow_draws_its_fraction_and_names_the_table_that_granted_the_hit() -> None:
    from flexcache.client.answers import Candidate
    from flexcache.client.base import Hit
    from flexcache.client.shadow import Shadow, quality_sample

    def candidate(role: str, similarity: float) -> Candidate:
        return Candidate("e" * 64, similarity, 10, role, "p", None, None, "")

    whole = Hit(None, 20, "full", [candidate("full", 0.97)])
    assert quality_sample(whole, 3.0) == quality_sample(whole, 3.0)
    assert (quality_sample(whole, 3.0).table, quality_sample(whole, 3.0).granted_steps) == ("whole", 20)
    pair = Hit(None, 5, "composed", [candidate("object", 0.9), candidate("background", 0.8)])
    s = quality_sample(pair, -1.0)
    assert (s.table, s.similarity, s.background_similarity, s.loss) == ("composed", 0.9, 0.8, -1.0)
    assert quality_sample(Hit(None, 5, "partial", [candidate("background", 0.85)]), 0).table == "partial_background"
    shadow = Shadow(0.2, seed=1)
    drawn = sum(shadow.wants(whole) for _ in range(5000))
    assert 800 < drawn < 1200 and not shadow.wants(None) and not Shadow(0.0).wants(whole)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Shadow(1.5)
