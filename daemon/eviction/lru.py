"""Least recently used: the baseline every cache is compared against."""

from __future__ import annotations

from ..entries import Usage
from .base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def score(self, usage: Usage) -> float:
        return usage.last_access
