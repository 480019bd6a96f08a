"""A namespace's step tables and quality samples as the client speaks them (docs/step_tables.md).

`StepTables` is what CacheBase.step_tables / set_step_tables / reset_step_tables answer and what
set_step_tables sends; `QualitySample` is one paired quality loss a worker reports (report_quality).
Both are frozen and convert to and from the wire (cache.proto's StepTables, QualitySample). Every
grant is a fraction of the namespace's total steps N: K = round(fraction x N), at most N - 1, the
rule the daemon applies (`grant`, `composed_grant`), so a calibration tool can say what a table grants
without asking the daemon. No torch, no daemon code.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire

Tier = tuple[float, float]  # (min similarity, fraction of total steps)
ComposedTier = tuple[float, float, float]  # (min object similarity, min background similarity, fraction)
TABLES = wire.STEP_TABLES  # QualitySample.table values
steps_of = wire.steps_of  # K for a fraction of N: round(fraction x N), at most N - 1


@dataclass(frozen=True)
class GuardBin:
    """The guard's running figures of one tier (output only): samples at its current grant."""

    table: str
    tier: int
    granted_steps: int
    samples: int
    mean_loss: float
    upper_bound: float
    lower_bound: float = 0.0


@dataclass(frozen=True)
class StepTables:
    """A namespace's tables: `whole` best (highest similarity) first; `composed`, whose grant is the
    largest fraction of the tiers whose both minima a composite meets; `partial_object` and
    `partial_background`, a partial hit from one part's donor alone; `max_loss`, the quality budget in
    points the daemon's guard holds the namespace to (0: the daemon's guard_max_loss). An empty
    composed or partial list sent with set_step_tables is derived by the daemon from `whole`.
    Output only: `source` ("flags", "admin" or "guard"), the guard's `bins` and `guard_changes`."""

    whole: tuple[Tier, ...]
    composed: tuple[ComposedTier, ...] = ()
    partial_object: tuple[Tier, ...] = ()
    partial_background: tuple[Tier, ...] = ()
    max_loss: float = 0.0
    source: str = ""
    bins: tuple[GuardBin, ...] = ()
    guard_changes: int = 0

    def grant(self, similarity: float, total_steps: int, table: str = "whole") -> int:
        """Steps K the `table` ("whole", "partial_object" or "partial_background") grants a similarity."""
        tiers: tuple[Tier, ...] = getattr(self, table)
        fraction = next((f for minimum, f in tiers if similarity >= minimum), None)
        return 0 if fraction is None else steps_of(fraction, total_steps)

    def composed_grant(self, object_similarity: float, background_similarity: float, total_steps: int) -> int:
        """Steps K a composite of donors at these similarities is granted."""
        met = [f for o, b, f in self.composed if object_similarity >= o and background_similarity >= b]
        return steps_of(max(met), total_steps) if met else 0

    def to_proto(self) -> pb.StepTables:
        return wire.step_tables(self.whole, self.composed, self.partial_object, self.partial_background,
                                self.max_loss)

    def to_json(self) -> dict[str, object]:
        """The tables as flexcache-calibrate writes them (tables.json): the four lists and max_loss."""
        return wire.step_tables_json(self.whole, self.composed, self.partial_object, self.partial_background,
                                     self.max_loss)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> StepTables:
        """`to_json`'s output (e.g. a tables.json, read with json.loads) back into tables."""
        return cls(*wire.step_table_lists_json(data, required=False))

    @classmethod
    def from_proto(cls, answer: pb.StepTablesResponse) -> StepTables:
        return cls(*wire.step_table_lists(answer.tables), answer.source,
                   tuple(GuardBin(b.table, b.tier, b.granted_steps, b.samples, b.mean_loss, b.upper_bound,
                                  b.lower_bound) for b in answer.bins), answer.guard_changes)


@dataclass(frozen=True)
class QualitySample:
    """One hit's paired quality loss: `table` (TABLES) the hit was granted by, its `similarity` (a
    composite's: the object donor's; `background_similarity` the background donor's), the steps it
    was granted, and `loss` = score from scratch minus score from the cache, in points (positive: the
    cache made it worse)."""

    table: str
    similarity: float
    background_similarity: float
    granted_steps: int
    loss: float

    def to_proto(self) -> pb.QualitySample:
        return pb.QualitySample(table=self.table, similarity=self.similarity,
                                background_similarity=self.background_similarity,
                                granted_steps=self.granted_steps, loss=self.loss)

    @classmethod
    def from_proto(cls, sample: pb.QualitySample) -> QualitySample:
        return cls(sample.table, wire.decimal(sample.similarity), wire.decimal(sample.background_similarity),
                   sample.granted_steps, wire.decimal(sample.loss))
