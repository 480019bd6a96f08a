"""Similarity -> how many denoising steps a hit may skip (a whole-prompt match, or a composite).

NIRVANA's table (for 50 steps: >=0.95 -> 25, >=0.90 -> 20, >=0.85 -> 15, >=0.75 -> 10, >=0.65 -> 5)
is kept as fractions of the total, so a 30-step namespace gets 15, 12, 9, 6, 3. Namespaces can
override the table by a glob over their name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

Thresholds = tuple[tuple[float, float], ...]  # (min similarity, fraction of steps), best first


class StepTable:
    def __init__(self, default: Thresholds, overrides: Mapping[str, Thresholds] | None = None,
                 composed_max_fraction: float = 1.0):
        self._default = default
        self._overrides = dict(overrides or {})
        self._composed_max_fraction = composed_max_fraction

    def thresholds_for(self, namespace_name: str) -> Thresholds:
        for pattern, table in self._overrides.items():
            if fnmatch.fnmatchcase(namespace_name, pattern):
                return table
        return self._default

    def granted_steps(self, similarity: float, total_steps: int, namespace_name: str) -> int:
        """Steps K a worker may skip; 0 is a miss."""
        for min_similarity, fraction in self.thresholds_for(namespace_name):
            if similarity >= min_similarity:
                return max(0, min(total_steps - 1, round(fraction * total_steps)))
        return 0

    def composed_steps(self, object_steps: int, background_steps: int, total_steps: int) -> int:
        """Steps a composite of two donors may skip: no more than either part allows, and at most
        `composed_max_fraction` of the total (the daemon's default 0.1). On the reference model a
        composed start cost 0.8 points of prompt fidelity against sampling from scratch at K = 5 of
        50, 3.8 at K = 10 and 9.7 at K = 20 (900 paired requests, docs/bench_composed.md): the gap
        grows fast with K, and only K = 5 keeps it within the 2 points a composed hit may cost.
        A partial hit (one part's donor alone) is granted as the composite of that part with itself
        (an object donor alone cost 1.4 points at K = 5, a background donor alone 2.8)."""
        cap = round(self._composed_max_fraction * total_steps)
        return max(0, min(object_steps, background_steps, cap, total_steps - 1))
