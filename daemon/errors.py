"""Domain errors of the cache core. The server maps each to one gRPC status, keeping the message."""

from __future__ import annotations


class CacheError(Exception):
    """Base: the request failed, the daemon is fine."""


class InvalidRequest(CacheError):
    """The caller sent something unusable (INVALID_ARGUMENT)."""


class NotFound(CacheError):
    """No such entry in that namespace (NOT_FOUND)."""


class TooLarge(CacheError):
    """Larger than the daemon accepts (RESOURCE_EXHAUSTED)."""


class Corrupt(CacheError):
    """The bytes received do not match their declared checksum (DATA_LOSS)."""


class Unavailable(CacheError):
    """A backing component failed; the call may succeed later (UNAVAILABLE)."""


class WrongPath(CacheError):
    """The call cannot be served this way, another call can (FAILED_PRECONDITION)."""
