"""The daemon's settings: one declarative table feeds command-line flags, env vars and the YAML file.

Precedence, lowest first: the table's defaults, the YAML file (`--config` or FLEXCACHE_CONFIG),
`FLEXCACHE_*` env vars, command-line flags. A key the table does not know is an error wherever it
appears, so a typo never silently falls back to a default; the exceptions are the names Kubernetes
gives service-link variables (FLEXCACHE_PORT=tcp://..., FLEXCACHE_SERVICE_HOST, ...) and the client's
own variables (FLEXCACHE_CLIENT_*: flexcache.client.CacheClient's token and TLS files), never settings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flexcache.client.optional import require


class ConfigError(ValueError):
    """A setting is unknown or its value cannot be used; the message says which and why."""


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
               "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
               "gib": 1024**3, "tib": 1024**4}


def parse_size(value: str | int) -> int:
    """'10GiB' -> 10737418240. Plain integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(f"not a size: {value!r} (examples: 1048576, 512MiB, 10GiB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise ValueError(f"a size cannot be negative: {value!r}")
    return size


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r} (use true or false)")


def parse_thresholds(value: str) -> tuple[tuple[float, float], ...]:
    """'0.95:0.5,0.90:0.4' -> ((0.95, 0.5), (0.9, 0.4)): similarity -> fraction of total steps skipped."""
    pairs = []
    for part in str(value).split(","):
        try:
            sim_text, frac_text = part.split(":")
            sim, frac = float(sim_text), float(frac_text)
        except ValueError:
            raise ValueError(f"bad threshold {part.strip()!r}: expected similarity:fraction") from None
        if not (-1.0 <= sim <= 1.0 and 0.0 < frac < 1.0):
            raise ValueError(f"bad threshold {part.strip()!r}: similarity in [-1, 1], fraction in (0, 1)")
        pairs.append((sim, frac))
    if not pairs:
        raise ValueError("at least one threshold is needed")
    pairs.sort(reverse=True)
    for (sim_hi, frac_hi), (sim_lo, frac_lo) in itertools.pairwise(pairs):
        if frac_hi < frac_lo:  # lookups rely on it: a less similar entry never grants more (cache.py)
            raise ValueError(f"bad thresholds: similarity {sim_hi} grants less than {sim_lo} ({frac_hi} < {frac_lo})")
    return tuple(pairs)


def parse_threshold_map(value: str | Mapping[str, Any]) -> dict[str, tuple[tuple[float, float], ...]]:
    """{glob: thresholds} from YAML, or the same as JSON text from an env var or flag."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of namespace glob -> thresholds")
    out = {}
    for pattern, text in value.items():
        try:
            out[str(pattern)] = parse_thresholds(text)
        except ValueError as exc:
            raise ValueError(f"[{pattern}]: {exc}") from None
    return out


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return "FLEXCACHE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def type_name(self) -> str:
        names = {parse_size: "size", parse_bool: "bool", parse_threshold_map: "mapping",
                 parse_thresholds: "thresholds", str: "str", int: "int", float: "float"}
        return "choice" if self.choices else names[self.parse]


# NIRVANA's table for 50 steps (>=0.95 -> 25, ... >=0.65 -> 5) as fractions of the total steps, so
# it scales to any step count.
NIRVANA_THRESHOLDS = "0.95:0.5,0.90:0.4,0.85:0.3,0.75:0.2,0.65:0.1"

OPTIONS: tuple[Option, ...] = (
    Option("data_dir", str, "./data", "Folder for the RocksDB store and the embedded index."),
    Option("listen", str, "127.0.0.1:50051", "gRPC address to listen on (host:port; port 0 picks one)."),
    Option("metrics_listen", str, "127.0.0.1:9464",
           "Prometheus metrics HTTP address (host:port); empty disables the endpoint."),
    Option("max_bytes", parse_size, "10GiB", "Byte budget for stored entries (blob + record)."),
    Option("high_watermark", float, 0.95, "Evict when stored bytes exceed this fraction of max_bytes."),
    Option("low_watermark", float, 0.85, "Evict down to this fraction of max_bytes."),
    Option("eviction_policy", str, "utility", "Replacement policy.", ("lru", "lcbfu", "utility")),
    Option("utility_half_life", float, 2.0,
           "Utility policy: an entry's credit halves each time new entries totalling this many max_bytes "
           "have been stored (cache turnovers, not seconds: the same at any request rate)."),
    Option("utility_prior_steps", float, 5.0,
           "Utility policy: credit (in steps) a new entry starts with, so it is not evicted before use."),
    Option("skip_thresholds", parse_thresholds, NIRVANA_THRESHOLDS,
           "Similarity -> fraction of total steps a hit may skip, e.g. 0.95:0.5 (NIRVANA's table)."),
    Option("skip_thresholds_by_namespace", parse_threshold_map, {},
           "Per-namespace thresholds: {glob over 'tenant/model/WxHxF/scheduler/steps': thresholds}."),
    Option("composed_max_fraction", float, 0.1,
           "Composed hits (object and background from two entries) skip at most this fraction of the "
           "total steps (0 turns them off, 1 leaves only the table's limit)."),
    Option("guard_max_loss", float, 0.0,
           "Online quality guard (ReportQuality, docs/step_tables.md): the quality loss in points a namespace's "
           "hits may cost; a step-table tier whose reported losses exceed it (by their lower confidence bound) "
           "grants fewer steps. 0: off, unless a namespace's own tables set max_loss."),
    Option("guard_min_samples", int, 20,
           "Quality guard: samples a tier needs at its current grant before the guard changes it (three times as "
           "many before it raises one back)."),
    Option("guard_confidence", float, 0.95,
           "Quality guard: confidence of the bounds on a tier's mean loss (normal: mean -/+ z x sd / sqrt(n)); "
           "the lower one must exceed the budget to lower a tier, the upper be within half of it to raise one."),
    Option("guard_step_fraction", float, 0.1,
           "Quality guard: how much of the total steps one change lowers or raises a tier's fraction by."),
    Option("index_backend", str, "edge", "Vector index: embedded Qdrant Edge shard, or a Qdrant server.",
           ("edge", "qdrant")),
    Option("qdrant_url", str, "", "index_backend=qdrant: server or cluster URL, e.g. http://qdrant:6333."),
    Option("qdrant_api_key", str, "", "index_backend=qdrant: API key."),
    Option("qdrant_prefer_grpc", parse_bool, True, "index_backend=qdrant: talk gRPC to the server."),
    Option("qdrant_path", str, "",
           "index_backend=qdrant: use qdrant-client's local mode in this folder instead of a URL."),
    Option("qdrant_shards", int, 1,
           "index_backend=qdrant: shards of each collection the daemon creates (Qdrant's distributed mode)."),
    Option("qdrant_replication_factor", int, 1,
           "index_backend=qdrant: copies of each shard on the Qdrant cluster's nodes."),
    Option("qdrant_write_consistency", int, 1,
           "index_backend=qdrant: shard copies that must confirm a write before Qdrant acknowledges it."),
    Option("fsync", parse_bool, False, "fsync every write (survives power loss, not only a crash)."),
    Option("scrub_bytes_per_second", parse_size, "4MiB",
           "Background scrubber: blob bytes per second it re-reads with every check on (RocksDB's checksums, "
           "the entry's size and checksum); an entry that fails is deleted. 0 disables."),
    Option("scrub_pause_seconds", float, 60.0,
           "Background scrubber: seconds it waits after startup and between passes."),
    Option("max_blob_bytes", parse_size, "1GiB", "Largest blob one Put may store."),
    Option("max_vector_dim", int, 4096, "Largest accepted embedding dimension."),
    Option("max_namespaces", int, 10_000,
           "Namespaces the daemon holds (a namespace is created by its first Put); a Put that would create "
           "one more is refused (RESOURCE_EXHAUSTED). Existing namespaces stay if it is lowered."),
    Option("tenant_max_bytes", parse_size, 0,
           "Budget bytes one tenant (namespace.tenant) may hold: past high_watermark of it, that tenant's own "
           "entries are evicted (the policy's order) down to low_watermark of it, never another's; global "
           "eviction then takes from tenants over their fair share first. 0: no per-tenant limit."),
    Option("tenant_max_namespaces", int, 0,
           "Namespaces one tenant may hold; a Put that would create one more for it is refused "
           "(RESOURCE_EXHAUSTED). 0: no per-tenant limit (max_namespaces still applies)."),
    Option("tenant_requests_per_second", float, 0.0,
           "Put, PutDirect, Lookup, Fetch, FetchDirect, Delete, Verify and ReportQuality calls per second one "
           "tenant may make (a token bucket); past it RESOURCE_EXHAUSTED. 0: no limit."),
    Option("tenant_request_burst", int, 100,
           "tenant_requests_per_second: the bucket's capacity, the calls a tenant may make at once after a pause."),
    Option("verify_bytes_per_second", parse_size, "64MiB",
           "Blob bytes per second one tenant's Verify calls may make the daemon re-read (bursts of one second's "
           "worth; a larger entry waits for a full budget); past it RESOURCE_EXHAUSTED. 0: no limit."),
    Option("metrics_max_namespaces", int, 100,
           "Namespaces whose metric series carry their own namespace label: the first that many to store an "
           "entry (at a restart, the largest first); the others, and namespaces the daemon does not hold, are "
           "counted under namespace=\"_other\" (gauges summed). Bounds the series clients can create."),
    Option("data_listen", str, "auto",
           "Data port for FetchDirect and PutDirect (host:port): blobs on a TCP connection (TLS with the gRPC "
           "port's certificates), faster than a gRPC stream. 'auto': the host of `listen`, a free port (clients "
           "learn it from each answer); empty disables."),
    Option("advertise_host", str, "",
           "Host (name or IP) clients should dial the data port at, sent with each ticket: this daemon's own "
           "address when clients reach it through a Service in front of several (a pod's IP); empty: the host "
           "the client reached the daemon at."),
    Option("workers", int, 16,
           "gRPC worker threads for unary calls (Lookup, Stats, FetchDirect, ...); streams have their own."),
    Option("stream_workers", int, 64,
           "gRPC worker threads for streams (Put, Fetch, health Watch, reflection), apart from `workers`: "
           "streams that wait on slow clients never take the threads unary calls need."),
    Option("streams_per_client", int, 16,
           "Streams one client address may have open at once; the next is refused (RESOURCE_EXHAUSTED)."),
    Option("stream_idle_seconds", float, 10.0,
           "A call waiting this long on its client (for its request, a Put's next message, a Fetch reader to "
           "take the next message; a data-port reader to take the next bytes) is cut: the client sees CANCELLED."),
    Option("stream_max_seconds", float, 300.0,
           "No call or data-port transfer lasts longer than this, however steadily it moves; longer ones are cut."),
    Option("put_buffer_bytes", parse_size, "4GiB",
           "Blob bytes of Puts being received at once (a Put holds its declared size until it is stored); a Put "
           "past it, or past half of it for one client address, is refused (RESOURCE_EXHAUSTED)."),
    Option("data_idle_seconds", float, 5.0,
           "A data-port connection that brings no whole ticket for this long is closed (clients reconnect)."),
    Option("data_connections_per_client", int, 16,
           "Data-port connections one client address may have open; more are closed at once (that fetch "
           "streams instead)."),
    Option("client_log_seconds", float, 60.0,
           "A client's mistakes (bad requests, stalled or refused calls) are logged at most once per client "
           "address and kind per this many seconds, without a traceback; metrics count every one."),
    Option("drain_seconds", float, 10.0, "On SIGTERM, how long in-flight calls may finish."),
    Option("log_level", str, "INFO", "Logging level.", ("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("port_file", str, "",
           "Once serving, write the ports it got as JSON {\"grpc\", \"data\", \"metrics\"} to this file "
           "(for launchers that pass port 0); empty writes none."),
    Option("tls_cert_file", str, "",
           "PEM certificate chain the gRPC port and the data port serve (TLS); re-read when it changes. Needs "
           "tls_key_file; empty: plain text."),
    Option("tls_key_file", str, "", "PEM private key of tls_cert_file (unencrypted); re-read when it changes."),
    Option("tls_client_ca_file", str, "",
           "PEM CA bundle: clients must present a certificate it signed (mTLS), on both ports; needs "
           "tls_cert_file and tls_key_file."),
    Option("auth_tokens_file", str, "",
           "YAML file of token hashes and certificate identities bound to tenants (`flexcache tokens`); "
           "re-read when it changes. Empty: no authentication."),
    Option("backup_dir", str, "",
           "Folder `flexcache backup` (NodeService.Backup) may write backups into: a backup's path is inside it "
           "(relative to it, or absolute within it). Empty: the daemon takes no backups, since whoever may call "
           "Backup could otherwise make it write wherever it may. Same file system as data_dir: hard links."),
    Option("node_id", str, "",
           "Cluster: this node's stable id, what entries are placed by (rendezvous hashing); empty: the host "
           "name. Every member needs its own, kept across restarts (a StatefulSet pod's name)."),
    Option("peers", str, "",
           "Cluster: the members' gRPC addresses, comma-separated, this node's own included (static membership). "
           "Empty, with peers_dns empty too: no cluster, one daemon."),
    Option("peers_dns", str, "",
           "Cluster: host:port whose name resolves to every member's address (a headless Service), re-resolved "
           "every ten probe intervals; each address is asked its node_id. Instead of peers."),
    Option("replication_factor", int, 2,
           "Cluster: copies of each entry, on different nodes; a Put is acknowledged once that many nodes (or "
           "every live one, if fewer) stored it."),
    Option("peer_token", str, "",
           "Cluster with auth on: an admin token (`flexcache tokens add --admin`) this node sends its peers."),
    Option("peer_ca_file", str, "",
           "Cluster with TLS on: CA bundle this node trusts in its peers' certificates (empty: tls_client_ca_file); "
           "it presents its own tls_cert_file to them, and dials them by peers_dns's host name when set."),
    Option("peer_timeout_seconds", float, 0.5,
           "Cluster: deadline of one call to a peer (a lookup's fan-out, a probe); a peer that misses two probes "
           "in a row is down until it answers one."),
    Option("peer_probe_seconds", float, 1.0, "Cluster: seconds between two probes (NodeService.Hello) of each peer."),
    Option("hedge_seconds", float, 0.05,
           "Cluster: a lookup's fan-out gives a peer still pending this long once the answers in hold a copy of "
           "every entry; a fetch from a peer that has not answered within this long is asked of the next owner "
           "too, and the first answer wins."),
    Option("repair_interval_seconds", float, 30.0,
           "Cluster: seconds between two repair passes: each node copies its entries to owners that lack them "
           "(a replaced or returning node), and hands off those it no longer owns (a node joined)."),
    Option("repair_bytes_per_second", parse_size, "64MiB",
           "Cluster: blob bytes per second a node's repair pass may send its peers."),
)
_BY_NAME = {option.name: option for option in OPTIONS}

CONFIG_FILE = Option("config", str, "",
                     "YAML file of settings, a mapping of setting name to value: above the defaults, below "
                     "env vars and flags; empty reads none.")
"""The layer that names the YAML file: a flag and an env var like the settings, but not a setting
itself (a YAML file cannot name another), so it is not in OPTIONS or Config."""


@dataclass(frozen=True)
class Config:
    data_dir: str
    listen: str
    metrics_listen: str
    max_bytes: int
    high_watermark: float
    low_watermark: float
    eviction_policy: str
    utility_half_life: float
    utility_prior_steps: float
    skip_thresholds: tuple[tuple[float, float], ...]
    skip_thresholds_by_namespace: dict[str, tuple[tuple[float, float], ...]]
    composed_max_fraction: float
    guard_max_loss: float
    guard_min_samples: int
    guard_confidence: float
    guard_step_fraction: float
    index_backend: str
    qdrant_url: str
    qdrant_api_key: str
    qdrant_prefer_grpc: bool
    qdrant_path: str
    qdrant_shards: int
    qdrant_replication_factor: int
    qdrant_write_consistency: int
    fsync: bool
    scrub_bytes_per_second: int
    scrub_pause_seconds: float
    max_blob_bytes: int
    max_vector_dim: int
    max_namespaces: int
    tenant_max_bytes: int
    tenant_max_namespaces: int
    tenant_requests_per_second: float
    tenant_request_burst: int
    verify_bytes_per_second: int
    metrics_max_namespaces: int
    data_listen: str
    advertise_host: str
    workers: int
    stream_workers: int
    streams_per_client: int
    stream_idle_seconds: float
    stream_max_seconds: float
    put_buffer_bytes: int
    data_idle_seconds: float
    data_connections_per_client: int
    client_log_seconds: float
    drain_seconds: float
    log_level: str
    port_file: str
    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    auth_tokens_file: str
    backup_dir: str
    node_id: str
    peers: str
    peers_dns: str
    replication_factor: int
    peer_token: str
    peer_ca_file: str
    peer_timeout_seconds: float
    peer_probe_seconds: float
    hedge_seconds: float
    repair_interval_seconds: float
    repair_bytes_per_second: int

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def clustered(self) -> bool:
        return bool(self.peers or self.peers_dns)

    @property
    def data_address(self) -> str:
        """Where the data port listens ('' if disabled): 'auto' is the host of `listen`, port 0 (none for
        a unix-socket `listen`: its clients dial no TCP host)."""
        if self.data_listen == "auto":
            return "" if self.listen.startswith("unix") else f"{self.listen.rpartition(':')[0]}:0"
        return self.data_listen


assert [f.name for f in fields(Config)] == [o.name for o in OPTIONS], "Config and OPTIONS disagree"


def _parse(option: Option, raw: Any, source: str) -> Any:
    try:
        value = option.parse(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {option.name}: {exc}") from None
    if option.choices and value not in option.choices:
        raise ConfigError(f"{source}: {option.name} must be one of {', '.join(option.choices)}, not {value!r}")
    return value


def _check(config: Config) -> Config:
    if not 0 < config.low_watermark <= config.high_watermark <= 1:
        raise ConfigError("watermarks: need 0 < low_watermark <= high_watermark <= 1")
    if not config.utility_half_life > 0:
        raise ConfigError(f"utility_half_life must be positive, not {config.utility_half_life}")
    if not config.utility_prior_steps >= 0:
        raise ConfigError(f"utility_prior_steps must be at least 0, not {config.utility_prior_steps}")
    if not 0 <= config.composed_max_fraction <= 1:
        raise ConfigError("composed_max_fraction must be between 0 and 1")
    if not 0 <= config.guard_max_loss < float("inf"):
        raise ConfigError(f"guard_max_loss must be a number of at least 0 (0: off), not {config.guard_max_loss}")
    if config.guard_min_samples < 1:
        raise ConfigError(f"guard_min_samples must be at least 1, not {config.guard_min_samples}")
    if not 0.5 <= config.guard_confidence < 1:
        raise ConfigError(f"guard_confidence must be at least 0.5 and below 1, not {config.guard_confidence}")
    if not 0 < config.guard_step_fraction <= 1:
        raise ConfigError(f"guard_step_fraction must be above 0 and at most 1, not {config.guard_step_fraction}")
    if config.data_listen not in ("", "auto") and not re.fullmatch(r".+:\d{1,5}", config.data_listen):
        raise ConfigError(f"data_listen must be host:port, 'auto' or empty, not {config.data_listen!r}")
    if config.workers < 1:
        raise ConfigError("workers must be at least 1")
    if config.max_namespaces < 1:
        raise ConfigError("max_namespaces must be at least 1")
    for name in ("tenant_max_namespaces", "metrics_max_namespaces"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be at least 0 (0: off), not {getattr(config, name)}")
    if not 0 <= config.tenant_requests_per_second < float("inf"):
        raise ConfigError(f"tenant_requests_per_second must be a number of at least 0 (0: off), not "
                          f"{config.tenant_requests_per_second}")
    if config.tenant_request_burst < 1:
        raise ConfigError("tenant_request_burst must be at least 1")
    for name in ("stream_workers", "streams_per_client", "data_connections_per_client"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    for name in ("stream_idle_seconds", "stream_max_seconds", "data_idle_seconds", "client_log_seconds"):
        if not getattr(config, name) > 0:
            raise ConfigError(f"{name} must be positive, not {getattr(config, name)}")
    if config.put_buffer_bytes < 2 * config.max_blob_bytes:
        raise ConfigError(f"put_buffer_bytes ({config.put_buffer_bytes}) must be at least twice max_blob_bytes "
                          f"({config.max_blob_bytes}): one client may hold half of it, and must fit the largest Put")
    if not config.scrub_pause_seconds >= 0:
        raise ConfigError(f"scrub_pause_seconds must be at least 0, not {config.scrub_pause_seconds}")
    if config.index_backend == "qdrant" and not (config.qdrant_url or config.qdrant_path):
        raise ConfigError("index_backend=qdrant needs qdrant_url (or qdrant_path for local mode)")
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise ConfigError("tls_cert_file and tls_key_file go together: set both (TLS) or neither")
    if config.tls_client_ca_file and not config.tls_cert_file:
        raise ConfigError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file: clients verify the "
                          "daemon's certificate before it asks for theirs")
    if config.peers and config.peers_dns:
        raise ConfigError("peers and peers_dns are two ways to name the members: set one")
    if config.peers_dns and not re.fullmatch(r"[^\s:]+:\d{1,5}", config.peers_dns):
        raise ConfigError(f"peers_dns must be host:port, not {config.peers_dns!r}")
    for address in filter(None, (a.strip() for a in config.peers.split(","))):
        if not re.fullmatch(r".+:\d{1,5}", address):
            raise ConfigError(f"peers: {address!r} is not host:port")
    for name in ("qdrant_shards", "qdrant_replication_factor", "qdrant_write_consistency"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    if config.qdrant_write_consistency > config.qdrant_replication_factor:
        raise ConfigError("qdrant_write_consistency cannot exceed qdrant_replication_factor")
    if config.clustered and config.index_backend == "qdrant" and not config.qdrant_url:
        raise ConfigError("a cluster with index_backend=qdrant shares one index: it needs qdrant_url (a Qdrant server "
                          "or cluster); qdrant_path's local mode belongs to one process")
    if config.replication_factor < 1:
        raise ConfigError("replication_factor must be at least 1")
    for name in ("peer_timeout_seconds", "peer_probe_seconds", "repair_interval_seconds"):
        if not getattr(config, name) > 0:
            raise ConfigError(f"{name} must be positive, not {getattr(config, name)}")
    if not config.hedge_seconds >= 0:
        raise ConfigError(f"hedge_seconds must be at least 0, not {config.hedge_seconds}")
    return config


CLIENT_ENV_PREFIX = "FLEXCACHE_CLIENT_"  # the client's variables (client/client.py), which a pod may set for both
_SERVICE_LINK = re.compile(
    r"FLEXCACHE\w*?(_SERVICE_HOST|_SERVICE_PORT(_\w+)?|_PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)"
)


def service_links(env: Mapping[str, str]) -> list[str]:
    """The names in `env` that `resolve` passes over as Kubernetes service links (the daemon logs them)."""
    return sorted(key for key, value in env.items() if key.startswith("FLEXCACHE_") and _is_service_link(key, value))


def _is_service_link(key: str, value: str) -> bool:
    """Variables Kubernetes injects for a Service named flexcache*, e.g. FLEXCACHE_SERVICE_HOST or
    FLEXCACHE_PORT=tcp://10.0.0.1:50051: not settings, so not typos either."""
    if _SERVICE_LINK.fullmatch(key):
        return True
    return key.endswith("_PORT") and value.startswith(("tcp://", "udp://", "sctp://"))


def load_yaml(path: str) -> dict[str, Any]:
    yaml = require("yaml", "daemon", "a --config file")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of setting: value")
    return data


def resolve(
    yaml_values: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Merge the layers over the defaults and validate; unknown keys raise ConfigError."""
    env = os.environ if env is None else env
    values = {o.name: _parse(o, o.default, "default") for o in OPTIONS}
    for key, raw in (yaml_values or {}).items():
        if key not in _BY_NAME:
            raise ConfigError(f"config file: unknown setting {key!r}")
        values[key] = _parse(_BY_NAME[key], raw, "config file")
    known_env = {o.env for o in OPTIONS} | {CONFIG_FILE.env}
    for key, raw in env.items():
        if (key.startswith("FLEXCACHE_") and key not in known_env and not key.startswith(CLIENT_ENV_PREFIX)
                and not _is_service_link(key, raw)):
            raise ConfigError(f"environment: unknown setting {key}")
    for option in OPTIONS:
        if option.env in env:
            values[option.name] = _parse(option, env[option.env], option.env)
    for key, raw in (flags or {}).items():
        if raw is not None:
            values[key] = _parse(_BY_NAME[key], raw, _BY_NAME[key].flag)
    return _check(Config(**values))


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option; each flag's default is None so that 'not given' is distinguishable."""
    parser.add_argument(CONFIG_FILE.flag, dest=CONFIG_FILE.name, default=None, metavar="PATH",
                        help=f"{CONFIG_FILE.help} [env {CONFIG_FILE.env}]")
    for option in OPTIONS:
        parser.add_argument(option.flag, dest=option.name, default=None, metavar=option.type_name.upper(),
                            help=f"{option.help} [env {option.env}; default {option.default!r}]")


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """The settings of parsed `add_flags` flags over `env` (the process's by default). The YAML file is
    `--config`, else FLEXCACHE_CONFIG from that same `env` (read here, not when the parser is built, so
    the caller's `env` decides); `--config ''` reads no file even when FLEXCACHE_CONFIG names one."""
    env = os.environ if env is None else env
    path = args.config if args.config is not None else env.get(CONFIG_FILE.env, "")
    yaml_values = load_yaml(path) if path else None
    return resolve(yaml_values, env, {o.name: getattr(args, o.name) for o in OPTIONS})


def markdown_table(options: Sequence[Option] = (CONFIG_FILE, *OPTIONS)) -> str:
    """The README's settings table, generated so it cannot drift from the code (the first row is the
    YAML file itself, `--config`)."""
    rows = ["| setting | flag | env | type | default | meaning |", "|---|---|---|---|---|---|"]
    for o in options:
        default = "" if o.default in ("", {}) else f"`{o.default}`"
        meaning = o.help + (f" One of: {', '.join(o.choices)}." if o.choices else "")
        rows.append(f"| `{o.name}` | `{o.flag}` | `{o.env}` | {o.type_name} | {default} | {meaning} |")
    return "\n".join(rows)
