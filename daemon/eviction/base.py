"""The replacement-policy interface: rank entries for eviction from their Usage records.

A policy only scores entries; the lowest score is evicted first, ties going to the least recently
used. Usage itself (hits, steps saved, decayed credit) is updated in one place, by the cache, and
shared by reference, so a policy never needs notifying of a hit, and switching policy after a
restart needs no migration: every policy rebuilds its state from the persisted Usage records.
Ranking is computed on demand because eviction runs in batches (from the high to the low watermark),
over every entry or over a subset (`among`: one tenant's entries when it is over tenant_max_bytes, the
tenants over their fair share of the budget); the order within a subset is the order those entries
have among all, so restricting a pass to some entries never changes how the policy ranks them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from ..entries import Usage


class EvictionPolicy(ABC):
    name: str

    def __init__(self) -> None:
        self._usage: dict[str, Usage] = {}

    def add(self, entry_id: str, usage: Usage) -> None:
        self._usage[entry_id] = usage

    def remove(self, entry_id: str) -> None:
        self._usage.pop(entry_id, None)

    @abstractmethod
    def score(self, usage: Usage) -> float:
        """An entry's value; lower is evicted first."""

    def victims(self, among: Iterable[str] | None = None) -> list[str]:
        """Entry ids, first to evict first: every entry the policy tracks, or those of `among` it tracks
        (ids it does not track are left out)."""
        usage = self._usage
        items = usage.items() if among is None else [(eid, usage[eid]) for eid in among if eid in usage]
        ranked = sorted(items, key=lambda item: (self.score(item[1]), item[1].last_access))
        return [entry_id for entry_id, _ in ranked]
