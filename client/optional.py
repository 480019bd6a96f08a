"""Optional dependencies: import them with a sentence that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"daemon": "the daemon (RocksDB and Qdrant)", "model": "torch and the offline text encoder"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import `module`, or raise MissingExtra: '<needed_for> needs <module>: pip install "flexcache[<extra>]"'."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise MissingExtra(f"{needed_for} needs {module}, which is not installed; it comes with the "
                           f"'{extra}' extra ({EXTRAS[extra]}): pip install 'flexcache[{extra}]'") from exc
