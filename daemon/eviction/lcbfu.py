"""LCBFU, NIRVANA's policy: evict the lowest hits x K/N first.

An entry's score is the sum over its hits of granted_steps / total_steps. For a NIRVANA row, which
stores one intermediate latent at step K and grants K on every hit, that is exactly hits x K/N; for
a store-once entry, whose granted K varies with similarity, it credits each hit with what it saved.
"""

from __future__ import annotations

from ..entries import Usage
from .base import EvictionPolicy


class LCBFUPolicy(EvictionPolicy):
    name = "lcbfu"

    def score(self, usage: Usage) -> float:
        return sum(usage.steps_saved.values()) / usage.total_steps
