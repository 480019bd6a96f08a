"""The in-process backend of the cache surface (base.CacheBase): a daemon's cache core, no daemon.

`LocalCache` answers as a `CacheClient` talking to a daemon with the same settings would
(tests/test_client_congruence.py holds the two to it): the same entry ids, candidates, granted steps
and bytes, and the same failures. A domain error of the core (daemon/errors.py) becomes the status
code the daemon's gRPC front end would send (daemon/server.py), and takes the same path from there
(`CacheBase._call`): a refused put is None in both, with the same code in `last_error`. For
benchmarks and tests that want no process or network; it needs the `daemon` extra (RocksDB, Qdrant),
imported when a LocalCache is made, not when flexcache.client is.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from os import PathLike
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import wire

from . import codec
from .answers import ChecksumMismatch, Fetched, Malformed, check_header, receive_blob
from .base import CacheBase, Namespace
from .optional import require
from .retry import Retry

if TYPE_CHECKING:
    from flexcache.daemon.cache import Cache
    from flexcache.daemon.config import Config

log = logging.getLogger("flexcache.client")

T = TypeVar("T")


class StatusError(grpc.RpcError):
    """A domain error of the in-process core, as the status the daemon would have answered with: what
    `last_error` holds, with `code()` and `details()` as a grpc.RpcError from a daemon has them."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _daemon_module(name: str) -> ModuleType:
    """flexcache.daemon.<name>, or MissingExtra naming the 'daemon' extra if its dependencies are absent."""
    try:
        return importlib.import_module(f"flexcache.daemon.{name}")
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "flexcache":
            raise
        require(exc.name, "daemon", "LocalCache")  # raises MissingExtra, in the sentence of every extra
        raise


class LocalCache(CacheBase):
    """The cache over a daemon's core in this process, its store and index under `data_dir`.

    `settings`: daemon settings by name, as `flexcache serve` takes them (max_bytes, eviction_policy,
    skip_thresholds, composed_max_fraction...; see the README's settings table); listen addresses are
    ignored, nothing listens. `namespace`, `max_rel_error`, `warn_every_s`, `retry`, `put_sha256`: as
    for CacheClient. `timeout_s` bounds a call's retries only (an in-process call is not interrupted).
    The folder is opened at construction (an error there raises: it is this process's own storage)
    and held until `close()`; RocksDB allows one holder of a folder at a time.
    """

    def __init__(self, data_dir: str | PathLike[str], namespace: Namespace, *,
                 settings: Mapping[str, Any] | None = None,
                 max_rel_error: float | None = codec.DEFAULT_MAX_REL_ERROR, timeout_s: float = 1.0,
                 warn_every_s: float = 10.0, retry: Retry | None = None, put_sha256: bool = False):
        config_module, build, errors = (_daemon_module(n) for n in ("config", "build", "errors"))
        known = {option.name for option in config_module.OPTIONS}
        unknown = sorted(set(settings or {}) - known)
        if unknown:
            raise config_module.ConfigError(f"LocalCache: unknown setting {unknown[0]!r}")
        self.config: Config = config_module.resolve(env={}, flags={**(settings or {}), "data_dir": str(data_dir)})
        super().__init__(namespace, target=f"local:{Path(data_dir)}", max_rel_error=max_rel_error,
                         timeout_s=timeout_s, warn_every_s=warn_every_s, retry=Retry() if retry is None else retry,
                         put_sha256=put_sha256)
        self._domain_error: type[Exception] = errors.CacheError
        self._core: Cache | None = build.open_cache(self.config)

    def close(self) -> None:
        core, self._core = self._core, None
        if core is not None:
            core.close()

    @contextmanager
    def _as_status(self) -> Iterator[Cache]:
        """The core, with its errors turned into what the daemon's front end would answer: a domain
        error's status, INTERNAL for anything else (logged, as the daemon logs it). The client's own
        verdicts on the answer (Malformed, ChecksumMismatch) pass through."""
        core = self._core
        if core is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "this LocalCache is closed")
        try:
            yield core
        except (Malformed, ChecksumMismatch):
            raise
        except self._domain_error as exc:
            raise StatusError(grpc.StatusCode[exc.code], str(exc)) from exc  # as the daemon answers it
        except Exception as exc:
            log.exception("flexcache local cache core failed")
            raise StatusError(grpc.StatusCode.INTERNAL, f"internal error: {exc}") from exc

    def _core_call(self, method: str, run: Callable[[Cache], T]) -> T | None:
        def invoke(_timeout: float) -> T:
            with self._as_status() as core:
                return run(core)

        return self._call(method, invoke, timeout_s=self.timeout_s)

    # ---- transport primitives ----
    def _put_blob(self, header: pb.PutHeader, data: bytes | bytearray | memoryview) -> pb.PutResponse | None:
        def put(core: Cache) -> pb.PutResponse:  # as the daemon's Put: header, then chunks of at most 1 MiB
            session = core.begin_put(header)
            if session.existing:
                return pb.PutResponse(entry_id=session.entry_id, created=False)
            view = memoryview(data)
            for start in range(0, len(view), wire.CHUNK_BYTES):
                session.add_chunk(bytes(view[start:start + wire.CHUNK_BYTES]))
            return session.finish()

        return self._core_call("put", put)

    def _lookup(self, request: pb.LookupRequest) -> pb.LookupResponse | None:
        return self._core_call("lookup", lambda core: core.lookup(request))

    def _verify(self, request: pb.VerifyRequest) -> pb.VerifyResponse | None:
        return self._core_call("verify", lambda core: core.verify(request))

    def _delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse | None:
        return self._core_call("delete", lambda core: pb.DeleteResponse(deleted=core.delete(request)))

    def _stats(self) -> pb.StatsResponse | None:
        return self._core_call("stats", lambda core: core.stats())

    def _set_step_tables(self, request: pb.SetStepTablesRequest) -> pb.StepTablesResponse | None:
        return self._core_call("set_step_tables", lambda core: core.set_step_tables(request))  # the owner: an admin

    def _get_step_tables(self, request: pb.StepTablesRequest) -> pb.StepTablesResponse | None:
        return self._core_call("step_tables", lambda core: core.step_tables(request))

    def _report_quality(self, request: pb.ReportQualityRequest) -> pb.ReportQualityResponse | None:
        return self._core_call("report_quality", lambda core: core.report_quality(request))

    def _fetch_blob(self, request: pb.FetchRequest, expect: pb.BlobInfo | None) -> Fetched | None:
        def fetch(core: Cache) -> Fetched:
            header, chunks = core.fetch(request)
            with closing(chunks):  # unpins the entry, read or not
                check_header(header, request, self.namespace.total_steps, expect)
                data = receive_blob(header, chunks)
            return Fetched(header.entry_id, header.prompt, header.blob, data)

        return self._core_call("fetch", fetch)
