"""Benchmark reports: a mean with its 95 % confidence half-width, in points; the generated part of a doc."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def ci95(x: np.ndarray) -> float:
    """Half-width of the normal-approximation 95 % confidence interval of the mean."""
    return 1.96 * float(np.std(x, ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else float("nan")


def points(x: np.ndarray, signed: bool = False) -> str:
    """A fraction in [0, 1] (or a paired difference of two) as 'mean ± ci' in points (x100)."""
    if not len(x):
        return "-"
    return f"{100 * np.mean(x):{'+' if signed else ''}.1f} ± {100 * ci95(x):.1f}"


RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"


def replace_results(doc: Path, title: str, lines: list[str]) -> None:
    """Write `lines` between the results markers of `doc`, keeping the prose around them (a doc that
    does not exist yet starts as `# title` and the markers)."""
    text = doc.read_text() if doc.exists() else f"# {title}\n\n{RESULTS_BEGIN}\n{RESULTS_END}\n"
    if RESULTS_BEGIN not in text:
        text += f"\n{RESULTS_BEGIN}\n{RESULTS_END}\n"
    head, rest = text.split(RESULTS_BEGIN, 1)
    tail = rest.split(RESULTS_END, 1)[1] if RESULTS_END in rest else ""
    doc.write_text(head + "\n".join([RESULTS_BEGIN, *lines, RESULTS_END]) + tail)
