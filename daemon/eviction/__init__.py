"""Pluggable replacement policies; the daemon picks one by name (config `eviction_policy`)."""

from __future__ import annotations

from .base import EvictionPolicy
from .lcbfu import LCBFUPolicy
from .lru import LRUPolicy
from .utility import UtilityPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (LRUPolicy, LCBFUPolicy, UtilityPolicy)}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()
