"""The cache core's limits: one frozen record, built from the settings by `build.limits_of`.

It has a module of its own because three modules read it (validate: request sizes; ledger: the
budget the turnover clock counts in, the utility prior and half-life; cache: the watermarks) and
none of them should import another only to reach it. Frozen: the limits are fixed for a daemon's
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
