"""Ranking: a checked lookup -> the candidates a worker may start from, best first.

Contract: `Ranker.rank` answers a validate.LookupQuery with a Ranking:
- "hit": whole-prompt candidates, if any of the namespace's nearest "full" neighbours grants steps;
- else "composed": object donors and background donors, if both parts match, all granted the
  composite's steps (steps.composed_steps: never more than either part allows);
- else "partial": one part's donors alone, if only that part matches and the request accepts it
  (partial_roles), granted as the composite of the part with itself;
- else "miss", with why: "below_threshold" (neighbours, none close enough) or "empty_namespace".
Candidates come most granted steps first, then most similar. An intermediate latent (blob.step = K)
serves only requests granted at least K and grants exactly K, so the checkpoints of one prompt come
back largest usable K first, as NIRVANA picks them; donors of a composite must be clean latents
(step 0), because the worker rebuilds both parts at the composite's step, which only a clean latent
allows.

It only reads: the index's neighbours within the query's namespace (so a ranking never crosses
namespaces) and each neighbour's stored record. It counts nothing and changes nothing, so the cache
publishes the outcome and no lookup alters what is stored or how it is ranked for eviction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flexcache.v1 import cache_pb2 as pb

from .index import Neighbor, VectorIndex
from .steps import StepTable
from .store import Store
from .validate import LookupQuery

# Neighbours searched per candidate wanted: an intermediate latent may grant nothing at a similarity
# that would grant a clean one steps, so look a little deeper than top_k.
SEARCH_DEPTH = 5
WRITER_DEPTH = 4  # and this many times deeper when a lookup accepts only some writers' entries


@dataclass(frozen=True)
class Ranking:
    result: str  # "hit", "composed", "partial" or "miss" (the lookups metric's label)
    candidates: list[pb.Candidate] = field(default_factory=list)  # empty on a miss
    miss_reason: str = ""  # on a miss: "unknown_namespace", "empty_namespace" or "below_threshold"

    @classmethod
    def miss(cls, reason: str) -> Ranking:
        return cls("miss", miss_reason=reason)


class Ranker:
    def __init__(self, index: VectorIndex, store: Store, steps: StepTable):
        self._index = index
        self._store = store
        self._steps = steps

    def rank(self, query: LookupQuery) -> Ranking:
        neighbors = self._index.search(query.ns.key, "full", query.vectors["full"], limit=self._depth(query))
        whole = self._grantable(query, neighbors, query.top_k, pb.ROLE_FULL)
        if whole:
            return Ranking("hit", whole)
        parts = [role for role in ("object", "background") if role in query.vectors]
        if len(parts) == 2 or query.partial_roles & set(parts):
            donors = self._donors(query)
            if donors:
                roles = {c.role for c in donors}
                return Ranking("composed" if len(roles) == 2 else "partial", donors)
        return Ranking.miss("below_threshold" if neighbors else "empty_namespace")

    @staticmethod
    def _depth(query: LookupQuery) -> int:
        """Neighbours to search: deeper when only some writers may answer (the others are skipped after
        the search, which filters only on the namespace)."""
        return query.top_k * SEARCH_DEPTH * (WRITER_DEPTH if query.writers else 1)

    def _grantable(self, query: LookupQuery, neighbors: Sequence[Neighbor], limit: int,
                   role: int) -> list[pb.Candidate]:
        """The neighbours that grant steps in `role` (stored by one of the query's writers, if it names
        any), as at most `limit` candidates, best first."""
        ns, total_steps = query.ns, query.total_steps
        candidates: list[pb.Candidate] = []
        for neighbor in neighbors:  # most similar first
            similarity = min(1.0, max(-1.0, neighbor.similarity))
            granted = self._steps.granted_steps(similarity, total_steps, ns.name)
            # No later neighbour can grant more than this one's table value (the table is monotone) nor
            # be more similar: once `limit` candidates grant at least that much, the rest cannot rank.
            if not granted or (len(candidates) >= limit
                               and sorted(c.granted_steps for c in candidates)[-limit] >= granted):
                break
            header = self._store.record(neighbor.entry_id)
            if header is None:  # deleted since it was indexed; the next startup reconciles it
                continue
            if query.writers and header.writer not in query.writers:
                continue
            if header.blob.step:
                if role != pb.ROLE_FULL:
                    continue
                granted = header.blob.step if granted >= header.blob.step else 0
            if granted:
                candidate = pb.Candidate(entry_id=neighbor.entry_id, similarity=similarity, granted_steps=granted,
                                         role=role, blob=header.blob, prompt=header.prompt, writer=header.writer)
                if header.HasField("object_mask"):
                    candidate.object_mask.CopyFrom(header.object_mask)
                candidates.append(candidate)
        candidates.sort(key=lambda c: (c.granted_steps, c.similarity), reverse=True)  # stable for ties
        return candidates[:limit]

    def _donors(self, query: LookupQuery) -> list[pb.Candidate]:
        """Up to top_k object donors and top_k background donors, granted the composite's steps; when
        only one part matches and its role is in partial_roles, that part's donors, granted as a
        composite of the part with itself (the same cap: the client starts from them at the same K)."""
        def part_donors(role: str, enum: int) -> list[pb.Candidate]:
            if role not in query.vectors:
                return []
            neighbors = self._index.search(query.ns.key, role, query.vectors[role], limit=self._depth(query))
            return self._grantable(query, neighbors, query.top_k, enum)

        total_steps = query.total_steps
        objects, backgrounds = part_donors("object", pb.ROLE_OBJECT), part_donors("background", pb.ROLE_BACKGROUND)
        if objects and backgrounds:
            steps = self._steps.composed_steps(objects[0].granted_steps, backgrounds[0].granted_steps, total_steps)
        elif (objects and "object" in query.partial_roles) or (backgrounds and "background" in query.partial_roles):
            k = (objects or backgrounds)[0].granted_steps
            steps = self._steps.composed_steps(k, k, total_steps)
        else:
            return []
        if not steps:
            return []
        for candidate in objects + backgrounds:
            candidate.granted_steps = min(candidate.granted_steps, steps)
        return objects + backgrounds
