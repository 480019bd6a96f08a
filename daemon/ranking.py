"""Ranking: a checked lookup -> the candidates a worker may start from, best first.

Contract: `Ranker.rank` answers a validate.LookupQuery with a Ranking, by the namespace's step tables
(steps.Tables: its own, or the flags'):
- "hit": whole-prompt candidates, if any of the namespace's nearest "full" neighbours grants steps by
  the whole table;
- else "composed": object donors and background donors, if both parts have donors and the composed
  table grants the best pair's similarities steps; every donor is granted at most that;
- else "partial": one part's donors alone, if the request accepts that part alone (partial_roles) and
  its partial table grants the best donor's similarity steps (the object's first, when both could);
- else "miss", with why: "below_threshold" (neighbours, none close enough) or "empty_namespace".
A part's donor qualifies when its similarity could grant something (Tables.part_steps: the composed
table's marginal for that part, or its partial table when the request accepts the part alone).
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
from flexcache.v1 import wire

from .index import Neighbor, VectorIndex
from .steps import TableRegistry, Tables
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


@dataclass
class Gathered:
    """What one node's index and store offer a query, before the rule that picks the answer (`decide`):
    whole-prompt candidates that grant steps (at most top_k, best first); if there are none, the object
    and background donors, each with its own part's grant (not yet capped to the composite's). Several
    nodes' Gathered merge (`merge`) into what one node holding all their entries would have gathered,
    which is how a cluster ranks (daemon/cluster/)."""

    full: list[pb.Candidate] = field(default_factory=list)
    objects: list[pb.Candidate] = field(default_factory=list)
    backgrounds: list[pb.Candidate] = field(default_factory=list)
    neighbors: bool = False  # the whole-prompt search found any neighbour at all
    known: bool = True  # the node holds the namespace

    def to_response(self) -> pb.LookupResponse:
        """On the wire (NodeService.Gather): the candidates with their roles; miss_reason says whether
        there were neighbours ("below_threshold") or none ("empty_namespace", "unknown_namespace")."""
        reason = "below_threshold" if self.neighbors else "empty_namespace" if self.known else "unknown_namespace"
        return pb.LookupResponse(candidates=self.full + self.objects + self.backgrounds, miss_reason=reason)

    @classmethod
    def from_response(cls, response: pb.LookupResponse) -> Gathered:
        by_role: dict[int, list[pb.Candidate]] = {pb.ROLE_FULL: [], pb.ROLE_OBJECT: [], pb.ROLE_BACKGROUND: []}
        for candidate in response.candidates:
            by_role.setdefault(candidate.role, []).append(candidate)
        return cls(by_role[pb.ROLE_FULL], by_role[pb.ROLE_OBJECT], by_role[pb.ROLE_BACKGROUND],
                   neighbors=bool(by_role[pb.ROLE_FULL]) or response.miss_reason == "below_threshold",
                   known=response.miss_reason != "unknown_namespace")


def _best(candidates: list[pb.Candidate], limit: int) -> list[pb.Candidate]:
    """At most `limit` distinct entries, most granted steps first, then most similar (as `_grantable`)."""
    unique = {c.entry_id: c for c in sorted(candidates, key=lambda c: c.similarity)}  # the most similar copy wins
    return sorted(unique.values(), key=lambda c: (c.granted_steps, c.similarity), reverse=True)[:limit]


def merge(query: LookupQuery, parts: Sequence[Gathered]) -> Gathered:
    """Several nodes' answers as one node holding all their entries would have gathered them: the best
    top_k of each role, an entry held by several nodes counted once. Whole-prompt candidates anywhere win
    over donors (a node that had some did not look for donors)."""
    full = _best([c for p in parts for c in p.full], query.top_k)
    return Gathered(full, [] if full else _best([c for p in parts for c in p.objects], query.top_k),
                    [] if full else _best([c for p in parts for c in p.backgrounds], query.top_k),
                    neighbors=any(p.neighbors for p in parts), known=any(p.known for p in parts))


def decide(query: LookupQuery, gathered: Gathered, tables: Tables) -> Ranking:
    """The answer `Ranker.rank` documents, from what was gathered (on one node or merged from several),
    by the namespace's `tables`."""
    if gathered.full:
        return Ranking("hit", gathered.full[:query.top_k])
    if not gathered.known:
        return Ranking.miss("unknown_namespace")
    objects, backgrounds = gathered.objects, gathered.backgrounds
    total_steps = query.total_steps
    k = 0
    if objects and backgrounds:
        k = tables.composed_steps(objects[0].similarity, backgrounds[0].similarity, total_steps)
    if k:
        result, donors = "composed", objects + backgrounds
    else:
        result, donors = "partial", []
        for role, found in (("object", objects), ("background", backgrounds)):
            if found and role in query.partial_roles:
                k = tables.partial_steps(role, found[0].similarity, total_steps)
                if k:
                    donors = found
                    break
    if not k:
        return Ranking.miss("below_threshold" if gathered.neighbors else "empty_namespace")
    for candidate in donors:
        candidate.granted_steps = min(candidate.granted_steps, k)
    return Ranking(result, donors)


class Ranker:
    def __init__(self, index: VectorIndex, store: Store, registry: TableRegistry):
        self._index = index
        self._store = store
        self._registry = registry

    def tables(self, query: LookupQuery) -> Tables:
        return self._registry.tables(query.ns.key, query.ns.name)

    def rank(self, query: LookupQuery) -> Ranking:
        return decide(query, self.gather(query), self.tables(query))

    def gather(self, query: LookupQuery) -> Gathered:
        """This node's candidates (`Gathered`); donors are searched only when no whole-prompt candidate
        grants steps and the request could use them."""
        neighbors = self._index.search(query.ns.key, "full", query.vectors["full"], limit=self._depth(query))
        whole = self._grantable(query, neighbors, query.top_k, pb.ROLE_FULL)
        if whole:
            return Gathered(whole, neighbors=True)
        parts = [role for role in ("object", "background") if role in query.vectors]
        objects: list[pb.Candidate] = []
        backgrounds: list[pb.Candidate] = []
        if len(parts) == 2 or query.partial_roles & set(parts):
            objects, backgrounds = self._part_donors(query, "object"), self._part_donors(query, "background")
        return Gathered([], objects, backgrounds, neighbors=bool(neighbors))

    @staticmethod
    def _depth(query: LookupQuery) -> int:
        """Neighbours to search: deeper when only some writers may answer (the others are skipped after
        the search, which filters only on the namespace)."""
        return query.top_k * SEARCH_DEPTH * (WRITER_DEPTH if query.writers else 1)

    def _grantable(self, query: LookupQuery, neighbors: Sequence[Neighbor], limit: int,
                   role: int) -> list[pb.Candidate]:
        """The neighbours that grant steps in `role` (stored by one of the query's writers, if it names
        any), as at most `limit` candidates, best first."""
        tables, total_steps = self.tables(query), query.total_steps
        part = wire.ROLE_BY_ENUM[role] if role != pb.ROLE_FULL else ""
        candidates: list[pb.Candidate] = []
        for neighbor in neighbors:  # most similar first
            similarity = min(1.0, max(-1.0, neighbor.similarity))
            granted = (tables.part_steps(part, similarity, total_steps, part in query.partial_roles) if part
                       else tables.whole_steps(similarity, total_steps))
            # No later neighbour can grant more than this one's table value (the table is monotone) nor
            # be more similar: once `limit` candidates grant at least that much, the rest cannot rank.
            if not granted or (len(candidates) >= limit
                               and sorted(c.granted_steps for c in candidates)[-limit] >= granted):
                break
            header = self._store.record(neighbor.entry_id)
            if header is None and neighbor.record:  # a shared index: another daemon holds the entry
                header = pb.PutHeader.FromString(neighbor.record)
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

    def _part_donors(self, query: LookupQuery, role: str) -> list[pb.Candidate]:
        """Up to top_k donors of one part (clean latents only), each with its own grant."""
        if role not in query.vectors:
            return []
        neighbors = self._index.search(query.ns.key, role, query.vectors[role], limit=self._depth(query))
        enum = pb.ROLE_OBJECT if role == "object" else pb.ROLE_BACKGROUND
        return self._grantable(query, neighbors, query.top_k, enum)
