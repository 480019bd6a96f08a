"""Keeping every entry at replication_factor copies on its owners, in the background.

Repairer: every repair_interval_seconds (and at once when woken: a drain), this node walks the entries
it holds and asks each entry's owners (placement over the serving members) whether they hold it
(NodeService.Has, a batch at a time). An owner without it gets a copy (repair: a replaced node with an
empty disk, a node that was away while writes went on, a copy lost to an owner's eviction that could
not be passed on). An entry this node holds but does not own (a node joined, the owner it stood in for
came back, this node drains) is dropped here once every owner holds it and means to keep it (it serves
and owns the entry in its own view: HasResponse.keeps), so two nodes whose views of the members differ
for a probe interval never both drop their copies counting on each other's. Copies go at
repair_bytes_per_second at most. The pass ends by syncing the namespaces' step tables with every
member (ClusterNode.sync_tables): a member that missed a change catches up. Only a node that serves or
drains repairs: a joining one has not seen its peers yet, and would think it owns nothing.

Notifier: a fetch served here is credited on the other copies (TouchEntries), and an entry evicted here
is forgotten on the other nodes (Forget), in batches a few times a second. So the copies of an entry
rank alike for the eviction policy, and leave together: the node under the most pressure decides, and
no copy stays behind under-replicated for the repair pass to copy back. If a peer misses the batch
(down), the copy it keeps is copied back by the next repair pass instead: an eviction never loses the
last copy of anything by accident, it may only take a pass longer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc

from flexcache.v1 import node_pb2 as npb
from flexcache.v1 import wire

from ..errors import CacheError
from . import placement
from .node import ClusterNode

log = logging.getLogger(__name__)

HAS_BATCH = 256  # entry ids per Has call
NOTIFY_EVERY_S = 0.2
MAX_QUEUED = 100_000  # touches or evictions waiting for the next batch; older ones are dropped past it


@dataclass
class RepairReport:
    checked: int = 0
    copied: int = 0
    handed_off: int = 0
    under_replicated: int = 0
    tables_synced: int = 0  # namespaces whose step tables a peer had newer (ClusterNode.sync_tables)


class Repairer:
    def __init__(self, node: ClusterNode, interval_s: float, bytes_per_second: int):
        self.node = node
        self.interval_s = interval_s
        self.bytes_per_second = bytes_per_second
        self.passes = 0
        self.last = RepairReport()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="repair", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.last = self.run_pass()
                self.passes += 1
            except Exception:
                log.exception("cluster: a repair pass failed; the next one tries again")

    def run_pass(self) -> RepairReport:
        node, membership = self.node, self.node.membership
        report = RepairReport()
        if membership.state not in (npb.NODE_SERVING, npb.NODE_DRAINING):
            return report
        members = membership.placement()
        me = node.node_id
        ids = node.cache.entry_ids()
        for start in range(0, len(ids), HAS_BATCH):
            if self._stop.is_set():
                break
            batch = ids[start:start + HAS_BATCH]
            owners = {eid: placement.owners(eid, members, node.replicas) for eid in batch}
            asks: dict[str, list[str]] = {}
            for eid, its in owners.items():
                for owner in its:
                    if owner != me:
                        asks.setdefault(owner, []).append(eid)
            present: Counter[str] = Counter()  # owners that hold the entry now (after a copy, if it took one)
            kept: Counter[str] = Counter()  # owners that hold it and mean to keep it (HasResponse.keeps)
            for owner, eids in asks.items():
                peer = membership.peer(owner)
                if peer is None:
                    continue
                try:
                    answer = peer.stub.Has(npb.HasRequest(entry_ids=eids), timeout=node.timeout_s,
                                           metadata=node.metadata)
                except grpc.RpcError as exc:
                    node.metrics.peer_errors.labels(owner, "Has").inc()
                    log.debug("cluster: Has to %s failed: %s", owner, exc)
                    continue
                keeps = answer.keeps if len(answer.keeps) == len(eids) else [False] * len(eids)
                for eid, has, keep in zip(eids, answer.held, keeps, strict=False):
                    kept[eid] += keep
                    if has or self._copy(peer, eid, "repair" if me in owners[eid] else "handoff"):
                        present[eid] += 1
                        report.copied += 0 if has else 1
            leaving = []
            for eid, its in owners.items():
                others = [o for o in its if o != me]
                if me not in its:  # dropped only once every owner keeps it; a copy made now counts next pass
                    if others and kept[eid] == len(others):
                        leaving.append(eid)
                elif present[eid] < len(others):
                    report.under_replicated += 1
            if leaving:
                dropped = node.cache.forget(leaving, last_copy=False)
                report.handed_off += dropped
                node.metrics.handoffs.inc(dropped)
            report.checked += len(batch)
        node.metrics.under_replicated.set(report.under_replicated)
        report.tables_synced = node.sync_tables()
        if report.copied or report.handed_off:
            log.info("cluster: repair pass: %d entries checked, %d copied to their owners, %d handed off, %d still "
                     "short of copies", report.checked, report.copied, report.handed_off, report.under_replicated)
        return report

    def _copy(self, peer: object, eid: str, reason: str) -> bool:
        """Copy one entry held here to `peer`, paced to repair_bytes_per_second; whether it holds it now."""
        node = self.node
        header = node.cache.record_of(eid)
        if header is None:  # deleted meanwhile
            return False
        try:
            chunks = node.cache.blob_chunks(eid)
            node.copy_to(peer, header, chunks, reason)  # type: ignore[arg-type]
        except (CacheError, OSError) as exc:
            log.debug("cluster: copying %s failed: %s", eid, exc)
            return False
        if self.bytes_per_second:
            self._stop.wait(header.blob.size / self.bytes_per_second)
        return True


class Notifier:
    """Fetches and evictions of this node's copies, passed to the other nodes in batches (the module
    docstring says why)."""

    def __init__(self, node: ClusterNode, every_s: float = NOTIFY_EVERY_S):
        self.node = node
        self.every_s = every_s
        self._lock = threading.Lock()
        self._touches: list[npb.Touch] = []
        self._evicted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)

    def fetched(self, eid: str, role: str | None, granted_steps: int) -> None:
        with self._lock:
            if len(self._touches) < MAX_QUEUED:
                self._touches.append(npb.Touch(entry_id=eid, role=wire.ENUM_BY_ROLE.get(role or "", 0),
                                               granted_steps=granted_steps))

    def evicted(self, eids: list[str]) -> None:
        with self._lock:
            self._evicted.extend(eids[:max(0, MAX_QUEUED - len(self._evicted))])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.flush()
            except Exception:
                log.exception("cluster: passing fetches and evictions to the peers failed")

    def flush(self) -> None:
        with self._lock:
            touches, self._touches = self._touches, []
            evicted, self._evicted = self._evicted, []
        if not touches and not evicted:
            return
        node = self.node
        calls = []
        for peer in node.membership.peers():
            if touches:
                calls.append((peer, "TouchEntries", peer.stub.TouchEntries.future(
                    npb.TouchRequest(touches=touches), timeout=node.timeout_s, metadata=node.metadata)))
            if evicted:
                calls.append((peer, "Forget", peer.stub.Forget.future(
                    npb.ForgetRequest(entry_ids=evicted, reason="evicted"), timeout=node.timeout_s,
                    metadata=node.metadata)))
        deadline = time.monotonic() + node.timeout_s
        for peer, method, call in calls:
            try:
                call.result(timeout=max(0.0, deadline - time.monotonic()))
            except (grpc.RpcError, grpc.FutureTimeoutError):
                node.metrics.peer_errors.labels(peer.node_id, method).inc()
