"""Reading a call's request bytes as messages: what every gRPC method of the daemon does first (the
server module's docstring says why requests arrive as raw bytes)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from google.protobuf.message import Message

from .errors import InvalidRequest
from .guard import Watch

M = TypeVar("M", bound=Message)


class Undecodable(InvalidRequest):
    """The request's bytes are not a message of the method's request type."""


def decode(kind: type[M], raw: bytes) -> M:
    """`raw` parsed as a `kind`; Undecodable if it is not one."""
    try:
        return kind.FromString(raw)
    except Exception as exc:  # DecodeError, or anything else the parser raises on hostile bytes
        raise Undecodable(f"the request is not a valid {kind.DESCRIPTOR.full_name} ({type(exc).__name__})") from None


def one_request(watch: Watch, requests: Iterator[bytes], kind: type[M]) -> M:
    """The request of a method that takes one, read under `watch`."""
    raw = watch.receive(requests)
    if raw is None:
        raise InvalidRequest("the call ended without its request message")
    return decode(kind, raw)


def decoded(watch: Watch, requests: Iterator[bytes], kind: type[M]) -> Iterator[M]:
    """A request stream's messages, each waited for under `watch` and decoded."""
    for raw in watch.received(requests):
        yield decode(kind, raw)
