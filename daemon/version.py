"""The installed distribution's version: one small module that the CLI (`flexcache --version`) and the
metrics (`flexcache_build_info`) both import, so neither imports the other."""

from __future__ import annotations

import importlib.metadata

DISTRIBUTION = "flexcache"


def version() -> str:
    """The installed distribution's version (its metadata, the one pip and bug reports see), or
    '0+unknown' for code that runs without being installed as a distribution."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
