"""One node of a cluster: CacheService for the whole cluster (any node answers any call), over this
node's own Cache and its peers' NodeService.

- Put: the entry id is known from the header (entries.entry_id), so its owners are too
  (placement.ranked over the serving members). The blob is stored on the first replication_factor of
  them, this node's own copy locally and the others through NodeService.Replicate, in parallel; an owner
  that fails or is down is replaced by the next member in the ranking (the repair pass later moves the
  copy home). The Put is acknowledged once replication_factor copies are stored, or every member that
  could take one: a node killed after the acknowledgement leaves a copy elsewhere.
- Lookup: every member that holds entries answers Gather, its own candidates, within
  peer_timeout_seconds; the answers merge as one node holding all the entries would have ranked them
  (ranking.merge, ranking.decide). Hedged: once the members without an answer (down, failed or
  pending) are at most replication_factor - 1, the rest get hedge_seconds more, since every entry has
  a copy among those that answered. A member
  that does not answer in time is left out of this answer. With one Qdrant for the whole cluster (index_backend=qdrant),
  the index already holds every entry, and this node searches it alone: no fan-out.
- Fetch: from this node's store if it holds the entry, else FetchLocal from the owners, best first,
  hedged: an owner that has not sent the header within hedge_seconds is joined by the next one, and
  the first header wins (the others are cancelled).
- Delete: here and on every peer (Forget, the namespace checked there). Verify: on a node holding it.
- Stats: this node's own (dashboards sum over the nodes).
- Step tables: a change is copied to every other member at once (CopyStepTables), and each repair
  pass syncs every namespace's latest version with every member (SyncStepTables), so a member that
  missed a change catches up; the newest version of each namespace wins (steps.TableRegistry).
Fetches served and entries evicted here are passed to the entries' other copies (repair.Notifier), so
that the copies rank alike for eviction and leave together.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import node_pb2 as npb
from flexcache.v1 import wire

from .. import validate
from ..cache import Cache, PutSession
from ..errors import CacheError, Corrupt, InvalidRequest, NotFound, TooLarge, Unavailable
from ..metrics import Metrics
from ..quality import Bin
from ..ranking import Gathered, decide, merge
from ..steps import Versioned
from . import placement
from .membership import Membership, Peer

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_SYNCED_NAMESPACES = 100_000  # namespaces with tables in one SyncStepTables (each is a few hundred bytes)
MAX_SYNCED_NAME_CHARS = 4 * validate.MAX_NAME_CHARS  # a namespace's name: tenant/model/size/scheduler/steps
_NS_KEY = re.compile(r"[0-9a-f]{32}")  # entries.NamespaceKey.key
COPY_BYTES_PER_SECOND = 20 << 20  # the slowest a copy to a peer may go before its deadline cuts it
STALL_PEER_TIMEOUTS = 4  # a peer's fetch stream may pause this many peer_timeout_seconds between messages...
STALL_MIN_S = 2.0  # ...and never less than this
READ_AHEAD = 4  # messages of a peer's fetch stream read ahead of the client
REFUSAL_LOG_S = 60.0  # a member refusing copies another stored is said at most this often
_END = object()


def _peer_error(exc: grpc.RpcError, peer: str) -> CacheError:
    """A peer's refusal as the domain error the client should see: its mistakes stay its own."""
    code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details)
    if code == grpc.StatusCode.DATA_LOSS:
        return Corrupt(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return TooLarge(f"member {peer}: {details}")
    return Unavailable(f"member {peer}: {code.name}: {details}")


class RemoteChunks:
    """A peer's FetchLocal stream after its header, as the chunks a local fetch gives (pins.PinnedChunks).
    A thread of its own reads ahead a few messages; each must come within `stall_s` of the one before,
    or the fetch ends (Unavailable: the client retries or misses) rather than waiting out a frozen
    source's deadline. close() cancels the stream."""

    def __init__(self, call: Iterator[pb.FetchResponse], stall_s: float, what: str):
        self._call = call
        self._stall_s = stall_s
        self._what = what
        self._queue: queue.Queue[object] = queue.Queue(maxsize=READ_AHEAD)
        self._closed = threading.Event()
        threading.Thread(target=self._read, name="peer-fetch", daemon=True).start()

    def _read(self) -> None:
        item: object = _END
        try:
            for message in self._call:
                if not self._offer(message):
                    return
        except grpc.RpcError as exc:
            item = exc
        self._offer(item)

    def _offer(self, item: object) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> RemoteChunks:
        return self

    def __next__(self) -> bytes:
        try:
            item = self._queue.get(timeout=self._stall_s)
        except queue.Empty:
            self.close()
            raise Unavailable(f"{self._what}: the peer sent nothing for {self._stall_s:g} s") from None
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, grpc.RpcError):
            self.close()
            raise Unavailable(f"{self._what}: the peer's stream failed: {item.code().name}")  # type: ignore[attr-defined]
        assert isinstance(item, pb.FetchResponse)
        if item.WhichOneof("msg") != "chunk":
            self.close()
            raise Unavailable(f"{self._what}: the peer's stream carried a second header")
        return item.chunk

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._call.cancel()  # type: ignore[attr-defined]


class ClusterPut:
    """A Put through this node (PutSession's surface): received here, stored on the entry's owners."""

    def __init__(self, node: ClusterNode, session: PutSession):
        self._node = node
        self._session = session
        self.header = session.header
        self.entry_id = session.entry_id
        self.existing = session.existing

    def add_chunk(self, data: bytes) -> None:
        self._session.add_chunk(data)

    def finish(self) -> pb.PutResponse:
        return self._node.store_copies(self._session)

    def close(self) -> None:
        """A no-op: a coordinator's session writes nothing before its `finish` (PutSession's `keep`)."""


class ClusterNode:
    def __init__(self, cache: Cache, membership: Membership, metrics: Metrics, *, replicas: int, timeout_s: float,
                 hedge_s: float, transfer_timeout_s: float, absent_s: float = 300.0, workers: int = 32):
        self.cache = cache
        self.membership = membership
        self.metrics = metrics
        self.node_id = membership.node_id
        self.replicas = replicas
        self.timeout_s = timeout_s
        self.hedge_s = hedge_s
        self.absent_s = absent_s  # how long a lost member counts against the hedge (_gathered)
        self.transfer_timeout_s = transfer_timeout_s
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="peer")
        self._tables_lock = threading.Lock()  # one copy of step tables to the members at a time
        self._refusal_said_at = -REFUSAL_LOG_S  # store_copies: the last warning of a member's refusal

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.membership.metadata

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _failed(self, peer: Peer, method: str, exc: BaseException) -> None:
        self.metrics.peer_errors.labels(peer.node_id, method).inc()
        log.debug("cluster: %s to %s failed: %s", method, peer.node_id, exc)

    # ---- Put ----
    def begin_put(self, header: pb.PutHeader) -> ClusterPut:
        return ClusterPut(self, self.cache.begin_put(header, keep=True))

    def store_copies(self, session: PutSession) -> pb.PutResponse:
        """Store the received entry on its owners (the module docstring has the rule); the answer is this
        node's own copy's if it stored one, else the first copy's."""
        session.check()
        order = placement.ranked(session.entry_id, self.membership.placement()) or [self.node_id]
        want = min(self.replicas, len(order))
        candidates = iter(order)
        running: dict[futures.Future[pb.PutResponse], str] = {}
        stored: dict[str, pb.PutResponse] = {}
        errors: list[CacheError] = []
        refused: list[CacheError] = []  # InvalidRequest or Corrupt: the request's fault, unless a member stored it

        def launch() -> None:
            while not refused and len(stored) + len(running) < want:
                node_id = next(candidates, None)
                if node_id is None:
                    return
                if node_id == self.node_id:
                    running[self.pool.submit(session.finish)] = node_id
                elif (peer := self.membership.peer(node_id)) is not None:
                    running[self.pool.submit(self.copy_to, peer, session.header, session.chunks or [], "put")] = node_id

        launch()
        while running:
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in done:
                node_id = running.pop(future)
                try:
                    stored[node_id] = future.result()
                except (InvalidRequest, Corrupt) as exc:  # no other member would take it either: none is tried
                    refused.append(exc)
                except CacheError as exc:  # counted in peer_errors; a down member fails every put until probed
                    errors.append(exc)
                    log.debug("cluster: a copy of %s on %s failed (%s); trying the next member", session.entry_id,
                              node_id, exc)
            launch()
        if refused and not stored:
            raise refused[0]  # the client's mistake, answered once every copy under way has ended
        if refused and time.monotonic() - self._refusal_said_at >= REFUSAL_LOG_S:
            # A member of another release refusing what this one stored: a copy short (repair retries it).
            self._refusal_said_at = time.monotonic()
            log.warning("cluster: a member refused a copy of %s that %s stored (%s); members of different "
                        "releases? (said at most every %.0f s)", session.entry_id, ", ".join(stored), refused[0],
                        REFUSAL_LOG_S)
        if not stored:
            raise errors[0] if errors else Unavailable("no member could store the entry")
        if len(stored) < want:  # the repair passes add the rest (flexcache_cluster_under_replicated_entries)
            log.debug("cluster: %s stored on %d of %d owners", session.entry_id, len(stored), want)
        answer = stored.get(self.node_id) or next(iter(stored.values()))
        answer.created = any(r.created for r in stored.values())
        return answer

    def copy_to(self, peer: Peer, header: pb.PutHeader, chunks: list[bytes], reason: str) -> pb.PutResponse:
        """Store one copy on `peer` (NodeService.Replicate); a failure is the domain error it maps to."""
        def requests() -> Iterator[pb.PutRequest]:
            yield pb.PutRequest(header=header)
            for chunk in chunks:
                yield pb.PutRequest(chunk=chunk)

        timeout = self.timeout_s + header.blob.size / COPY_BYTES_PER_SECOND
        try:
            answer = peer.stub.Replicate(requests(), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            self._failed(peer, "Replicate", exc)
            raise _peer_error(exc, peer.node_id) from None
        self.metrics.replication_bytes.labels(reason).inc(header.blob.size)
        return answer

    # ---- Lookup ----
    def lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
        self.cache.tenants.request(request.namespace.tenant)
        query = self.cache.lookup_query(request)
        started = time.perf_counter()
        peers = [] if self.cache.shared_index else self.membership.peers()  # a shared index has every entry
        answers: queue.Queue[tuple[Peer, grpc.Future]] = queue.Queue()
        pending: dict[int, grpc.Future] = {}
        waiting: dict[int, Peer] = {}
        for peer in peers:
            call = peer.stub.Gather.future(request, timeout=self.timeout_s, metadata=self.metadata)
            pending[id(call)], waiting[id(call)] = call, peer
            call.add_done_callback(lambda done, peer=peer: answers.put((peer, done)))
        parts = [self.cache.gather(query)]
        parts += self._gathered(answers, pending, waiting)
        if peers:
            self.metrics.fanout.labels("Lookup").observe(time.perf_counter() - started)
        return self.cache.publish(query, decide(query, merge(query, parts), self.cache.tables_for(query)))

    def _gathered(self, answers: queue.Queue[tuple[Peer, grpc.Future]], pending: dict[int, grpc.Future],
                  waiting: dict[int, Peer]) -> list[Gathered]:
        """The peers' Gather answers, hedged: every entry has replication_factor copies, so once the
        members without an answer (members down, peers that failed, peers still pending) are at most
        replication_factor - 1, every entry is among the answers (fully replicated ones: an entry short
        of copies may be missed for this one lookup), and the stragglers get hedge_seconds more, not the
        whole peer_timeout_seconds (a frozen peer that is not yet seen down). Past that count a pending
        peer may hold an entry's only reachable copy, and it gets the whole deadline. A member counts as
        down for `absent_s` after it was last seen: by then the repair passes have copied its entries
        elsewhere (a store that takes longer to copy may miss an entry short of copies, as above)."""
        parts: list[Gathered] = []
        spare = self.replicas - 1 - self.membership.absent(self.absent_s)
        failed = 0
        hedged = False
        deadline = time.monotonic() + self.timeout_s
        while pending:
            if not hedged and len(pending) + failed <= spare:
                deadline = min(deadline, time.monotonic() + self.hedge_s)
                hedged = True  # the grace starts once
            try:
                peer, call = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            pending.pop(id(call), None)
            try:
                parts.append(Gathered.from_response(call.result()))
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # type: ignore[attr-defined]
                    raise InvalidRequest(exc.details()) from None  # type: ignore[attr-defined]
                failed += 1
                self._failed(peer, "Gather", exc)
        for key, call in pending.items():  # hedged away, or past the deadline: counted as missed
            call.cancel()
            self._failed(waiting[key], "Gather", TimeoutError("hedged away"))
        return parts

    # ---- Fetch ----
    def fetch(self, request: pb.FetchRequest) -> tuple[pb.FetchHeader, Iterator[bytes]]:
        validate.fetch_request(request)
        if self.cache.held([request.entry_id])[0]:
            return self.cache.fetch(request)
        self.cache.tenants.request(request.namespace.tenant)
        peers = {p.node_id: p for p in self.membership.peers()}
        order = [peers[node_id] for node_id in placement.ranked(request.entry_id, peers)]
        return self._hedged_fetch(request, order)

    def _hedged_fetch(self, request: pb.FetchRequest, order: list[Peer]) -> tuple[pb.FetchHeader, Iterator[bytes]]:
        """FetchLocal from `order`, best first; the next is asked too when no header came within
        hedge_seconds, or at once when one answers NOT_FOUND or fails. The first header wins."""
        answers: queue.Queue[tuple[Peer, object, object]] = queue.Queue()
        calls: list[object] = []
        lock = threading.Lock()
        pending = iter(order)
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s + self.hedge_s * len(order)

        def first(peer: Peer, call: Iterator[pb.FetchResponse]) -> None:
            try:
                answers.put((peer, call, next(call)))
            except (grpc.RpcError, StopIteration) as exc:
                answers.put((peer, call, exc))

        def launch() -> bool:
            peer = next(pending, None)
            if peer is None:
                return False
            call = peer.stub.FetchLocal(request, timeout=self.transfer_timeout_s, metadata=self.metadata)
            with lock:
                calls.append(call)
            self.pool.submit(first, peer, call)
            return True

        def cancel_all(but: object = None) -> None:
            with lock:
                for call in calls:
                    if call is not but:
                        call.cancel()  # type: ignore[attr-defined]

        running = 1 if launch() else 0
        more = running > 0
        failures: list[CacheError] = []
        while running:
            wait = self.hedge_s if more else deadline - time.monotonic()
            try:
                peer, call, message = answers.get(timeout=max(0.0, wait))
            except queue.Empty:
                if more and (more := launch()):
                    running += 1
                    continue
                if time.monotonic() >= deadline:
                    break
                continue
            running -= 1
            if isinstance(message, pb.FetchResponse) and message.WhichOneof("msg") == "header":
                cancel_all(but=call)
                self.metrics.fanout.labels("Fetch").observe(time.perf_counter() - started)
                stall_s = max(STALL_MIN_S, STALL_PEER_TIMEOUTS * self.timeout_s)
                return message.header, RemoteChunks(call, stall_s,  # type: ignore[arg-type]
                                                    f"fetch of {request.entry_id} from {peer.node_id}")
            if isinstance(message, grpc.RpcError):
                error = _peer_error(message, peer.node_id)
                if not isinstance(error, NotFound):
                    self._failed(peer, "FetchLocal", message)
                failures.append(error)
            if more and (more := launch()):
                running += 1
        cancel_all()
        ns = validate.namespace_of(request)
        if failures and all(isinstance(f, NotFound) for f in failures) and not running:
            raise NotFound(f"no entry {request.entry_id} in namespace {ns.name}")
        if not order:
            raise NotFound(f"no entry {request.entry_id} in namespace {ns.name}")
        raise Unavailable(f"no member holding entry {request.entry_id} answered within "
                          f"{self.timeout_s + self.hedge_s * len(order):.2f} s")

    # ---- Delete, Verify, Stats ----
    def delete(self, request: pb.DeleteRequest) -> bool:
        deleted = self.cache.delete(request)
        forget = npb.ForgetRequest(entry_ids=[request.entry_id], reason="deleted", namespace=request.namespace)
        calls = [(p, p.stub.Forget.future(forget, timeout=self.timeout_s, metadata=self.metadata))
                 for p in self.membership.peers()]
        for peer, call in calls:
            try:
                deleted = call.result().forgotten > 0 or deleted
            except grpc.RpcError as exc:
                self._failed(peer, "Forget", exc)
        return deleted

    def verify(self, request: pb.VerifyRequest) -> pb.VerifyResponse:
        validate.addressed(request)
        if self.cache.held([request.entry_id])[0]:
            return self.cache.verify(request)
        peers = {p.node_id: p for p in self.membership.peers()}
        for node_id in placement.ranked(request.entry_id, peers):
            try:
                return peers[node_id].stub.VerifyLocal(request, timeout=self.transfer_timeout_s, metadata=self.metadata)
            except grpc.RpcError as exc:
                error = _peer_error(exc, node_id)
                if not isinstance(error, NotFound | Unavailable):
                    raise error from None
        raise NotFound(f"no entry {request.entry_id} in namespace {validate.namespace_of(request).name}")

    def stats(self) -> pb.StatsResponse:
        return self.cache.stats()

    # ---- step tables and quality reports (docs/step_tables.md, "In a cluster") ----
    def set_step_tables(self, request: pb.SetStepTablesRequest) -> pb.StepTablesResponse:
        """Set (or reset) here, then copy to every other member that holds entries."""
        answer = self.cache.set_step_tables(request)
        self.copy_tables(request.namespace)
        return answer

    def step_tables(self, request: pb.StepTablesRequest) -> pb.StepTablesResponse:
        """The deciding member's answer (NodeService.StepTablesLocal), which has the guard's figures:
        every member uses the same tables, but only that one counts the samples. This node's own if the
        deciding member cannot be reached."""
        return self._at_decider(validate.namespace_of(request).key, "StepTablesLocal", request,
                                lambda: self.cache.step_tables(request))

    def report_quality(self, request: pb.ReportQualityRequest) -> pb.ReportQualityResponse:
        """One member decides for a namespace, so that its samples count in one place: the first of the
        serving members in placement order for the namespace's key. Another member forwards the report
        there (NodeService.ReportQualityLocal); if that member cannot be reached, this one decides."""
        ns = validate.namespace_of(request)
        self.cache.tenants.request(request.namespace.tenant)
        return self._at_decider(ns.key, "ReportQualityLocal", request, lambda: self.decide_quality(request))

    def _at_decider(self, ns_key: str, method: str, request: Message, here: Callable[[], T]) -> T:
        """`method` (NodeService) at the namespace's deciding member, the first serving member in
        placement order for its key; `here()` when that is this node, or when it cannot be reached
        (another error of its answer is the caller's)."""
        order = placement.ranked(ns_key, self.membership.placement())
        decider = self.membership.peer(order[0]) if order and order[0] != self.node_id else None
        if decider is not None:
            try:
                return getattr(decider.stub, method)(request, timeout=self.timeout_s, metadata=self.metadata)
            except grpc.RpcError as exc:
                self._failed(decider, method, exc)
                error = _peer_error(exc, decider.node_id)
                if not isinstance(error, Unavailable):
                    raise error from None
        return here()

    def decide_quality(self, request: pb.ReportQualityRequest) -> pb.ReportQualityResponse:
        """The samples counted by this node's guard (not charged again); tables it changed are copied
        to the other members."""
        ns = validate.namespace_of(request)
        before = self.cache.quality.changes(ns.key)
        answer = self.cache.report_quality(request, charge=False)
        if self.cache.quality.changes(ns.key) != before:
            self.copy_tables(request.namespace)
        return answer

    def copy_tables(self, namespace: pb.Namespace) -> None:
        """This node's tables of the namespace to every other member that holds entries, at once
        (NodeService.CopyStepTables). A member it cannot reach keeps what it had (counted in
        peer_errors, and logged): it gets the tables with the namespace's next change."""
        ns_key = validate.namespace_of(pb.StepTablesRequest(namespace=namespace)).key
        with self._tables_lock:  # concurrent changes reach every member in the order they were made here
            own = self.cache.registry.entry(ns_key)
            copy = npb.StepTablesCopy(namespace=namespace, version=self.cache.registry.version(ns_key))
            if own is not None:
                copy.current.CopyFrom(own.current.to_proto())
                if own.admin is not None:
                    copy.admin.CopyFrom(own.admin.to_proto())
            calls = [(peer, peer.stub.CopyStepTables.future(copy, timeout=self.timeout_s, metadata=self.metadata))
                     for peer in self.membership.peers()]
            for peer, call in calls:
                try:
                    call.result()
                except grpc.RpcError as exc:
                    self._failed(peer, "CopyStepTables", exc)
                    log.warning("cluster: the step tables of a namespace did not reach %s (%s); it gets them at "
                                "the next repair pass", peer.node_id, _peer_error(exc, peer.node_id))

    def sync_tables(self) -> int:
        """A repair pass's anti-entropy: this node's latest version of every namespace's tables, and its
        guard figures, to each other member (SyncStepTables), which keeps the newer tables and the
        figures over more samples and answers with its own, kept here the same way. Returns how many
        namespaces' tables changed here (figures kept are logged)."""
        with self.cache.registry.lock:
            mine = npb.StepTablesSync(
                namespaces=[_table_state(key, v) for key, v in self.cache.registry.versions().items()],
                figures=[_figures_state(key, *figures) for key, figures in self.cache.quality.figures().items()])
        calls = [(peer, peer.stub.SyncStepTables.future(mine, timeout=self.timeout_s, metadata=self.metadata))
                 for peer in self.membership.peers()]
        changed = 0
        for peer, call in calls:
            try:
                answer = call.result()
            except grpc.RpcError as exc:
                self._failed(peer, "SyncStepTables", exc)
                continue
            changed += self._keep_newer(answer.namespaces, peer.node_id)
            self._keep_figures(answer.figures, peer.node_id)
        return changed

    def merge_tables(self, theirs: npb.StepTablesSync) -> npb.StepTablesSync:
        """NodeService.SyncStepTables: keep the caller's versions that are newer than this node's and its
        figures that count more (QualityGuard.offer), and answer with this node's tables that are newer
        than the caller's, and figures newer or over more samples than the caller's, or that it did not
        list."""
        for field in ("namespaces", "figures"):
            states = getattr(theirs, field)
            if len(states) > MAX_SYNCED_NAMESPACES:
                raise InvalidRequest(f"{len(states)} {field} in one SyncStepTables, above {MAX_SYNCED_NAMESPACES}")
            for i, state in enumerate(states):
                if not _NS_KEY.fullmatch(state.namespace_key) or len(state.name) > MAX_SYNCED_NAME_CHARS:
                    raise InvalidRequest(f"{field}[{i}] has no namespace key of this daemon's form (32 hex digits) "
                                         f"or a name over {MAX_SYNCED_NAME_CHARS} characters")
        self._keep_newer(theirs.namespaces, "a peer")
        self._keep_figures(theirs.figures, "a peer")
        known = {state.namespace_key: state.version for state in theirs.namespaces}
        counted = {f.namespace_key: (f.table_version, sum(b.samples for b in f.bins)) for f in theirs.figures}
        with self.cache.registry.lock:
            newer = [_table_state(key, v) for key, v in self.cache.registry.versions().items()
                     if v.version > known.get(key, 0)]
            figures = [_figures_state(key, name, version, bins)
                       for key, (name, version, bins) in self.cache.quality.figures().items()
                       if counted.get(key, (version, -1)) < (version, sum(b.n for _, _, b in bins))]
        return npb.StepTablesSync(namespaces=newer, figures=figures)

    def _keep_newer(self, states: Iterable[npb.NamespaceStepTables], source: str) -> int:
        kept = 0
        for state in states:
            try:
                kept += self.cache.offer_step_tables(state.namespace_key, state.name,
                                                     state.admin if state.HasField("admin") else None,
                                                     state.current if state.HasField("current") else None,
                                                     state.version)
            except CacheError as exc:  # a member's tables that do not check out here: keep this node's
                log.warning("cluster: step tables of namespace %s from %s refused: %s", state.name, source, exc)
        if kept:
            log.info("cluster: step tables of %d namespace(s) updated from %s", kept, source)
        return kept

    def _keep_figures(self, states: Iterable[npb.NamespaceGuardFigures], source: str) -> None:
        """Another member's guard figures, kept where they are of the tables in use here and count more."""
        kept = 0
        with self.cache.registry.lock:
            for state in states:
                bins = [(b.table, b.tier, Bin(b.samples, b.mean, b.m2)) for b in state.bins]
                try:
                    kept += self.cache.quality.offer(state.namespace_key, state.name, state.table_version, bins)
                except CacheError as exc:  # figures that do not fit this node's tables: keep its own
                    log.warning("cluster: quality guard figures of namespace %s from %s refused: %s", state.name,
                                source, exc)
        if kept:
            log.info("cluster: quality guard figures of %d namespace(s) updated from %s", kept, source)

    # ---- NodeService: this node alone ----
    def hello(self) -> npb.HelloResponse:
        return npb.HelloResponse(node_id=self.node_id, state=self.membership.state,
                                 incarnation=self.membership.incarnation, entries=self.cache.entry_count(),
                                 replication_factor=self.replicas)

    def keeps(self, ids: list[str], held: list[bool]) -> list[bool]:
        """For Has: which of the held `ids` this node means to keep (HasResponse.keeps): it serves, and
        owns them as it sees the members."""
        if self.membership.state != npb.NODE_SERVING:
            return [False] * len(ids)
        members = self.membership.placement()
        return [h and self.node_id in placement.owners(eid, members, self.replicas) for eid, h in zip(ids, held,
                                                                                                       strict=True)]

    def gather(self, request: pb.LookupRequest) -> pb.LookupResponse:
        return self.cache.gather(self.cache.lookup_query(request)).to_response()

    def touch(self, request: npb.TouchRequest) -> None:
        for t in request.touches:
            self.cache.touch(t.entry_id, wire.ROLE_BY_ENUM.get(t.role), t.granted_steps)


def _figures_state(ns_key: str, name: str, version: int, bins: list[tuple[str, int, Bin]]) -> npb.NamespaceGuardFigures:
    return npb.NamespaceGuardFigures(
        namespace_key=ns_key, name=name, table_version=version,
        bins=[npb.GuardBinFigures(table=table, tier=tier, samples=b.n, mean=b.mean, m2=b.m2)
              for table, tier, b in bins])


def _table_state(ns_key: str, versioned: Versioned) -> npb.NamespaceStepTables:
    state = npb.NamespaceStepTables(namespace_key=ns_key, name=versioned.name, version=versioned.version)
    if versioned.entry is not None:
        state.current.CopyFrom(versioned.entry.current.to_proto())
        if versioned.entry.admin is not None:
            state.admin.CopyFrom(versioned.entry.admin.to_proto())
    return state
