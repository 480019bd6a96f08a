"""Prometheus metrics, served on their own HTTP port. The README's metrics table is generated from here."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

disable_created_metrics()  # the *_created series only double the scrape size

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = tuple(2.0**k for k in range(10, 33, 2))  # 1 KiB .. 4 GiB


class Metrics:
    def __init__(self) -> None:
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
                           "Lookups, by namespace and result: hit (whole prompt), composed (object and background "
                           "donors), partial (one part's donors) or miss.", ("namespace", "result"))
        self.misses = add(Counter, "flexcache_lookup_misses_total", "Missed lookups, by namespace and reason.",
                          ("namespace", "reason"))
        self.hits = add(Counter, "flexcache_hits_total", "Entries served (fetched), by namespace and role.",
                        ("namespace", "role"))
        self.steps = add(Counter, "flexcache_steps_granted_total",
                         "Denoising steps that served entries let workers skip, by namespace and role.",
                         ("namespace", "role"))
        self.entries = add(Gauge, "flexcache_entries", "Entries stored, by namespace.", ("namespace",))
        self.bytes = add(Gauge, "flexcache_stored_bytes", "Bytes stored (blobs and records), by namespace.",
                         ("namespace",))
        self.blob_bytes = add(Gauge, "flexcache_stored_blob_bytes",
                              "Latent blob bytes stored (as sent: compressed or not), by namespace.", ("namespace",))
        self.max_bytes = add(Gauge, "flexcache_max_bytes", "The configured byte budget.")
        self.evictions = add(Counter, "flexcache_evictions_total", "Entries evicted, by policy.", ("policy",))
        self.evicted_bytes = add(Counter, "flexcache_evicted_bytes_total", "Bytes evicted, by policy.",
                                 ("policy",))
        self.data_transfers = add(Counter, "flexcache_data_port_transfers_total",
                                  "Data-port tickets, by outcome: sent, expired (never redeemed), failed (the "
                                  "client went away or the entry could not be read) or refused (a ticket the "
                                  "daemon does not hold).", ("outcome",))
        self.corrupt = add(Counter, "flexcache_corrupt_entries_total",
                           "Entries a client reported (Verify) that the daemon found corrupt on disk and deleted.")
        self.reconciled = add(Counter, "flexcache_reconciled_total",
                              "Startup repairs: index points removed (orphan_point) or entries re-indexed "
                              "(reindexed).", ("action",))

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
