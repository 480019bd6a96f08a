"""Who is in the cluster, and who answers: the members come from what already exists (a static `peers`
list, or the addresses a DNS name resolves to: a headless Service), never from a consensus of our own.

Every `peer_probe_seconds` each address is asked NodeService.Hello, with `peer_timeout_seconds` to answer;
the answer names the node (node_id) and its state. A member that misses PROBE_FAILURES probes in a row is
down until it answers one: lookups and puts route around it, and placement leaves it out, so the repair
passes give its entries their second copy elsewhere (repair.py). An address that answers with this node's
own incarnation is this node. Views may differ between nodes for a probe interval or two; nothing here
needs them to agree, because every write is checked against its owners before a copy is dropped.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from flexcache.v1 import node_pb2 as npb
from flexcache.v1 import node_pb2_grpc as npb_grpc
from flexcache.v1 import wire

from ..metrics import Metrics

log = logging.getLogger(__name__)

PROBE_FAILURES = 2  # missed probes in a row that make a member down
RESOLVE_EVERY = 10  # probes between two DNS resolutions of peers_dns

_STATE_NAMES = {npb.NODE_JOINING: "joining", npb.NODE_SERVING: "serving", npb.NODE_DRAINING: "draining"}


@dataclass
class Peer:
    """Another member, as this node last saw it."""

    address: str
    channel: grpc.Channel
    stub: npb_grpc.NodeServiceStub
    node_id: str = ""  # "" until it answers a probe
    state: int = npb.NODE_JOINING
    incarnation: str = ""
    failures: int = 0
    seen: float = field(default_factory=time.monotonic)

    @property
    def up(self) -> bool:
        return bool(self.node_id) and self.failures < PROBE_FAILURES

    @property
    def holds_entries(self) -> bool:
        """Worth asking for entries: up, and past joining (storage open)."""
        return self.up and self.state in (npb.NODE_SERVING, npb.NODE_DRAINING)


class ChannelFactory(Protocol):
    """Makes a channel to a peer's address; `stale()`: the credentials changed, make them anew."""

    def __call__(self, address: str) -> grpc.Channel: ...

    def stale(self) -> bool: ...


class Membership:
    """The members this node sees. `addresses` gives the current member addresses (the static list, or
    a DNS resolution); `state` this node's own state, which Hello answers carry."""

    def __init__(self, node_id: str, incarnation: str, addresses: Callable[[], list[str]], channel: ChannelFactory,
                 metadata: tuple[tuple[str, str], ...], probe_s: float, timeout_s: float, metrics: Metrics):
        self.node_id = node_id
        self.incarnation = incarnation
        self.state: int = npb.NODE_JOINING
        self._addresses = addresses
        self._channel = channel
        self.metadata = metadata
        self._probe_s = probe_s
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._lock = threading.Lock()
        self._peers: dict[str, Peer] = {}  # address -> peer (this node's own address excluded once known)
        self._self_addresses: set[str] = set()
        self._clashes: set[str] = set()  # addresses answering with this node's node_id, already logged
        self._known: list[str] = []
        self._probes = 0
        self.joined = threading.Event()  # set after the first round of probes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="membership", daemon=True)
        for state in ("serving", "draining", "joining", "down"):
            metrics.cluster_members.labels(state).set_function(lambda state=state: self._count(state))

    # ---- views ----
    def peers(self) -> list[Peer]:
        """Peers that hold entries now (up, serving or draining): a lookup's fan-out, a fetch's sources."""
        with self._lock:
            return [p for p in self._peers.values() if p.holds_entries]

    def peer(self, node_id: str) -> Peer | None:
        with self._lock:
            for p in self._peers.values():
                if p.node_id == node_id and p.up:
                    return p
        return None

    def absent(self, within_s: float) -> int:
        """Members down now that were last seen up (an address that never answered: first known) less
        than `within_s` ago: they may hold copies that no one can ask for now. A member down for
        longer is taken to have had its entries copied elsewhere by the repair passes meanwhile."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for p in self._peers.values() if p.failures >= PROBE_FAILURES and now - p.seen < within_s)

    def placement(self) -> list[str]:
        """Node ids entries are placed on: the serving members that are up, this node included while it
        serves (not while it joins or drains)."""
        with self._lock:
            ids = {p.node_id for p in self._peers.values() if p.up and p.state == npb.NODE_SERVING}
        if self.state == npb.NODE_SERVING:
            ids.add(self.node_id)
        return sorted(ids)

    def _count(self, state: str) -> int:
        with self._lock:
            peers = list(self._peers.values())
        own = 1 if _STATE_NAMES.get(self.state) == state else 0
        if state == "down":  # missed PROBE_FAILURES probes in a row (an address that never answered too)
            return sum(1 for p in peers if p.failures >= PROBE_FAILURES)
        return own + sum(1 for p in peers if p.up and _STATE_NAMES.get(p.state) == state)

    def describe(self) -> list[dict[str, object]]:
        """Each member as this node sees it (logs, tests)."""
        with self._lock:
            rows = [{"node_id": p.node_id, "address": p.address, "up": p.up, "state": _STATE_NAMES.get(p.state, "?")}
                    for p in self._peers.values()]
        return [{"node_id": self.node_id, "address": "self", "up": True,
                 "state": _STATE_NAMES.get(self.state, "?")}, *rows]

    # ---- probing ----
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._probe_s + self._timeout_s + 1)
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for p in peers:
            p.channel.close()

    def probe_now(self) -> None:
        """One round of probes, now (the first round also sets `joined`)."""
        if self._channel.stale():  # rotated certificates: every peer gets a new channel
            self._renew_channels()
        if self._probes % RESOLVE_EVERY == 0 or not self._known:
            self._resolve()
        self._probes += 1
        with self._lock:
            peers = list(self._peers.values())
        calls = [(p, p.stub.Hello.future(npb.HelloRequest(node_id=self.node_id), timeout=self._timeout_s,
                                         metadata=self.metadata)) for p in peers]
        for p, call in calls:
            try:
                answer = call.result()
            except grpc.RpcError as exc:
                self._missed(p, exc)
                continue
            if answer.incarnation == self.incarnation:  # this node's own address
                with self._lock:
                    self._self_addresses.add(p.address)
                    self._peers.pop(p.address, None)
                p.channel.close()
                continue
            if answer.node_id == self.node_id:
                if p.address not in self._clashes:  # once per address, not every probe round
                    self._clashes.add(p.address)
                    log.error("cluster: the member at %s has this node's node_id %r: give every member its own "
                              "(node_id); ignoring it", p.address, self.node_id)
                continue
            if not p.up:
                log.info("cluster: member %s at %s is up (%s)", answer.node_id, p.address,
                         _STATE_NAMES.get(answer.state, "?"))
            p.node_id, p.state, p.incarnation, p.failures, p.seen = (answer.node_id, answer.state, answer.incarnation,
                                                                     0, time.monotonic())
        self.joined.set()

    def _renew_channels(self) -> None:
        with self._lock:
            peers = list(self._peers.values())
            for p in peers:
                p.channel = self._channel(p.address)
                p.stub = npb_grpc.NodeServiceStub(p.channel)
        log.info("cluster: the TLS files changed; new channels to %d peers", len(peers))
        # Calls under way keep their old channel, which gRPC closes once it is no longer referenced.

    def _missed(self, p: Peer, exc: grpc.RpcError) -> None:
        p.failures += 1
        if p.failures == PROBE_FAILURES and p.node_id:
            log.warning("cluster: member %s at %s is down: %d probes unanswered (%s)", p.node_id, p.address,
                        PROBE_FAILURES, exc.code().name if isinstance(exc, grpc.Call) else exc)

    def _resolve(self) -> None:
        try:
            addresses = [a for a in self._addresses() if a]
        except OSError as exc:
            log.warning("cluster: cannot resolve the members (%s); keeping the last %d", exc, len(self._known))
            return
        self._known = addresses
        with self._lock:
            for address in addresses:
                if address not in self._peers and address not in self._self_addresses:
                    channel = self._channel(address)
                    self._peers[address] = Peer(address, channel, npb_grpc.NodeServiceStub(channel))
            gone = [a for a in self._peers if a not in addresses]
            removed = [self._peers.pop(a) for a in gone]
        for p in removed:
            log.info("cluster: member %s at %s left the member list", p.node_id or "?", p.address)
            p.channel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.probe_now()
            except Exception:
                log.exception("cluster: a probe round failed")
            self._stop.wait(max(0.0, self._probe_s - (time.monotonic() - started)))


def static_addresses(peers: str) -> Callable[[], list[str]]:
    addresses = [a.strip() for a in peers.split(",") if a.strip()]
    return lambda: list(addresses)


def dns_addresses(name_port: str) -> Callable[[], list[str]]:
    """The addresses `host:port`'s host resolves to now (a headless Service: one per ready-or-not pod)."""
    host, _, port = name_port.rpartition(":")

    def resolve() -> list[str]:
        found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        ips = sorted({info[4][0] for info in found})
        return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]
    return resolve


def channel_options(target_name: str = "") -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
                                         ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES)]
    if target_name:
        options.append(("grpc.ssl_target_name_override", target_name))
    return options
