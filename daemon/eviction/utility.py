"""FlexCache's policy: evict the entry that saves the least GPU time per stored byte.

An entry's credit is the denoising steps it saved, counted per role (full match, object donor,
background donor, each weighted by how much of the latent it supplied), plus a small prior for new
entries so that they get a chance to be used, decayed exponentially as the cache turns over: credit
halves each time new entries worth `utility_half_life` x max_bytes have been stored (Cache.clock).
The cache maintains the credit in Usage.log2_credit; the score is credit per byte, in log2.

Why turnovers and not seconds: a half-life in seconds means a different policy at every request
rate. With the old one hour against a 10 % cache that a replay refills in seconds, recent credit
counted no more than old, and among entries of equal credit a few bytes of prompt length decided
the order instead of recency: 40.9 % hit rate against LCBFU's 45.5 % on the Zipf trace at 10 %.
Why 2 turnovers (the default), from a sweep with `bench/bench_traces.py --utility-half-life H`:
shorter forgets a static Zipf's frequencies (at 1: 7 % fewer steps saved than LCBFU at the 5 %
budget), longer keeps yesterday's trends when popularity shifts (at 4 and 8: no better than LCBFU).
At 2 (docs/bench_traces.md): 0.95-1.03x the steps saved of the better of LRU and LCBFU on static
and repeat-free traces, 1.03-1.04x when popularity is reshuffled.
"""

from __future__ import annotations

import math

from ..entries import Usage
from .base import EvictionPolicy


class UtilityPolicy(EvictionPolicy):
    name = "utility"

    def score(self, usage: Usage) -> float:
        return usage.log2_credit - math.log2(max(usage.size, 1))
