"""The online quality guard: workers report the paired quality loss of hits (ReportQuality), and each
namespace's step tables follow what the reports show (docs/step_tables.md). Not guard.py, which
guards calls.

Rule, per namespace, table and tier: running statistics (n, mean, variance) of the losses of the
samples taken at the tier's current grant (a sample granted another K is stale: counted, not used),
and the confidence bounds mean -/+ z x sd / sqrt(n), z of `confidence`. After a sample, with
n >= min_samples:

- lower bound above the namespace's max_loss (the reports show, at that confidence, that the tier's
  hits cost more than the budget): the tier's fraction drops by `step_fraction` (at 0 it grants
  nothing: a miss), every tier it dominates (asks for no more similarity) drops to at most that, so
  the table stays monotone; the changed tiers' statistics restart;
- else, with n >= 3 x min_samples and the upper bound at most half of max_loss: the fraction rises by
  `step_fraction`, never above the fraction it had in the tables last set (by an admin or the flags:
  the guard only gives back what it took) nor above a tier that dominates it; its statistics restart.

The guard acts on evidence, not on its absence: a quality score of one clip is noisy (on the
reference model two samples of one prompt differ by ~20 points), so a rule that lowered a tier
until its upper bound were within a 1-point budget would lower every tier to nothing within a few
dozen samples, the cache's whole value with it; certifying a table is calibration's job
(flexcache.client.calibration), with as many trials as it takes. Here a tier is lowered once the
reports show it too costly, and given back only once they show it well within the budget.

Each change is a log line, a metric and persisted tables (source "guard"). The figures are persisted
too, after each report (`persist(ns_key, value or None)`, best effort: a full disk only costs the
figures of that report if the daemon restarts before the next), stamped with the version of the
tables they were counted at, so a restart keeps them (a shadow sample costs a generation from
scratch) and figures of other tables are never read back. It takes the registry's lock
(steps.TableRegistry), never the cache's.

In a cluster one member counts a namespace's samples (its deciding member), and every repair pass
gives its figures to the others (`figures`, `offer`: of figures at the same table version the ones
over more samples win), so that the member deciding after it, when it goes down, goes on from them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import NormalDist

from flexcache.v1 import cache_pb2 as pb

from .entries import NamespaceKey
from .errors import CacheError, InvalidRequest
from .metrics import Metrics
from .steps import TABLES, Entry, TableRegistry, Tables, composed_tier_of, decimal, steps_of, tier_of

log = logging.getLogger(__name__)

MAX_SAMPLES = 1024  # QualitySample entries per ReportQuality
MAX_LOSS = 1e6  # |loss| in points: past any score scale, so one report cannot swamp a mean
MAX_FIGURE_SAMPLES = 1 << 40  # samples one tier's figures from another member may say they count


@dataclass(frozen=True)
class GuardSettings:
    """guard_max_loss (0: off unless a namespace's tables set max_loss), guard_min_samples,
    guard_confidence and guard_step_fraction (config.py)."""

    max_loss: float = 0.0
    min_samples: int = 20
    confidence: float = 0.95
    step_fraction: float = 0.1

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(self.confidence)


@dataclass
class Bin:
    """Welford's running mean and variance of one tier's losses at its current grant."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, loss: float) -> None:
        self.n += 1
        delta = loss - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (loss - self.mean)

    def margin(self, z: float) -> float:
        """z standard errors of the mean."""
        sd = math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0
        return z * sd / math.sqrt(self.n) if self.n else math.inf

    def bound(self, z: float) -> float:
        """The upper confidence bound of the mean loss."""
        return self.mean + self.margin(z)

    def lower(self, z: float) -> float:
        """The lower confidence bound."""
        return self.mean - self.margin(z)


def dominated(tiers: tuple[tuple[float, ...], ...], i: int) -> list[int]:
    """The tiers that `tiers[i]` dominates (it asks for at least their similarity, in every part)."""
    return [j for j, tier in enumerate(tiers) if j != i and all(a >= b for a, b in zip(tiers[i][:-1], tier[:-1],
                                                                                      strict=True))]


def dominating(tiers: tuple[tuple[float, ...], ...], i: int) -> list[int]:
    """The tiers that dominate `tiers[i]`."""
    return [j for j, tier in enumerate(tiers) if j != i and all(a >= b for a, b in zip(tier[:-1], tiers[i][:-1],
                                                                                     strict=True))]


def checked_samples(request: pb.ReportQualityRequest) -> list[pb.QualitySample]:
    """The report's samples, bounded and checked (InvalidRequest naming the first bad one)."""
    if len(request.samples) > MAX_SAMPLES:
        raise InvalidRequest(f"samples has {len(request.samples)} entries, above {MAX_SAMPLES}")
    for i, sample in enumerate(request.samples):
        if sample.table not in TABLES:
            raise InvalidRequest(f"samples[{i}].table {sample.table[:40]!r} is not one of {', '.join(TABLES)}")
        values = (sample.similarity, sample.background_similarity, sample.loss)
        if not all(math.isfinite(v) for v in values):
            raise InvalidRequest(f"samples[{i}] has a NaN or infinite value")
        if abs(sample.loss) > MAX_LOSS:
            raise InvalidRequest(f"samples[{i}].loss {sample.loss:g} is beyond +-{MAX_LOSS:g} points")
    return list(request.samples)


class QualityGuard:
    """The guard over every namespace's tables in `registry` (the module docstring has the rule)."""

    def __init__(self, registry: TableRegistry, settings: GuardSettings, metrics: Metrics,
                 persist: Callable[[str, bytes | None], None] = lambda ns_key, value: None):
        self.registry = registry
        self._persist = persist
        self.settings = settings
        self._z = settings.z
        self._metrics = metrics
        self._bins: dict[tuple[str, str, int], Bin] = {}  # (namespace key, table, tier): since the last change
        self._names: dict[str, str] = {}  # namespace key -> name, of the namespaces with figures
        self._changes: dict[str, int] = {}  # namespace key -> changes since this start

    def max_loss(self, tables: Tables) -> float:
        return tables.max_loss or self.settings.max_loss

    def report(self, ns: NamespaceKey, total_steps: int, samples: list[pb.QualitySample]) -> pb.ReportQualityResponse:
        """Take a report's samples: (accepted, stale) in the answer; each accepted one may change a tier."""
        answer = pb.ReportQualityResponse()
        with self.registry.lock:
            for sample in samples:
                tables = self.registry.tables(ns.key, ns.name)
                tiers = tables.list_of(sample.table)
                similarity = decimal(sample.similarity)  # as the tables' minima: 0.95 meets a tier of 0.95
                tier = (composed_tier_of(tables.composed, similarity, decimal(sample.background_similarity))
                        if sample.table == "composed" else tier_of(tiers, similarity))
                if tier is None or steps_of(tiers[tier][-1], total_steps) != sample.granted_steps:
                    answer.stale += 1
                    self._metrics.guard_samples.labels(sample.table, "stale").inc()
                    continue
                answer.accepted += 1
                self._metrics.guard_samples.labels(sample.table, "accepted").inc()
                key = (ns.key, sample.table, tier)
                self._names[ns.key] = ns.name
                stats = self._bins.setdefault(key, Bin())
                stats.add(sample.loss)
                self._decide(ns, total_steps, tables, sample.table, tier, stats)
            if answer.accepted:
                self._save(ns.key)
        return answer

    def load(self, stored: Mapping[str, bytes]) -> None:
        """The figures persisted by an earlier run (store.guard_figures), of namespaces whose tables
        are still the version they were counted at; the others are dropped. Call after the registry's
        load."""
        for ns_key, raw in stored.items():
            try:
                data = json.loads(raw)
                bins = [(str(table), int(tier), Bin(int(n), float(mean), float(m2)))
                        for table, tier, n, mean, m2 in data["bins"]]
                version = int(data["version"])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("quality guard figures of namespace key %s are unreadable (%s): they start over",
                            ns_key, exc)
                continue
            if version != self.registry.version(ns_key):
                continue
            if isinstance(data.get("name"), str):
                self._names[ns_key] = data["name"]
            for table, tier, stats in bins:
                if table in TABLES:
                    self._bins[(ns_key, table, tier)] = stats

    def _save(self, ns_key: str) -> None:
        """Persist the namespace's figures (under the lock); a refused write only loses them on a restart."""
        bins = [[table, tier, b.n, b.mean, b.m2] for (key, table, tier), b in sorted(self._bins.items())
                if key == ns_key]
        value = (json.dumps({"version": self.registry.version(ns_key), "name": self._names.get(ns_key),
                             "bins": bins}).encode() if bins else None)
        try:
            self._persist(ns_key, value)
        except CacheError as exc:
            log.warning("quality guard figures of a namespace not persisted: %s", exc)

    def figures(self) -> dict[str, tuple[str, int, list[tuple[str, int, Bin]]]]:
        """Every named namespace's figures, by namespace key: its name, the version of the tables they
        were counted at, and (table, tier, statistics) of each tier with samples. Under the lock."""
        out: dict[str, list[tuple[str, int, Bin]]] = {}
        for (ns_key, table, tier), stats in sorted(self._bins.items()):
            if ns_key in self._names:
                out.setdefault(ns_key, []).append((table, tier, stats))
        return {key: (self._names[key], self.registry.version(key), bins) for key, bins in out.items()}

    def offer(self, ns_key: str, name: str, version: int, bins: list[tuple[str, int, Bin]]) -> bool:
        """Another member's figures of a namespace, in place of this node's if they were counted at the
        version of the tables in use here and over more samples; whether they were kept. InvalidRequest
        for figures that do not fit those tables. Under the lock."""
        if version != self.registry.version(ns_key):
            return False
        own = self.registry.entry(ns_key)
        name = self._names.get(ns_key) or (own.name if own else name)  # the name this node knows, first
        tables = self.registry.tables(ns_key, name)
        seen: set[tuple[str, int]] = set()
        for i, (table, tier, stats) in enumerate(bins):
            if table not in TABLES or not 0 <= tier < len(tables.list_of(table)) or (table, tier) in seen:
                raise InvalidRequest(f"bins[{i}] names no tier of the namespace's tables, or one named before")
            if not (1 <= stats.n <= MAX_FIGURE_SAMPLES and math.isfinite(stats.mean) and abs(stats.mean) <= MAX_LOSS
                    and math.isfinite(stats.m2) and stats.m2 >= 0):
                raise InvalidRequest(f"bins[{i}] has no sample, too many, or a mean or spread out of range")
            seen.add((table, tier))
        own = sum(b.n for (key, _, _), b in self._bins.items() if key == ns_key)
        if sum(stats.n for _, _, stats in bins) <= own:
            return False
        for key in [k for k in self._bins if k[0] == ns_key]:
            del self._bins[key]
        for table, tier, stats in bins:
            self._bins[(ns_key, table, tier)] = Bin(stats.n, stats.mean, stats.m2)
        self._names[ns_key] = name
        self._save(ns_key)
        return True

    def unused(self, samples: list[pb.QualitySample]) -> pb.ReportQualityResponse:
        """Samples the guard does not keep figures for: all stale."""
        for sample in samples:
            self._metrics.guard_samples.labels(sample.table, "stale").inc()
        return pb.ReportQualityResponse(stale=len(samples))

    def _decide(self, ns: NamespaceKey, total_steps: int, tables: Tables, table: str, tier: int, stats: Bin) -> None:
        budget = self.max_loss(tables)
        if budget <= 0 or stats.n < self.settings.min_samples:
            return
        bound, lower = stats.bound(self._z), stats.lower(self._z)
        tiers = tables.list_of(table)
        fractions = [t[-1] for t in tiers]
        old = fractions[tier]
        if lower > budget:
            if old <= 0:
                return
            new = max(0.0, round(old - self.settings.step_fraction, 6))
            changed = [tier] + [j for j in dominated(tiers, tier) if fractions[j] > new]
            for j in changed:
                fractions[j] = min(fractions[j], new)
            direction = "lower"
        elif stats.n >= 3 * self.settings.min_samples and bound <= budget / 2:
            base = self.registry.base(ns.key, ns.name).list_of(table)
            ceiling = min([base[tier][-1]] + [fractions[j] for j in dominating(tiers, tier)])
            new = min(ceiling, round(old + self.settings.step_fraction, 6))
            if new <= old:
                return
            fractions[tier] = new
            changed = [tier]
            direction = "raise"
        else:
            return
        current = tables.with_fractions(table, fractions)
        own = self.registry.entry(ns.key)
        self.registry.put(ns.key, ns.name, Entry(ns.name, own.admin if own else None, current))
        for j in changed:
            self._bins.pop((ns.key, table, j), None)
        self._changes[ns.key] = self._changes.get(ns.key, 0) + 1
        self._metrics.guard_changes.labels(table, direction).inc()
        log.info("quality guard: namespace %s, %s tier %d: K %d -> %d (%d samples, mean loss %.3f, bounds %.3f to "
                 "%.3f, max_loss %g)", ns.name, table, tier, steps_of(old, total_steps), steps_of(new, total_steps),
                 stats.n, stats.mean, lower, bound, budget)

    def changes(self, ns_key: str) -> int:
        """Changes the guard made to the namespace's tables since this start."""
        return self._changes.get(ns_key, 0)

    def forget(self, ns_key: str) -> None:
        """New tables were set: the statistics of the old ones say nothing about them. Under the lock."""
        keys = [k for k in self._bins if k[0] == ns_key]
        for key in keys:
            del self._bins[key]
        if keys:
            self._save(ns_key)

    def describe(self, ns: NamespaceKey, total_steps: int) -> pb.StepTablesResponse:
        """The namespace's effective tables, where they come from, and the guard's figures."""
        with self.registry.lock:
            tables = self.registry.tables(ns.key, ns.name)
            answer = pb.StepTablesResponse(tables=tables.to_proto(), source=self.registry.source(ns.key),
                                           guard_changes=self._changes.get(ns.key, 0))
            for (ns_key, table, tier), stats in sorted(self._bins.items()):
                if ns_key == ns.key:
                    answer.bins.append(pb.GuardBin(
                        table=table, tier=tier, granted_steps=steps_of(tables.list_of(table)[tier][-1], total_steps),
                        samples=stats.n, mean_loss=stats.mean, upper_bound=stats.bound(self._z),
                        lower_bound=stats.lower(self._z)))
        return answer
