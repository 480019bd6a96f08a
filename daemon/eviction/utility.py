"""FlexCache's policy: evict the entry that saves the least GPU time per stored byte.

An entry's credit is the denoising steps it saved, counted per role (full match, object donor,
background donor, each weighted by how much of the latent it supplied), plus a small prior for new
entries so that they get a chance to be used, decayed exponentially as the cache turns over: credit
halves each time new entries worth `utility_half_life` x max_bytes have been stored (Cache.clock).
The cache maintains the credit in Usage.log2_credit; the score is credit per byte, in log2.

Why turnovers and not seconds: a half-life in seconds means a different policy at every request
rate. Against a cache that a replay refills in seconds, a fixed wall-clock half-life lets recent
credit count no more than old, and among entries of equal credit a few bytes of prompt length, not
recency, decide the order. Why 2 turnovers (the default): a shorter half-life forgets a static
popularity's frequencies, a longer one keeps yesterday's trends when popularity shifts; 2 was chosen
by sweeping `bench/bench_traces.py --utility-half-life H` against LRU and LCBFU on static, shifting
and repeat-free traces (measured in docs/decisions.md).
"""

from __future__ import annotations

import math

from ..entries import Usage
from .base import EvictionPolicy


class UtilityPolicy(EvictionPolicy):
    name = "utility"

    def score(self, usage: Usage) -> float:
        return usage.log2_credit - math.log2(max(usage.size, 1))
