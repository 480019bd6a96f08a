"""Domain errors of the cache core, each with the one gRPC status it is answered with (`code`, a
grpc.StatusCode name), keeping the message. The daemon's front end and LocalCache both answer a
domain error with its `code`, so the two backends of the client's surface fail alike."""

from __future__ import annotations


class CacheError(Exception):
    """Base: the request failed, the daemon is fine."""

    code = "UNKNOWN"


class InvalidRequest(CacheError):
    """The caller sent something unusable."""

    code = "INVALID_ARGUMENT"


class NotFound(CacheError):
    """No such entry in that namespace."""

    code = "NOT_FOUND"


class TooLarge(CacheError):
    """Larger than the daemon accepts, or past a limit (a share, the disk)."""

    code = "RESOURCE_EXHAUSTED"


class Corrupt(CacheError):
    """The bytes received do not match their declared checksum."""

    code = "DATA_LOSS"


class Unavailable(CacheError):
    """A backing component failed; the call may succeed later."""

    code = "UNAVAILABLE"


class WrongPath(CacheError):
    """The call cannot be served this way, another call can."""

    code = "FAILED_PRECONDITION"


class Unauthenticated(CacheError):
    """Auth is on and the call brings no credential the daemon knows (none, unknown or revoked)."""

    code = "UNAUTHENTICATED"


class PermissionDenied(CacheError):
    """The caller's credential does not cover what the call names (another tenant's namespace)."""

    code = "PERMISSION_DENIED"
