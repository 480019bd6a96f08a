"""FlexCache client: look up, fetch and store latents from inside a diffusion worker.

`CacheClient` reaches a daemon over gRPC; `LocalCache` runs a daemon's cache core in this process
(it needs the `daemon` extra, imported only when LocalCache is first used). Both are `CacheBase`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .answers import Candidate, Fetched, LookupResult
from .base import CacheBase, Hit, Namespace, Rebuild
from .client import CacheClient
from .retry import Retry
from .tables import QualitySample, StepTables

if TYPE_CHECKING:
    from .local import LocalCache

__all__ = ["CacheBase", "CacheClient", "Candidate", "Fetched", "Hit", "LocalCache", "LookupResult", "Namespace",
           "QualitySample", "Rebuild", "Retry", "StepTables"]


def __getattr__(name: str) -> Any:
    if name == "LocalCache":  # lazily: its module is light, the daemon it opens is not
        from .local import LocalCache

        return LocalCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
