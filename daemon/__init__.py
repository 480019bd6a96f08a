"""The FlexCache daemon.

Request path: server.py (gRPC, status codes, lifecycle) -> cache.py (put/lookup/fetch/evict) ->
store.py (RocksDB, source of truth), index/ (Qdrant vectors), eviction/ (policies). config.py holds
the settings table, metrics.py the Prometheus series, cli.py the `flexcache` command.
The daemon never imports torch: blobs are opaque bytes to it.
"""
