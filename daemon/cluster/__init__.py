"""Several daemons acting as one cache (docs/cluster.md).

    placement.py   entry id -> its owners: rendezvous hashing over the members' node ids
    membership.py  who the members are (peers or peers_dns) and who answers (NodeService.Hello probes)
    node.py        CacheService for the whole cluster: puts stored on the owners, lookups merged from
                   every member, fetches from the owners (hedged)
    repair.py      every entry back to its copies on its owners (repair passes); fetches and evictions
                   passed to the other copies
    service.py     NodeService: what peers and operators ask of one node

`open_cluster` builds them over an open Cache; the daemon (server.py) serves the ClusterNode as its
CacheService front and the NodeServicer beside it. A daemon without peers or peers_dns is no cluster,
and none of this runs.
"""

from __future__ import annotations

import logging
import secrets
import socket
from pathlib import Path

import grpc

from flexcache.v1 import node_pb2 as npb

from ..cache import Cache
from ..config import Config
from ..metrics import Metrics
from .membership import Membership, channel_options, dns_addresses, static_addresses
from .node import ClusterNode
from .repair import Notifier, Repairer

# How long a lost member counts against a lookup's hedge (ClusterNode._gathered): this many repair
# passes, and at least ABSENT_MIN_S, for them to copy its entries to the members that are left.
ABSENT_REPAIR_PASSES = 10
ABSENT_MIN_S = 60.0

log = logging.getLogger(__name__)

__all__ = ["Cluster", "node_id_of", "open_cluster"]


def node_id_of(config: Config) -> str:
    return config.node_id or socket.gethostname()


class Cluster:
    """A started cluster node: membership probing, the front, the repair passes and the notifier."""

    def __init__(self, membership: Membership, node: ClusterNode, repairer: Repairer, notifier: Notifier):
        self.membership = membership
        self.node = node
        self.repairer = repairer
        self.notifier = notifier

    def start(self, join_timeout_s: float) -> None:
        """Probe the peers once (so the first puts and lookups know them), then serve and repair."""
        self.membership.start()
        if not self.membership.joined.wait(join_timeout_s):
            log.warning("cluster: the first round of probes took over %.1f s; serving with what is known",
                        join_timeout_s)
        self.membership.state = npb.NODE_SERVING
        self.notifier.start()
        self.repairer.start()
        log.info("cluster: node %s joined: %s", self.node.node_id, self.membership.describe())

    def drain(self) -> None:
        """Take no new share; the repair pass hands every entry to its owners among the others."""
        log.info("cluster: node %s drains", self.node.node_id)
        self.membership.state = npb.NODE_DRAINING
        self.repairer.wake()

    def stop(self) -> None:
        self.repairer.stop()
        self.notifier.stop()
        self.membership.stop()
        self.node.close()


class PeerChannels:
    """Channels to peers (membership.ChannelFactory): plain, or TLS trusting peer_ca_file (else
    tls_client_ca_file) and presenting this node's own certificate, dialled by peers_dns's host name
    when set (certificates name the Service, not pod IPs). `stale()` says when a file changed since the
    credentials were read (a rotation): the membership then makes its channels anew."""

    def __init__(self, config: Config):
        self._target_name = config.peers_dns.rpartition(":")[0] if config.peers_dns else ""
        ca_file = config.peer_ca_file or config.tls_client_ca_file
        self._files = [Path(f) for f in (config.tls_cert_file, config.tls_key_file, ca_file) if f]
        self._tls = bool(config.tls_cert_file)
        self._ca_file = ca_file
        self._cert_file, self._key_file = config.tls_cert_file, config.tls_key_file
        self._read()

    def _signature(self) -> tuple[float, ...]:
        return tuple(f.stat().st_mtime_ns if f.exists() else -1 for f in self._files)

    def _read(self) -> None:
        self._seen = self._signature()
        if self._tls:
            roots = Path(self._ca_file).read_bytes() if self._ca_file else None
            self._credentials = grpc.ssl_channel_credentials(roots, Path(self._key_file).read_bytes(),
                                                             Path(self._cert_file).read_bytes())

    def stale(self) -> bool:
        if self._signature() == self._seen:
            return False
        try:
            self._read()
        except OSError as exc:  # half-written during a rotation: the next probe round reads again
            log.warning("cluster: reading the peers' TLS files failed (%s); keeping the channels", exc)
            return False
        return True

    def __call__(self, address: str) -> grpc.Channel:
        if not self._tls:
            return grpc.insecure_channel(address, options=channel_options())
        return grpc.secure_channel(address, self._credentials, options=channel_options(self._target_name))


def open_cluster(config: Config, cache: Cache, metrics: Metrics) -> Cluster:
    addresses = dns_addresses(config.peers_dns) if config.peers_dns else static_addresses(config.peers)
    metadata = (("authorization", f"Bearer {config.peer_token}"),) if config.peer_token else ()
    membership = Membership(node_id_of(config), secrets.token_hex(8), addresses, PeerChannels(config), metadata,
                            config.peer_probe_seconds, config.peer_timeout_seconds, metrics)
    node = ClusterNode(cache, membership, metrics, replicas=config.replication_factor,
                       timeout_s=config.peer_timeout_seconds, hedge_s=config.hedge_seconds,
                       transfer_timeout_s=config.stream_max_seconds,
                       absent_s=max(ABSENT_MIN_S, ABSENT_REPAIR_PASSES * config.repair_interval_seconds))
    notifier = Notifier(node)
    cache.events.fetched = notifier.fetched
    cache.events.evicted = notifier.evicted
    return Cluster(membership, node, Repairer(node, config.repair_interval_seconds, config.repair_bytes_per_second),
                   notifier)
