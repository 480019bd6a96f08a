"""FlexCache's policy: evict the entry that saves the least GPU time per stored byte.

An entry's credit is the denoising steps it saved, counted per role (full match, object donor,
background donor, each weighted by how much of the latent it supplied), decayed exponentially with
age, plus a small prior for new entries so that they get a chance to be used. The cache maintains
the credit in Usage.log2_credit; the score is credit per byte, in log2.
"""

from __future__ import annotations

import math

from ..entries import Usage
from .base import EvictionPolicy


class UtilityPolicy(EvictionPolicy):
    name = "utility"

    def score(self, usage: Usage) -> float:
        return usage.log2_credit - math.log2(max(usage.size, 1))
