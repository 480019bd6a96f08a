"""The ledger: what the cache holds, in memory: each entry's namespace and usage, per-namespace
totals, and the turnover clock that credit decays by.

Contract:
- It mirrors the store. RocksDB stays the source of truth: `Cache.open` rebuilds the ledger from it
  (`restore`), and the cache adds an entry (`admit`) only once the store and the index both hold it,
  and removes it (`remove`) as it deletes it from the store. So an entry the ledger lists is one a
  fetch can serve, and `total_bytes` is what eviction keeps within the budget.
- It is the one writer of Usage: a new entry's prior credit, a fetch's hit and credit, and the clock
  both are measured against. The eviction policy ranks the same Usage objects by reference: every
  entry the ledger tracks is registered with the policy, and forgotten by it when removed, so the
  policy never needs telling about a hit.
- Every change is published as it happens: the per-namespace gauges when an entry comes or goes, the
  hit, step and GPU-seconds counters when a fetch is credited (GPU seconds: granted steps x the role's
  share x the entry's measured step_seconds, so a composed hit's two donors add up to the steps it
  skipped once; an entry stored without a measurement adds none). Their namespace label is the namespace's label
  (metrics.NamespaceLabels, assigned as the namespace comes to hold entries, the largest first at
  startup, `finish_restore`); a gauge's value under a label is the sum over every namespace with that
  label, so "_other" sums the namespaces without a label of their own.
- It keeps what the per-tenant limits need (tenants.py): each namespace's tenant, a tenant's entries,
  bytes and namespaces. A namespace's tenant comes from its entries' records (`namespace.tenant`); a
  stored namespace with no entry left only has its name, whose first "/"-separated part is taken for
  its tenant (exact unless the tenant's name holds a "/").
- It touches neither the store nor the index, so none of its methods can fail half-way, and it has
  no lock of its own: the cache calls it under its lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Set

from flexcache.v1 import cache_pb2 as pb

from .entries import Usage, record_size
from .eviction import EvictionPolicy
from .limits import Limits
from .metrics import OTHER, Metrics
from .store import NamespaceInfo

# How much of a composed latent each donor supplies: the share of a fetch's steps its entry is credited.
CREDIT_SHARE = {"full": 1.0, "object": 0.5, "background": 0.5}


class Ledger:
    def __init__(self, policy: EvictionPolicy, metrics: Metrics, limits: Limits):
        self._policy = policy
        self._metrics = metrics
        self._limits = limits
        self._namespaces: dict[str, NamespaceInfo] = {}  # namespace key -> its name and dimension
        self._usage: dict[str, Usage] = {}  # entry id -> usage
        self._entry_ns: dict[str, str] = {}  # entry id -> namespace key
        self._ns_entries: Counter[str] = Counter()
        self._ns_bytes: Counter[str] = Counter()
        self._ns_blob_bytes: Counter[str] = Counter()
        self.total_bytes = 0  # what the budget counts: entries.record_size of every entry
        # Metric labels: namespace key -> its label, and the gauges' totals by label.
        self._ns_label: dict[str, str] = {}
        self._label_entries: Counter[str] = Counter()
        self._label_bytes: Counter[str] = Counter()
        self._label_blob_bytes: Counter[str] = Counter()
        # Tenants: namespace key -> tenant; by tenant, its entry ids, budget bytes and namespaces.
        self._ns_tenant: dict[str, str] = {}
        self._tenant_entries: dict[str, set[str]] = {}
        self._tenant_bytes: Counter[str] = Counter()
        self._tenant_namespaces: Counter[str] = Counter()
        # The utility policy's clock, in cache turnovers: bytes of new entries / max_bytes. Credit
        # decays as the cache fills with new work, not as seconds pass, so the policy ranks alike at
        # any request rate, and an idle or all-hits cache, whose contents are not being replaced,
        # keeps what its entries earned.
        self.clock = 0.0
        metrics.max_bytes.set(limits.max_bytes)

    # ---- namespaces ----
    def restore_namespaces(self, namespaces: dict[str, NamespaceInfo]) -> None:
        """The namespaces the store records (at startup, before any entry is restored)."""
        self._namespaces = dict(namespaces)
        for key, info in namespaces.items():
            self._set_tenant(key, info.name.split("/", 1)[0])  # until an entry's record says (module docstring)

    def namespace(self, ns_key: str) -> NamespaceInfo | None:
        """The namespace's name and dimension; None until its first entry is stored."""
        return self._namespaces.get(ns_key)

    @property
    def namespace_count(self) -> int:
        return len(self._namespaces)

    def metric_label(self, ns_key: str) -> str:
        """The namespace label of a namespace's series: its label if it holds one, else "_other" (a
        namespace the daemon does not hold, named by a lookup). Assigns nothing: safe without the lock."""
        return self._ns_label.get(ns_key, OTHER)

    def finish_restore(self) -> None:
        """After `restore`: give the stored namespaces their metric labels, the largest (stored bytes)
        first, then by name, and publish their gauges."""
        for key in sorted(self._namespaces, key=lambda k: (-self._ns_bytes[k], self._namespaces[k].name)):
            self._label(key)
        self._metrics.aggregated_namespaces.set(len(self._namespaces) - self._metrics.namespace_labels.own)

    # ---- tenants ----
    def tenant_of(self, ns_key: str) -> str | None:
        """The tenant of a stored namespace; None for a namespace the daemon does not hold."""
        return self._ns_tenant.get(ns_key)

    def tenant_bytes(self, tenant: str) -> int:
        """Budget bytes (entries.record_size) the tenant's entries hold."""
        return self._tenant_bytes[tenant]

    def tenant_namespace_count(self, tenant: str) -> int:
        """Namespaces the tenant holds (entries or not: a namespace, once created, stays)."""
        return self._tenant_namespaces[tenant]

    def tenant_entries(self, tenant: str) -> Set[str]:
        """The ids of the tenant's tracked entries: a live view, read it before deleting any."""
        return self._tenant_entries.get(tenant, frozenset())

    def tenant_holdings(self) -> dict[str, int]:
        """Budget bytes by tenant, for every tenant holding entries (a copy)."""
        return {tenant: self._tenant_bytes[tenant] for tenant in self._tenant_entries}

    def entry_tenant(self, eid: str) -> str:
        """The tenant of a tracked entry."""
        return self._ns_tenant[self._entry_ns[eid]]

    def _set_tenant(self, ns_key: str, tenant: str) -> None:
        old = self._ns_tenant.get(ns_key)
        if old == tenant:
            return
        if old is not None:
            self._tenant_namespaces[old] -= 1
            if not self._tenant_namespaces[old]:
                del self._tenant_namespaces[old]
        self._ns_tenant[ns_key] = tenant
        self._tenant_namespaces[tenant] += 1

    # ---- entries ----
    def __len__(self) -> int:
        return len(self._usage)

    def __contains__(self, eid: str) -> bool:
        return eid in self._usage

    def entry_ids(self) -> list[str]:
        return list(self._usage)

    def namespace_of(self, eid: str) -> str | None:
        """The namespace key of a tracked entry; None for an entry the ledger does not track."""
        return self._entry_ns.get(eid)

    def holds(self, eid: str, ns_key: str) -> bool:
        """Whether the entry is stored in that namespace: an entry is never served across namespaces."""
        return self._entry_ns.get(eid) == ns_key

    def usage(self, eid: str) -> Usage | None:
        return self._usage.get(eid)

    def oldest_first(self) -> list[str]:
        """Every tracked entry, the earliest stored first: the order the store wrote their blobs in, so
        the order that frees whole blob files when the disk, not the budget, is what must make room."""
        return sorted(self._usage, key=lambda eid: self._usage[eid].created)

    def size_of(self, eid: str) -> int:
        """Bytes the entry counts in the budget; the entry must be tracked."""
        return self._usage[eid].size

    def new_usage(self, header: pb.PutHeader, now: float) -> Usage:
        """A fresh entry's usage: nothing served yet, and the prior credit (utility_prior_steps) earned
        at the current clock, so that a new entry gets a chance to be used before it is ranked last."""
        usage = Usage(size=record_size(header), blob_size=header.blob.size, created=now, last_access=now,
                      step=header.blob.step, total_steps=header.namespace.total_steps,
                      step_cost=header.step_seconds or 1.0, step_seconds=header.step_seconds)
        usage.add_credit(self._limits.utility_prior_steps * usage.step_cost, self.clock,
                         self._limits.utility_half_life)
        return usage

    def restore(self, eid: str, ns_key: str, usage: Usage, tenant: str) -> None:
        """An entry of `tenant` found in the store at startup (the gauges are published by
        `finish_restore`). The clock resumes from the newest credit, so credit decays across a restart
        as if the daemon had run on."""
        self.clock = max(self.clock, usage.credit_clock)
        self._set_tenant(ns_key, tenant)
        self._track(eid, ns_key, usage)

    def admit(self, eid: str, ns_key: str, usage: Usage, new_namespace: NamespaceInfo | None, tenant: str) -> None:
        """A newly stored entry of `tenant` (store and index both written); `new_namespace` if it is the
        first of its namespace. The clock advances by the entry's share of the budget."""
        if new_namespace is not None:
            self._namespaces[ns_key] = new_namespace
        self._set_tenant(ns_key, tenant)
        self._label(ns_key)
        if new_namespace is not None:
            self._metrics.aggregated_namespaces.set(len(self._namespaces) - self._metrics.namespace_labels.own)
        self._track(eid, ns_key, usage)
        self.clock += usage.size / self._limits.max_bytes

    def remove(self, eid: str) -> Usage:
        """Forget a tracked entry (deleted or evicted); its usage, for the bytes it freed."""
        usage = self._usage.pop(eid)
        ns_key = self._entry_ns.pop(eid)
        self._policy.remove(eid)
        self._count(ns_key, -1, -usage.size, -usage.blob_size)
        tenant = self._ns_tenant[ns_key]
        entries = self._tenant_entries[tenant]
        entries.discard(eid)
        self._tenant_bytes[tenant] -= usage.size
        if not entries:  # memory follows the tenants that hold entries
            del self._tenant_entries[tenant], self._tenant_bytes[tenant]
        self.total_bytes -= usage.size
        return usage

    def record_fetch(self, eid: str, role: str | None, granted_steps: int, now: float, counted: bool = True
                     ) -> Usage:
        """A fetch of a tracked entry: its last access, and when it serves a role at granted steps, a hit
        and credit for the GPU time it saves (steps x the role's share x seconds per step), counted in
        the metrics unless not `counted` (another node's fetch of its copy); the usage, for the caller
        to persist."""
        usage = self._usage[eid]
        usage.last_access = now
        if role and granted_steps:
            usage.record_hit(role, granted_steps)
            credit = granted_steps * CREDIT_SHARE[role] * usage.step_cost
            usage.add_credit(credit, self.clock, self._limits.utility_half_life)
            if not counted:
                return usage
            label = self.metric_label(self._entry_ns[eid])
            self._metrics.hits.labels(label, role).inc()
            self._metrics.steps.labels(label, role).inc(granted_steps)
            if usage.step_seconds > 0:  # measured by the entry's worker; unknown (0) adds no GPU seconds
                saved = granted_steps * CREDIT_SHARE[role] * usage.step_seconds
                self._metrics.gpu_seconds.labels(label, role).inc(saved)
        return usage

    # ---- totals ----
    @property
    def blob_bytes(self) -> int:
        return sum(self._ns_blob_bytes.values())

    def namespace_stats(self) -> list[pb.NamespaceStats]:
        """Every known namespace, entries or not, by name."""
        return [
            pb.NamespaceStats(name=info.name, dimension=info.dim, entries=self._ns_entries[key],
                              bytes=self._ns_bytes[key], blob_bytes=self._ns_blob_bytes[key])
            for key, info in sorted(self._namespaces.items(), key=lambda kv: kv[1].name)
        ]

    def _track(self, eid: str, ns_key: str, usage: Usage) -> None:
        """Count an entry whose namespace's tenant is set."""
        self._usage[eid] = usage
        self._entry_ns[eid] = ns_key
        self._policy.add(eid, usage)
        self._count(ns_key, 1, usage.size, usage.blob_size)
        tenant = self._ns_tenant[ns_key]
        self._tenant_entries.setdefault(tenant, set()).add(eid)
        self._tenant_bytes[tenant] += usage.size
        self.total_bytes += usage.size

    def _count(self, ns_key: str, entries: int, size: int, blob_size: int) -> None:
        """Add to a namespace's totals, and to its label's once it has one (then publish them)."""
        self._ns_entries[ns_key] += entries
        self._ns_bytes[ns_key] += size
        self._ns_blob_bytes[ns_key] += blob_size
        label = self._ns_label.get(ns_key)
        if label is not None:
            self._label_entries[label] += entries
            self._label_bytes[label] += size
            self._label_blob_bytes[label] += blob_size
            self._publish(label)

    def _label(self, ns_key: str) -> str:
        """The namespace's metric label, assigned at its first call (metrics.NamespaceLabels), when its
        totals so far join its label's."""
        label = self._ns_label.get(ns_key)
        if label is None:
            info = self._namespaces.get(ns_key)
            label = self._ns_label[ns_key] = self._metrics.namespace_labels.assign(info.name if info else ns_key)
            self._label_entries[label] += self._ns_entries[ns_key]
            self._label_bytes[label] += self._ns_bytes[ns_key]
            self._label_blob_bytes[label] += self._ns_blob_bytes[ns_key]
            self._publish(label)
        return label

    def _publish(self, label: str) -> None:
        self._metrics.entries.labels(label).set(self._label_entries[label])
        self._metrics.bytes.labels(label).set(self._label_bytes[label])
        self._metrics.blob_bytes.labels(label).set(self._label_blob_bytes[label])
