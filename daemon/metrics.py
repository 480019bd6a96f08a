"""Prometheus metrics, served on their own HTTP port. The README's metrics table is generated from here.

Label values are bounded: a metric's labels come from fixed sets (methods, codes, roles, reasons,
policies) except the namespace label, whose values are namespace names that any client can make up.
Every metric with a namespace label takes its value from `NamespaceLabels` (the rule is there), so
the number of series stays bounded by metrics_max_namespaces whatever clients send. No label or
log line ever carries prompt text.
"""

from __future__ import annotations

import platform
import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from .version import version

disable_created_metrics()  # the *_created series only double the scrape size

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = tuple(2.0**k for k in range(10, 33, 2))  # 1 KiB .. 4 GiB
# An evicted entry's age: 1 s .. 30 days. The thrash alert (deploy/prometheus) reads the 300 s bucket.
_AGE_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600, 30 * 24 * 3600)

# The standard series prometheus_client's ProcessCollector (Linux: read from /proc) and
# PlatformCollector add to the daemon's registry: described here for the README's table.
_STANDARD = (
    ("process_cpu_seconds_total", "counter", (), "Standard (prometheus_client): user and system CPU seconds."),
    ("process_resident_memory_bytes", "gauge", (), "Standard: resident memory."),
    ("process_virtual_memory_bytes", "gauge", (), "Standard: virtual memory."),
    ("process_open_fds", "gauge", (), "Standard: open file descriptors."),
    ("process_max_fds", "gauge", (), "Standard: the file descriptor limit."),
    ("process_start_time_seconds", "gauge", (), "Standard: the process's start time, Unix seconds."),
    ("python_info", "gauge", ("implementation", "major", "minor", "patchlevel", "version"),
     "Standard: the Python interpreter, value 1."),
)


OTHER = "_other"  # the namespace label value of every namespace without a label of its own


class NamespaceLabels:
    """The namespace label value of every metric with a namespace label.

    Rule: the first `limit` namespaces the cache assigns (`assign`) keep their own name as their label,
    for the process's lifetime; every other namespace is counted under the single value "_other". The
    cache assigns a namespace when it comes to hold entries: at startup the stored namespaces, the
    largest (in stored bytes) first, then each new namespace as its first entry is stored. A namespace
    that only lookups and fetches name (they create none: made-up names cost nothing) is never
    assigned, so it is always "_other" (`of`). Why first-come among namespaces that store entries
    rather than "namespaces of known tenants": the core does not see credentials (the server checks
    them), and storing is what costs a client something (bytes within tenant_max_bytes, namespaces
    within tenant_max_namespaces and max_namespaces); at a restart the namespaces holding the most
    keep their labels.

    A label never changes meaning while the daemon runs (a counter never moves between series), and
    memory is bounded by `limit` names. Gauges summed under "_other" are the sum over the namespaces
    it aggregates: the ledger keeps per-label totals (ledger.py). Thread-safe."""

    def __init__(self, limit: int = 100):
        self._limit = limit
        self._own: set[str] = set()
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        """metrics_max_namespaces, set once the settings are known (before the cache opens). Names that
        have their label already keep it."""
        with self._lock:
            self._limit = limit

    def assign(self, name: str) -> str:
        """The label of namespace `name`, which now holds entries: its own name while fewer than
        `limit` have one, else "_other". The same answer for the same name every time."""
        with self._lock:
            if name in self._own:
                return name
            if len(self._own) < self._limit:
                self._own.add(name)
                return name
            return OTHER

    def of(self, name: str) -> str:
        """The label of a namespace without assigning one: its own name if it has one, else "_other"."""
        return name if name in self._own else OTHER

    @property
    def own(self) -> int:
        """Namespaces with a label of their own."""
        return len(self._own)


class Metrics:
    def __init__(self, max_namespaces: int = 100) -> None:
        self.namespace_labels = NamespaceLabels(max_namespaces)
        self.registry = CollectorRegistry()
        self.described: list[tuple[str, str, tuple[str, ...], str]] = []
        add = self._add
        self.requests = add(Counter, "flexcache_requests_total", "RPCs handled, by method and gRPC status code.",
                            ("method", "code"))
        self.latency = add(Histogram, "flexcache_request_duration_seconds", "RPC latency, by method.",
                           ("method",), buckets=_LATENCY_BUCKETS)
        self.payload = add(Histogram, "flexcache_payload_bytes", "Blob bytes per Put or Fetch.", ("method",),
                           buckets=_SIZE_BUCKETS)
        self.lookups = add(Counter, "flexcache_lookups_total",
                           "Lookups, by namespace (a namespace the daemon does not hold is _other) and result: hit "
                           "(whole prompt), composed (object and background donors), partial (one part's donors) or "
                           "miss.", ("namespace", "result"))
        self.misses = add(Counter, "flexcache_lookup_misses_total",
                          "Missed lookups, by namespace (or _other) and reason.", ("namespace", "reason"))
        self.hits = add(Counter, "flexcache_hits_total",
                        "Entries served (fetched), by namespace (or _other) and role.", ("namespace", "role"))
        self.steps = add(Counter, "flexcache_steps_granted_total",
                         "Denoising steps that served entries let workers skip, by namespace (or _other) and role.",
                         ("namespace", "role"))
        self.gpu_seconds = add(Counter, "flexcache_gpu_seconds_saved_total",
                               "GPU seconds that served entries saved workers, by namespace (or _other) and role: "
                               "each fetch's granted steps x the role's share (full 1, object and background 0.5 "
                               "each) x the seconds per step its entry's worker measured (PutHeader.step_seconds). "
                               "Entries stored without a measurement (step_seconds 0, "
                               "or stored by a daemon before this metric) add nothing here, only to "
                               "flexcache_steps_granted_total.", ("namespace", "role"))
        self.entries = add(Gauge, "flexcache_entries",
                           "Entries stored, by namespace (_other: the sum over the namespaces without a label of "
                           "their own, metrics_max_namespaces).", ("namespace",))
        self.bytes = add(Gauge, "flexcache_stored_bytes",
                         "Bytes stored (blobs and records), by namespace (or _other, summed).", ("namespace",))
        self.blob_bytes = add(Gauge, "flexcache_stored_blob_bytes",
                              "Latent blob bytes stored (as sent: compressed or not), by namespace (or _other, "
                              "summed).", ("namespace",))
        self.max_bytes = add(Gauge, "flexcache_max_bytes", "The configured byte budget.")
        self.evictions = add(Counter, "flexcache_evictions_total", "Entries evicted, by policy.", ("policy",))
        self.tenant_evictions = add(Counter, "flexcache_tenant_evictions_total",
                                    "Entries evicted because their tenant held more than tenant_max_bytes (counted "
                                    "in flexcache_evictions_total too).")
        self.evicted_bytes = add(Counter, "flexcache_evicted_bytes_total", "Bytes evicted, by policy.",
                                 ("policy",))
        self.evicted_age = add(Histogram, "flexcache_evicted_entry_age_seconds",
                               "Age (since it was stored) of each evicted entry, by policy: many young ones mean "
                               "the budget thrashes (entries evicted before they could be reused).", ("policy",),
                               buckets=_AGE_BUCKETS)
        self.data_transfers = add(Counter, "flexcache_data_port_transfers_total",
                                  "Data-port tickets, by outcome: sent (a fetch), received (a put, stored), "
                                  "refused_put (a put received and refused: its reply says why), expired (never "
                                  "redeemed), failed (the client went away or stalled, or the entry could not be "
                                  "read) or refused (a ticket the daemon does not hold, or another caller's).",
                                  ("outcome",))
        self.corrupt = add(Counter, "flexcache_corrupt_entries_total",
                           "Entries found corrupt on disk and deleted, by who found them: client (a client's "
                           "Verify after a failed checksum) or scrubber (the background scrubber).", ("found_by",))
        self.scrubbed_bytes = add(Counter, "flexcache_scrubbed_bytes_total",
                                  "Blob bytes the background scrubber has re-read and checked "
                                  "(scrub_bytes_per_second).")
        self.scrub_passes = add(Counter, "flexcache_scrub_passes_total",
                                "Passes of the background scrubber over every stored entry.")
        self.disk_bytes = add(Gauge, "flexcache_disk_bytes",
                              "Bytes the data folder occupies on disk (allocated blocks: the store's segment files, "
                              "its RocksDB files and write-ahead log, and the embedded index), measured at each "
                              "scrape.")
        self.segment_bytes = add(Gauge, "flexcache_segment_bytes",
                                 "Bytes in the store's segment files (the blobs), by state: live (committed entries) "
                                 "or dead (deleted, moved, or never committed: what the collector gives back).",
                                 ("state",))
        self.collected_bytes = add(Counter, "flexcache_collected_bytes_total",
                                   "Live blob bytes the segment collector has copied out of mostly dead segments "
                                   "so that it could delete them.")
        self.disk_full = add(Gauge, "flexcache_disk_full",
                             "1 while the store refuses writes because the disk is full (less free than the "
                             "store's reserve, or RocksDB out of space), else 0.")
        self.refused_writes = add(Counter, "flexcache_refused_writes_total",
                                  "Writes refused because the disk was full, by write: put (answered "
                                  "RESOURCE_EXHAUSTED), usage (a fetch's usage record, skipped; the fetch served) or "
                                  "step_tables (a SetStepTables or a guard change, answered RESOURCE_EXHAUSTED) or "
                                  "guard_figures (the guard's figures after a report, skipped; the report counted).",
                                  ("write",))
        self.lost = add(Counter, "flexcache_lost_entries_total",
                        "Acknowledged puts found missing at startup: RocksDB's write-ahead log was damaged or cut "
                        "short after they were acknowledged, and its recovery dropped them.")
        self.reconciled = add(Counter, "flexcache_reconciled_total",
                              "Index repairs, made as each namespace is first used after a start (or after its "
                              "index shard was lost): index points removed (orphan_point) or entries re-indexed "
                              "(reindexed).", ("action",))
        self.namespaces = add(Gauge, "flexcache_namespaces",
                              "Namespaces the daemon holds (created by their first Put; at most max_namespaces).")
        self.aggregated_namespaces = add(Gauge, "flexcache_aggregated_namespaces",
                                    "Namespaces the daemon holds whose series are counted under namespace=\"_other\": "
                                    "those past the first metrics_max_namespaces, which keep a label of their own.")
        self.open_shards = add(Gauge, "flexcache_index_open_shards",
                               "Embedded index shards open now (each holds a search thread and its vectors in "
                               "memory; past a fixed number the least recently used idle one is closed).")
        self.shard_loads = add(Counter, "flexcache_index_shard_loads_total",
                               "Embedded index shards loaded from disk: at first use after a start, and again "
                               "after an idle one was closed (a high rate: more namespaces in use than stay open).")
        self.bad_requests = add(Counter, "flexcache_bad_requests_total",
                                "Requests refused as the client's mistake, by method and reason: undecodable (not "
                                "a message of the method's request type), invalid (fails a check), too_large "
                                "(over a size limit) or corrupt (a Put whose bytes do not match its checksum).",
                                ("method", "reason"))
        self.calls_cut = add(Counter, "flexcache_calls_cut_total",
                             "Calls the daemon cancelled, by method and reason: idle (waited stream_idle_seconds on "
                             "the client) or too_long (ran stream_max_seconds).", ("method", "reason"))
        self.calls_refused = add(Counter, "flexcache_calls_refused_total",
                                 "Calls refused before any work, by method and reason: unauthenticated or "
                                 "permission_denied (auth_tokens_file: no known credential, or another tenant's "
                                 "namespace), and RESOURCE_EXHAUSTED ones: "
                                 "client_streams (the address has streams_per_client streams open), put_buffer "
                                 "(put_buffer_bytes, or one address's half of it, is taken), tenant_requests (the "
                                 "tenant is past tenant_requests_per_second) or verify_bytes (the tenant's Verify "
                                 "calls are past verify_bytes_per_second).", ("method", "reason"))
        self.open_streams = add(Gauge, "flexcache_open_streams",
                                "Streams in progress (Put, Fetch, health Watch, reflection).")
        self.put_buffer = add(Gauge, "flexcache_put_buffer_bytes",
                              "Blob bytes that Puts being received hold of put_buffer_bytes.")
        self.data_connections = add(Counter, "flexcache_data_port_connections_total",
                                    "Data-port connections, by outcome: accepted, client_share (closed at once: the "
                                    "address had data_connections_per_client open), full (closed at once: the port "
                                    "had its maximum open), idle_closed (no TLS handshake, HELLO or whole ticket "
                                    "within data_idle_seconds) or unauthenticated (a HELLO without a known "
                                    "credential).",
                                    ("outcome",))
        self.data_open = add(Gauge, "flexcache_data_port_open_connections", "Data-port connections open now.")
        self.cluster_members = add(Gauge, "flexcache_cluster_members",
                                   "Cluster (peers or peers_dns set): the members this node sees, itself included, "
                                   "by state: serving, draining, joining or down (missed two probes in a row).",
                                   ("state",))
        self.under_replicated = add(Gauge, "flexcache_cluster_under_replicated_entries",
                                    "Cluster: entries held here that had fewer than replication_factor copies on "
                                    "their owners at the end of this node's last repair pass.")
        self.replication_bytes = add(Counter, "flexcache_cluster_replication_bytes_total",
                                     "Cluster: blob bytes this node sent its peers, by reason: put (a Put's copies), "
                                     "repair (an owner lacked a copy) or handoff (a copy moved to an owner before "
                                     "this node dropped its own).", ("reason",))
        self.handoffs = add(Counter, "flexcache_cluster_handoffs_total",
                            "Cluster: entries this node dropped once their owners held them (it was not an owner: "
                            "a node joined, or this one drains).")
        self.fanout = add(Histogram, "flexcache_cluster_fanout_seconds",
                          "Cluster: time a Lookup waited for its peers' answers (NodeService.Gather), and a Fetch "
                          "from a peer for its first message.", ("method",), buckets=_LATENCY_BUCKETS)
        self.peer_errors = add(Counter, "flexcache_cluster_peer_errors_total",
                               "Cluster: calls to a peer that failed or missed peer_timeout_seconds, by peer node_id "
                               "and method; a Gather is also counted when the lookup went on without it (it had not "
                               "answered hedge_seconds after the answers in held a copy of every entry).",
                               ("peer", "method"))
        self.guard_samples = add(Counter, "flexcache_guard_samples_total",
                                 "Quality samples workers reported (ReportQuality), by table (whole, composed, "
                                 "partial_object, partial_background) and result: accepted (taken at the tier's "
                                 "current grant: counted by the online quality guard) or stale (another grant, or a "
                                 "namespace the daemon keeps no figures for: not used).", ("table", "result"))
        self.guard_changes = add(Counter, "flexcache_guard_changes_total",
                                 "Step-table tiers the online quality guard changed, by table and direction: lower "
                                 "(the loss's upper bound was above max_loss) or raise (at most half of it, up to the "
                                 "tables last set).", ("table", "direction"))
        self.build_info = add(Gauge, "flexcache_build_info",
                              "Value 1, labelled with the daemon's version (the installed distribution's) and the "
                              "Python version it runs on.", ("version", "python"))
        self.build_info.labels(version(), platform.python_version()).set(1)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.described.extend(_STANDARD)

    def _add(self, kind: type, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs: object):
        self.described.append((name, kind.__name__.lower(), labels, doc))
        return kind(name.removesuffix("_total"), doc, labels, registry=self.registry, **kwargs)

    def serve(self, listen: str) -> int:
        """Start the /metrics endpoint; returns its port (useful when `listen` asks for port 0)."""
        host, _, port = listen.rpartition(":")
        server, _ = start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
        return server.server_port

    def markdown_table(self) -> str:
        rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
        for name, kind, labels, doc in self.described:
            rows.append(f"| `{name}` | {kind} | {', '.join(labels)} | {doc} |")
        return "\n".join(rows)
