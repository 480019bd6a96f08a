"""The replacement-policy interface: rank entries for eviction from their Usage records.

A policy only scores entries; the lowest score is evicted first, ties going to the least recently
used. Usage itself (hits, steps saved, decayed credit) is updated in one place, by the cache, and
shared by reference, so a policy never needs notifying of a hit, and switching policy after a
restart needs no migration: every policy rebuilds its state from the persisted Usage records.
Ranking is computed on demand because eviction runs in batches (from the high to the low watermark).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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

    def victims(self) -> list[str]:
        """Entry ids, first to evict first."""
        ranked = sorted(self._usage.items(), key=lambda item: (self.score(item[1]), item[1].last_access))
        return [entry_id for entry_id, _ in ranked]
