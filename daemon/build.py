"""The one place that assembles a daemon's cache core from its settings: `flexcache serve`, the tests
and the benchmarks all build it here, so none of them drifts from the daemon's defaults."""

from __future__ import annotations

from .cache import Cache
from .config import Config
from .eviction import make_policy
from .index import VectorIndex, open_index
from .limits import Limits
from .metrics import Metrics
from .quality import GuardSettings
from .steps import StepTable
from .store import Store


def limits_of(config: Config) -> Limits:
    return Limits(config.max_bytes, config.high_watermark, config.low_watermark, config.max_blob_bytes,
                  config.max_vector_dim, config.utility_half_life, config.utility_prior_steps,
                  config.max_namespaces, tenant_max_bytes=config.tenant_max_bytes,
                  tenant_max_namespaces=config.tenant_max_namespaces,
                  tenant_requests_per_second=config.tenant_requests_per_second,
                  tenant_request_burst=config.tenant_request_burst,
                  verify_bytes_per_second=config.verify_bytes_per_second,
                  metrics_max_namespaces=config.metrics_max_namespaces)


def open_cache(config: Config, metrics: Metrics | None = None, index: VectorIndex | None = None) -> Cache:
    """Open the store and the index under `config.data_dir`, load and reconcile them; `index` replaces
    the configured backend (a benchmark that fills the store first and indexes in bulk after).
    Close the result with `Cache.close()`."""
    store = Store(config.data_path / "store", fsync=config.fsync, max_bytes=config.max_bytes)
    try:
        if index is None:
            index = open_index(config.index_backend, config.data_path, url=config.qdrant_url,
                               api_key=config.qdrant_api_key, prefer_grpc=config.qdrant_prefer_grpc,
                               path=config.qdrant_path, shards=config.qdrant_shards,
                               replication_factor=config.qdrant_replication_factor,
                               write_consistency=config.qdrant_write_consistency)
        steps = StepTable(config.skip_thresholds, config.skip_thresholds_by_namespace, config.composed_max_fraction)
        guard = GuardSettings(config.guard_max_loss, config.guard_min_samples, config.guard_confidence,
                              config.guard_step_fraction)
        cache = Cache(store, index, make_policy(config.eviction_policy), steps, metrics or Metrics(),
                      limits_of(config), shared_index=config.clustered and config.index_backend == "qdrant",
                      guard=guard)
        cache.open()
        cache.start_scrubber(config.scrub_bytes_per_second, config.scrub_pause_seconds)
    except BaseException:
        if index is not None:
            index.close()
        store.close()
        raise
    return cache
