"""Trials -> step tables: per similarity bin, the largest K whose loss is certified within the budget.

For each table and each bin of similarity (composed: each cell of object x background similarity), and
each K measured there, the trials give a mean paired loss and its one-sided upper confidence bound,
mean + z * se, z the normal quantile of `confidence`. The standard error is clustered by request
prompt (`clusters`): trials of one prompt (its repeats in the set, its several donors) share that
prompt's difficulty, so they count as one draw of it, not as independent ones; without clusters,
by request (one request's several donors). A bin's K is the largest measured K such
that it and every smaller measured K have at least `min_trials` trials and a bound within `max_loss`:
a K that passes only because its neighbours below happened to fail is not trusted.

Then the bins are made monotone, so a higher similarity never grants less:
- from the most similar bin down, a bin with evidence grants at most what every bin dominating it
  grants: the conservative direction, so a K certified in a lower bin but refused in a higher one is
  refused;
- then a bin with too few trials at every K (no evidence either way) takes the largest K of the bins
  it dominates (lower similarity; composed: lower in both), the monotone assumption every step table
  makes anyway; taken after the first pass, it never grants more than a bin above it.

The result is one tier per bin edge that grants something (adjacent bins of one K merged), in the
daemon's representation: (min_similarity, fraction of N) best first, and for composed hits
(min_object_similarity, min_background_similarity, fraction) with dominated tiers dropped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .measure import TABLES, Trial

__all__ = ["PART_EDGES", "WHOLE_EDGES", "BinStat", "Fit", "fit"]

WHOLE_EDGES = (0.5, 0.65, 0.75, 0.85, 0.9, 0.93, 0.96, 0.98, 0.995)  # bin lower edges; the last bin ends at 1
PART_EDGES = (0.5, 0.65, 0.8, 0.9)  # composed cells and partial bins: fewer trials, coarser bins


@dataclass(frozen=True)
class BinStat:
    table: str
    low: float  # bin lower edge (composed: the object similarity's)
    high: float
    background_low: float  # composed: the background similarity's bin; else 0
    background_high: float
    k: int
    n: int
    mean: float
    ci95: float  # half-width of the two-sided 95 % interval
    upper: float  # the one-sided bound at the fit's confidence
    within: bool  # enough trials and upper <= max_loss


@dataclass(frozen=True)
class Fit:
    total_steps: int
    max_loss: float
    confidence: float
    whole: tuple[tuple[float, float], ...]
    composed: tuple[tuple[float, float, float], ...]
    partial_object: tuple[tuple[float, float], ...]
    partial_background: tuple[tuple[float, float], ...]
    stats: tuple[BinStat, ...]
    granted: dict[str, dict[tuple[float, float], int]]  # table -> bin (low, background_low) -> K after monotone fit

    def table(self, name: str) -> tuple:
        return getattr(self, name)


def _bins(edges: Sequence[float]) -> list[tuple[float, float]]:
    return [(lo, edges[i + 1] if i + 1 < len(edges) else 1.0) for i, lo in enumerate(edges)]


def _bin_of(value: float, edges: Sequence[float]) -> float | None:
    below = [e for e in edges if e <= value + 1e-9]
    return max(below) if below else None


def standard_error(losses: np.ndarray, clusters: np.ndarray | None = None) -> float:
    """Of the mean of `losses`; cluster-robust when `clusters` (one label per loss) is given: the
    sum over clusters of their summed residuals squared, with the usual G / (G - 1) correction."""
    n = len(losses)
    if n < 2:
        return math.inf
    if clusters is None:
        return float(losses.std(ddof=1)) / math.sqrt(n)
    residuals = losses - losses.mean()
    _, index = np.unique(clusters, return_inverse=True)
    sums = np.bincount(index, weights=residuals)
    groups = len(sums)
    if groups < 2:
        return math.inf
    return math.sqrt(groups / (groups - 1) * float((sums ** 2).sum())) / n


def fit(trials: Iterable[Trial], total_steps: int, *, max_loss: float = 1.0, confidence: float = 0.95,
        min_trials: int = 20, whole_edges: Sequence[float] = WHOLE_EDGES,
        part_edges: Sequence[float] = PART_EDGES, clusters: Sequence[object] | None = None) -> Fit:
    """`clusters[r]`: the cluster of request r (e.g. its prompt text); None: every trial independent."""
    if not max_loss >= 0 or not math.isfinite(max_loss):
        raise ValueError(f"max_loss must be a finite number of points >= 0, not {max_loss}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), not {confidence}")
    z = NormalDist().inv_cdf(confidence)
    groups: dict[tuple[str, float, float, int], list[float]] = defaultdict(list)
    members: dict[tuple[str, float, float, int], list[object]] = defaultdict(list)
    for t in trials:
        edges = whole_edges if t.table == "whole" else part_edges
        lo = _bin_of(t.similarity, edges)
        blo = _bin_of(t.background_similarity, part_edges) if t.table == "composed" else 0.0
        if lo is None or blo is None:
            continue  # below every bin: never granted
        groups[(t.table, lo, blo, t.k)].append(t.loss)
        members[(t.table, lo, blo, t.k)].append(t.request if clusters is None else clusters[t.request])

    stats: list[BinStat] = []
    certified: dict[str, dict[tuple[float, float], int | None]] = {}
    for table in TABLES:
        edges = whole_edges if table == "whole" else part_edges
        cells = [(lo, hi, blo, bhi) for lo, hi in _bins(edges)
                 for blo, bhi in (_bins(part_edges) if table == "composed" else [(0.0, 0.0)])]
        certified[table] = {}
        for lo, hi, blo, bhi in cells:
            ks = sorted(k for (tb, a, b, k) in groups if (tb, a, b) == (table, lo, blo))
            best: int | None = None  # None: no evidence at any K
            passing = True
            for k in ks:
                losses = np.asarray(groups[(table, lo, blo, k)])
                n, mean = len(losses), float(losses.mean())
                se = standard_error(losses, np.asarray(members[(table, lo, blo, k)]))
                upper = mean + z * se
                within = n >= min_trials and upper <= max_loss
                stats.append(BinStat(table, lo, hi, blo, bhi, k, n, mean, 1.96 * se, upper, within))
                if n >= min_trials:
                    best = best or 0
                    if passing and within:
                        best = k
                    passing = passing and within
            certified[table][(lo, blo)] = best
    granted = {table: _monotone(cells) for table, cells in certified.items()}

    def tiers(table: str) -> tuple[tuple[float, float], ...]:
        out: list[tuple[float, float]] = []
        for (lo, _), k in sorted(granted[table].items(), reverse=True):
            if not k:
                continue
            if out and out[-1][1] == k / total_steps:
                out[-1] = (lo, out[-1][1])  # one K over adjacent bins: one tier from the lowest edge
            else:
                out.append((lo, k / total_steps))
        return tuple(out)

    composed = [(o, b, k / total_steps) for (o, b), k in granted["composed"].items() if k]
    composed = [c for c in composed if not any(d != c and d[0] <= c[0] and d[1] <= c[1] and d[2] >= c[2]
                                               for d in composed)]
    return Fit(total_steps, max_loss, confidence, tiers("whole"), tuple(sorted(composed, reverse=True)),
               tiers("partial_object"), tiers("partial_background"), tuple(stats),
               {t: {c: k or 0 for c, k in g.items()} for t, g in granted.items()})


def _monotone(cells: dict[tuple[float, float], int | None]) -> dict[tuple[float, float], int]:
    """The module docstring's two passes over one table's bins, keyed (low, background_low)."""
    known = {c: k for c, k in cells.items() if k is not None}
    out: dict[tuple[float, float], int] = {}
    for c in sorted(known, key=lambda c: (c[0] + c[1], c), reverse=True):  # most similar first
        out[c] = min([known[c], *(out[d] for d in out if d[0] >= c[0] and d[1] >= c[1])])
    for c in cells.keys() - known.keys():  # after the pass, so an unknown bin never outgrants a known one above it
        out[c] = max((out[d] for d in known if d[0] <= c[0] and d[1] <= c[1]), default=0)
    return out
