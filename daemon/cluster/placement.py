"""Where an entry lives: rendezvous (highest-random-weight) hashing of its id over the members' node ids.

Every node computes the same answer from the same member list, with no table to agree on. Each member
scores each entry by a hash of (node id, entry id); the entry's owners are the `copies` highest scores.
A member that joins takes, from every other, only the entries it now scores highest for: about 1/N of
them move when the cluster grows to N, and a member that leaves hands its entries to the next-highest
scorers only. Node ids, not addresses, are hashed: a pod that comes back with a new IP owns what it
owned before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _score(node_id: str, entry_id: str) -> bytes:
    return hashlib.blake2b(f"{node_id}\0{entry_id}".encode(), digest_size=8).digest()


def ranked(entry_id: str, members: Iterable[str]) -> list[str]:
    """Every member, the entry's first owner first: owners are a prefix, and a put that cannot reach an
    owner tries the next in this order."""
    return sorted(set(members), key=lambda node_id: _score(node_id, entry_id), reverse=True)


def owners(entry_id: str, members: Iterable[str], copies: int) -> list[str]:
    """The `copies` members that hold the entry (all of them, if there are fewer)."""
    return ranked(entry_id, members)[:copies]
