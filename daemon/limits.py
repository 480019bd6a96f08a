"""The cache core's limits: one frozen record, built from the settings by `build.limits_of`.

It has a module of its own because several modules read it (validate: request sizes; ledger: the
budget the turnover clock counts in, the utility prior and half-life; cache: the watermarks; tenants:
the per-tenant limits; metrics: how many namespaces keep a label of their own) and none of them should
import another only to reach it. Frozen: the limits are fixed for a daemon's
lifetime, so no module can change what the others check against.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_bytes: int  # budget for stored entries: blobs, records and vectors (entries.record_size)
    high_watermark: float  # fraction of max_bytes whose crossing starts an eviction pass
    low_watermark: float  # fraction of max_bytes an eviction pass evicts down to
    max_blob_bytes: int  # the largest blob a Put may declare
    max_vector_dim: int  # the largest vector a request may carry
    utility_half_life: float  # turnovers of new entries (stored bytes / max_bytes) over which credit halves
    utility_prior_steps: float  # credit a new entry starts with, in denoising steps of its model
    max_namespaces: int = 10_000  # namespaces a daemon holds; a Put that would create one more is refused
    # Per tenant (namespace.tenant; tenants.py); limits and rates 0 = off:
    tenant_max_bytes: int = 0  # budget bytes one tenant may hold; past it, its own entries are evicted
    tenant_max_namespaces: int = 0  # namespaces one tenant may hold; a Put creating one more is refused
    tenant_requests_per_second: float = 0.0  # Put, Lookup, Fetch, Delete and Verify calls, token bucket
    tenant_request_burst: int = 100  # the bucket's capacity
    verify_bytes_per_second: int = 0  # blob bytes a tenant's Verify calls may make the daemon re-read
    metrics_max_namespaces: int = 100  # namespaces with a metric label of their own; the rest are "_other"
