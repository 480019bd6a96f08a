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


def _channel_factory(config: Config):  # type: ignore[no-untyped-def]
    """Channels to peers: plain, or TLS trusting peer_ca_file (else tls_client_ca_file) and presenting
    this node's own certificate; dialled by peers_dns's host name when set (certificates name the
    Service, not pod IPs)."""
    target_name = config.peers_dns.rpartition(":")[0] if config.peers_dns else ""
    if not config.tls_cert_file:
        return lambda address: grpc.insecure_channel(address, options=channel_options())
    ca_file = config.peer_ca_file or config.tls_client_ca_file
    roots = Path(ca_file).read_bytes() if ca_file else None
    key, chain = Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes()
    credentials = grpc.ssl_channel_credentials(roots, key, chain)
    return lambda address: grpc.secure_channel(address, credentials, options=channel_options(target_name))


def open_cluster(config: Config, cache: Cache, metrics: Metrics) -> Cluster:
    addresses = dns_addresses(config.peers_dns) if config.peers_dns else static_addresses(config.peers)
    metadata = (("authorization", f"Bearer {config.peer_token}"),) if config.peer_token else ()
    membership = Membership(node_id_of(config), secrets.token_hex(8), addresses, _channel_factory(config), metadata,
                            config.peer_probe_seconds, config.peer_timeout_seconds, metrics)
    node = ClusterNode(cache, membership, metrics, replicas=config.replication_factor,
                       timeout_s=config.peer_timeout_seconds, hedge_s=config.hedge_seconds,
                       transfer_timeout_s=config.stream_max_seconds)
    notifier = Notifier(node)
    cache.events.fetched = notifier.fetched
    cache.events.evicted = notifier.evicted
    return Cluster(membership, node, Repairer(node, config.repair_interval_seconds, config.repair_bytes_per_second),
                   notifier)
