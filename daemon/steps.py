"""Similarity -> how many denoising steps a hit may skip: a namespace's step tables (docs/step_tables.md).

NIRVANA's table (for 50 steps: >=0.95 -> 25, >=0.90 -> 20, >=0.85 -> 15, >=0.75 -> 10, >=0.65 -> 5)
is kept as fractions of the total, so a 30-step namespace gets 15, 12, 9, 6, 3. Namespaces can
override the table by a glob over their name (the flags, `StepTable`), or have tables of their own,
set at run time and adjusted by the online quality guard (`TableRegistry`, quality.py).

A namespace's `Tables` are four lists: `whole` (a whole-prompt hit, by its similarity), `composed`
(an object donor of one entry and a background donor of another, by both similarities), and
`partial_object` / `partial_background` (one part's donor alone). Every grant is a fraction of the
namespace's total steps N: K = round(fraction x N), at most N - 1. Every list is monotone (a tier
that asks for more similarity never grants less), which ranking relies on: a less similar neighbour
never grants more, so a search can stop at the first that grants nothing.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire

from .errors import InvalidRequest

log = logging.getLogger(__name__)

Thresholds = tuple[tuple[float, float], ...]  # (min similarity, fraction of steps), best first
Composed = tuple[tuple[float, float, float], ...]  # (min object similarity, min background similarity, fraction)
TIER_TABLES = ("whole", "partial_object", "partial_background")  # lists of (min similarity, fraction)
TABLES = wire.STEP_TABLES  # every list, as QualitySample.table names it
decimal, steps_of = wire.decimal, wire.steps_of  # the rules both sides of the wire apply
MAX_TIERS = 64  # tiers per list a SetStepTables may send


def tier_of(table: Thresholds, similarity: float) -> int | None:
    """The tier that grants `similarity`: the first (highest) whose minimum it meets; None below all."""
    return next((i for i, (minimum, _) in enumerate(table) if similarity >= minimum), None)


def composed_tier_of(table: Composed, object_similarity: float, background_similarity: float) -> int | None:
    """The tier that grants a composite: of those whose both minima it meets, the one granting the
    largest fraction (the first of equals); None if it meets none."""
    best: int | None = None
    for i, (min_object, min_background, fraction) in enumerate(table):
        if object_similarity >= min_object and background_similarity >= min_background and (
                best is None or fraction > table[best][2]):
            best = i
    return best


def derive_composed(whole: Thresholds, cap: float) -> Composed:
    """The composed table the flags imply: for each pair of whole tiers i, j, (sim_i, sim_j,
    min(f_i, f_j, cap)), so a composite gets no more than either part would as a whole prompt, and at
    most `cap` (composed_max_fraction, the daemon's default 0.1). A composed start costs prompt
    fidelity against sampling from scratch, and the cost grows fast with K; the default cap is the
    largest K of the reference model's tested ones whose cost stays within the 2 points a composed hit
    may cost (measured in docs/bench_composed.md)."""
    return tuple((s_i, s_j, min(f_i, f_j, cap)) for (s_i, f_i), (s_j, f_j) in itertools.product(whole, whole))


def derive_partial(whole: Thresholds, cap: float) -> Thresholds:
    """A partial table the flags imply: the whole table capped at `cap`, as a composite of the part
    with itself."""
    return tuple((s, min(f, cap)) for s, f in whole)


@dataclass(frozen=True)
class Tables:
    """One namespace's step tables (the module docstring has the contract). `max_loss`: the quality
    budget the guard holds the namespace to, in points; 0: the daemon's guard_max_loss."""

    whole: Thresholds
    composed: Composed
    partial_object: Thresholds
    partial_background: Thresholds
    max_loss: float = 0.0

    @classmethod
    def from_whole(cls, whole: Thresholds, cap: float, max_loss: float = 0.0) -> Tables:
        return cls(whole, derive_composed(whole, cap), derive_partial(whole, cap), derive_partial(whole, cap),
                   max_loss)

    def whole_steps(self, similarity: float, total_steps: int) -> int:
        """Steps K a whole-prompt match may skip; 0 is a miss."""
        tier = tier_of(self.whole, similarity)
        return 0 if tier is None else steps_of(self.whole[tier][1], total_steps)

    def composed_steps(self, object_similarity: float, background_similarity: float, total_steps: int) -> int:
        tier = composed_tier_of(self.composed, object_similarity, background_similarity)
        return 0 if tier is None else steps_of(self.composed[tier][2], total_steps)

    def partial_steps(self, role: str, similarity: float, total_steps: int) -> int:
        """A partial hit's K: `role`'s ("object", "background") partial table at its donor's similarity."""
        table = self.partial_object if role == "object" else self.partial_background
        tier = tier_of(table, similarity)
        return 0 if tier is None else steps_of(table[tier][1], total_steps)

    def part_steps(self, role: str, similarity: float, total_steps: int, partial: bool) -> int:
        """What a donor of one part could grant: the composed table's marginal for that part (its grant
        with the other part at similarity 1), or, when the request accepts the part alone (`partial`),
        that part's partial table if it grants more. 0: the donor is of no use."""
        other = 1.0
        marginal = (self.composed_steps(similarity, other, total_steps) if role == "object"
                    else self.composed_steps(other, similarity, total_steps))
        return max(marginal, self.partial_steps(role, similarity, total_steps)) if partial else marginal

    def list_of(self, table: str) -> tuple[tuple[float, ...], ...]:
        return getattr(self, table)

    def with_fractions(self, table: str, fractions: Sequence[float]) -> Tables:
        """These tables with `table`'s fractions replaced (same tiers, same minima)."""
        tiers = [(*tier[:-1], fraction) for tier, fraction in zip(self.list_of(table), fractions, strict=True)]
        return replace(self, **{table: tuple(tiers)})

    def same_shape(self, other: Tables) -> bool:
        """The same tiers (minima), whatever their fractions: the guard's tables of the same set ones."""
        return all([t[:-1] for t in self.list_of(n)] == [t[:-1] for t in other.list_of(n)] for n in TABLES)

    # ---- the wire and the store ----
    def to_proto(self) -> pb.StepTables:
        return wire.step_tables(self.whole, self.composed, self.partial_object, self.partial_background,
                                self.max_loss)

    def to_json(self) -> dict[str, object]:
        return wire.step_tables_json(self.whole, self.composed, self.partial_object, self.partial_background,
                                     self.max_loss)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Tables:
        return cls(*wire.step_table_lists_json(data, required=True))


def checked(message: pb.StepTables, cap: float, max_tiers: int = MAX_TIERS) -> Tables:
    """A SetStepTables' tables, checked (InvalidRequest naming the tier that breaks a rule): finite
    numbers, similarities in [-1, 1], fractions in [0, 1), at most `max_tiers` tiers a list, whole and
    partial lists best first (strictly decreasing minima), every list monotone, max_loss finite and at
    least 0. An empty composed or partial list is derived from the whole table as the flags' are
    (`cap`: composed_max_fraction)."""
    if not message.whole:
        raise InvalidRequest("tables.whole needs at least one tier (a tier with fraction 0 grants nothing)")
    lists: dict[str, tuple] = {}
    for name in TABLES:
        tiers = getattr(message, name)
        if len(tiers) > max_tiers:
            raise InvalidRequest(f"tables.{name} has {len(tiers)} tiers, above {max_tiers}")
        rows = []
        for i, tier in enumerate(tiers):
            minima = ((tier.min_object_similarity, tier.min_background_similarity) if name == "composed"
                      else (tier.min_similarity,))
            where = f"tables.{name}[{i}]"
            if not all(math.isfinite(v) for v in (*minima, tier.fraction)):
                raise InvalidRequest(f"{where} has a NaN or infinite value")
            if not all(-1.0 <= v <= 1.0 for v in minima):
                got = ", ".join(f"{v:g}" for v in minima)
                raise InvalidRequest(f"{where}: similarities must be in [-1, 1], got {got}")
            if not 0.0 <= tier.fraction < 1.0:
                raise InvalidRequest(f"{where}: the fraction must be in [0, 1), got {tier.fraction:g}")
            rows.append((*(decimal(v) for v in minima), decimal(tier.fraction)))
        lists[name] = tuple(rows)
    for name in TIER_TABLES:
        for i, ((hi, f_hi), (lo, f_lo)) in enumerate(itertools.pairwise(lists[name])):
            if hi <= lo:
                raise InvalidRequest(f"tables.{name}[{i + 1}] (min_similarity {lo:g}) must ask for less than the "
                                     f"tier before it ({hi:g}): tiers go best first")
            if f_hi < f_lo:
                raise InvalidRequest(f"tables.{name}[{i + 1}] grants more ({f_lo:g}) than tables.{name}[{i}] "
                                     f"({f_hi:g}), which asks for more similarity: the table must be monotone")
    composed = lists["composed"]
    for (i, a), (j, b) in itertools.permutations(enumerate(composed), 2):
        if a[0] >= b[0] and a[1] >= b[1] and a[2] < b[2]:
            raise InvalidRequest(f"tables.composed[{j}] grants more ({b[2]:g}) than tables.composed[{i}] ({a[2]:g}), "
                                 "which asks for at least as much similarity of both parts: the table must be monotone")
    if not (math.isfinite(message.max_loss) and message.max_loss >= 0):
        raise InvalidRequest(f"tables.max_loss must be a number of at least 0 (0: the daemon's guard_max_loss), "
                             f"got {message.max_loss:g}")
    whole = lists["whole"]
    return Tables(whole, composed or derive_composed(whole, cap),
                  lists["partial_object"] or derive_partial(whole, cap),
                  lists["partial_background"] or derive_partial(whole, cap), decimal(message.max_loss))


class StepTable:
    """The flags' tables: `default` (skip_thresholds), `overrides` by glob over the namespace's name
    (skip_thresholds_by_namespace), composed and partial tables derived with `composed_max_fraction`."""

    def __init__(self, default: Thresholds, overrides: Mapping[str, Thresholds] | None = None,
                 composed_max_fraction: float = 1.0):
        self._default = default
        self._overrides = dict(overrides or {})
        self.composed_max_fraction = composed_max_fraction
        self._derived: dict[Thresholds, Tables] = {}  # one per distinct thresholds: bounded by the flags

    def thresholds_for(self, namespace_name: str) -> Thresholds:
        for pattern, table in self._overrides.items():
            if fnmatch.fnmatchcase(namespace_name, pattern):
                return table
        return self._default

    def tables_for(self, namespace_name: str) -> Tables:
        whole = self.thresholds_for(namespace_name)
        tables = self._derived.get(whole)
        if tables is None:
            tables = self._derived.setdefault(whole, Tables.from_whole(whole, self.composed_max_fraction))
        return tables

    def granted_steps(self, similarity: float, total_steps: int, namespace_name: str) -> int:
        """Steps K a whole-prompt match may skip by the flags; 0 is a miss."""
        return self.tables_for(namespace_name).whole_steps(similarity, total_steps)


@dataclass(frozen=True)
class Entry:
    """A namespace's own tables: `admin` (None: the flags') set last, what the guard may give back up
    to; `current`, what lookups use (the guard's changes of `admin`, or of the flags')."""

    name: str
    admin: Tables | None
    current: Tables


@dataclass(frozen=True)
class Versioned:
    """A namespace's tables as a version of them: `entry` None is a reset (back to the flags), kept so
    that it wins over older tables still on a member that missed it."""

    name: str
    entry: Entry | None
    version: int


class TableRegistry:
    """The tables every namespace's lookups use: its own (`Entry`, set by SetStepTables or changed by
    the guard) or else the flags'. Reads take no lock (a dict read); changes are persisted through
    `persist(ns_key, value)` before they take effect, under the registry's own lock, never the
    cache's.

    Every change of a namespace's tables, a reset included, has a version: at the member that makes
    it, the time in nanoseconds, and above every earlier version of the namespace there (a clock that
    went back still orders them). A cluster member keeps a copy of another's change only if it is
    newer than its own (`offer`), so the newest change of each namespace wins on every member, in
    whatever order copies and repair passes bring it (docs/step_tables.md, "In a cluster")."""

    def __init__(self, flags: StepTable, persist: Callable[[str, bytes], None]):
        self.flags = flags
        self._persist = persist
        self._own: dict[str, Entry] = {}
        self._versions: dict[str, Versioned] = {}  # every namespace with a change, resets included
        self.lock = threading.Lock()  # held by whoever changes a namespace's entry (quality.py too)

    def load(self, stored: Mapping[str, bytes]) -> None:
        """The entries persisted by an earlier run (store.step_tables). Guard changes of flags that have
        changed since (other tiers) are dropped: the new flags apply."""
        for ns_key, raw in stored.items():
            try:
                data = json.loads(raw)
                admin = Tables.from_json(data["admin"]) if data["admin"] is not None else None
                current = Tables.from_json(data["current"]) if data["current"] is not None else None
                version = int(data.get("version", 0))
            except (ValueError, KeyError, TypeError) as exc:  # a damaged value: that namespace uses the flags
                log.error("step tables of namespace key %s are unreadable (%s): the flags' apply", ns_key, exc)
                continue
            entry = None if current is None else Entry(data["name"], admin, current)
            if entry is not None and not current.same_shape(admin or self.flags.tables_for(data["name"])):
                entry = None
            self._versions[ns_key] = Versioned(data["name"], entry, version)
            if entry is not None:
                self._own[ns_key] = entry

    def tables(self, ns_key: str, name: str) -> Tables:
        own = self._own.get(ns_key)
        return own.current if own is not None else self.flags.tables_for(name)

    def base(self, ns_key: str, name: str) -> Tables:
        """The tables last set (by an admin, else the flags'): the most the guard gives back."""
        own = self._own.get(ns_key)
        return own.admin if own is not None and own.admin is not None else self.flags.tables_for(name)

    def source(self, ns_key: str) -> str:
        """"guard" while the guard's changes apply, else "admin" (set tables) or "flags"."""
        own = self._own.get(ns_key)
        if own is None:
            return "flags"
        if own.current != (own.admin or self.flags.tables_for(own.name)):
            return "guard"
        return "admin" if own.admin is not None else "flags"

    def put(self, ns_key: str, name: str, entry: Entry | None, version: int = 0) -> int:
        """Persist then use `entry` (None, or the flags' tables unchanged: the namespace goes back to the
        flags) as version `version` (0: a change made here, versioned now). Returns the version. Under
        `lock`."""
        if entry is not None and entry.admin is None and entry.current == self.flags.tables_for(entry.name):
            entry = None
        if not version:
            known = self._versions.get(ns_key)
            version = max(time.time_ns(), (known.version if known else 0) + 1)
        value = {"name": name, "admin": entry.admin.to_json() if entry and entry.admin else None,
                 "current": entry.current.to_json() if entry else None, "version": version}
        self._persist(ns_key, json.dumps(value).encode())
        self._versions[ns_key] = Versioned(name, entry, version)
        if entry is None:
            self._own.pop(ns_key, None)
        else:
            self._own[ns_key] = entry
        return version

    def offer(self, ns_key: str, name: str, entry: Entry | None, version: int) -> bool:
        """Another member's version of the namespace's tables: kept (as `put`) if newer than this one's,
        or unversioned (0); whether it was kept. Under `lock`."""
        known = self._versions.get(ns_key)
        if version and known is not None and version <= known.version:
            return False
        self.put(ns_key, name, entry, version)
        return True

    def version(self, ns_key: str) -> int:
        known = self._versions.get(ns_key)
        return known.version if known else 0

    def versions(self) -> dict[str, Versioned]:
        """Every namespace's latest change (resets included), by namespace key. Under `lock`."""
        return dict(self._versions)

    def entry(self, ns_key: str) -> Entry | None:
        return self._own.get(ns_key)
