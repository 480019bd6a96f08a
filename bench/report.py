"""Figures for benchmark reports: a mean with its 95 % confidence half-width, in points."""

from __future__ import annotations

import math

import numpy as np


def ci95(x: np.ndarray) -> float:
    """Half-width of the normal-approximation 95 % confidence interval of the mean."""
    return 1.96 * float(np.std(x, ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else float("nan")


def points(x: np.ndarray, signed: bool = False) -> str:
    """A fraction in [0, 1] (or a paired difference of two) as 'mean ± ci' in points (x100)."""
    if not len(x):
        return "-"
    return f"{100 * np.mean(x):{'+' if signed else ''}.1f} ± {100 * ci95(x):.1f}"
