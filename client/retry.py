"""When a failed cache call is tried again: the client's retry policy (redis-py's `Retry`, for gRPC).

A cache is an accelerator: a worker that waits for it loses the time the cache was meant to save,
so the policy is small on purpose. The default tries once more, only on UNAVAILABLE (no connection,
a daemon restarting or draining: the next attempt may reach a daemon that serves), only after a short
jittered pause, and only if the call's own deadline (`timeout_s` of CacheClient, or
`transfer_timeout_s` for Put and Fetch) still leaves time for a useful attempt. Retries never extend
that deadline: every attempt gets only what is left of it.

No other status is retried, whatever the policy says: the daemon would answer INVALID_ARGUMENT,
NOT_FOUND, RESOURCE_EXHAUSTED (too large), FAILED_PRECONDITION, DATA_LOSS, PERMISSION_DENIED,
UNAUTHENTICATED, OUT_OF_RANGE or UNIMPLEMENTED the same way again; DEADLINE_EXCEEDED means the call's
time is spent; CANCELLED was somebody's decision; INTERNAL and UNKNOWN are a daemon bug, which a
retry repeats at the worker's expense.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

import grpc


@dataclass(frozen=True)
class Retry:
    """How many times a call is attempted and how long to pause in between.

    `attempts`: tries in all, the first included (1: never retry). The pause before retry n (1 is the
    first) is min(backoff_cap_s, backoff_base_s * 2 ** (n - 1)), of which a random fraction of up to
    `jitter` is taken off, so that workers that failed together do not retry together. A retry is made
    only for a status in `codes` (a subset of RETRYABLE) and only if, after the pause, at least
    `min_attempt_s` of the call's deadline remains.
    """

    attempts: int = 2
    backoff_base_s: float = 0.025
    backoff_cap_s: float = 0.25
    jitter: float = 0.5
    codes: frozenset[grpc.StatusCode] = field(default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE}))
    min_attempt_s: float = 0.05

    RETRYABLE: ClassVar[frozenset[grpc.StatusCode]] = frozenset({grpc.StatusCode.UNAVAILABLE})
    """The only statuses a retry can change (see the module docstring for the others)."""

    def __post_init__(self) -> None:
        codes = frozenset(self.codes)
        object.__setattr__(self, "codes", codes)  # a set or list given: stored frozen, so the policy is hashable
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts must be an integer of at least 1, got {self.attempts!r}")
        if not 0 <= self.backoff_base_s <= self.backoff_cap_s:
            raise ValueError(f"need 0 <= backoff_base_s <= backoff_cap_s, got {self.backoff_base_s}, "
                             f"{self.backoff_cap_s}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")
        if not self.min_attempt_s >= 0:
            raise ValueError(f"min_attempt_s must be at least 0, got {self.min_attempt_s}")
        if not all(isinstance(code, grpc.StatusCode) for code in codes):
            raise TypeError(f"codes must be grpc.StatusCode values, got {sorted(map(str, codes))}")
        if not codes <= self.RETRYABLE:
            never = ", ".join(sorted(code.name for code in codes - self.RETRYABLE))
            raise ValueError(f"{never} cannot be retried: the daemon would answer the same (retryable: "
                             f"{', '.join(code.name for code in self.RETRYABLE)})")

    @classmethod
    def none(cls) -> Retry:
        """One attempt: every failure is a miss at once."""
        return cls(attempts=1)

    def backoff_s(self, retry: int) -> float:
        """The pause before retry number `retry` (1 is the first), jittered."""
        delay = min(self.backoff_cap_s, self.backoff_base_s * 2.0 ** (retry - 1))
        return delay * (1.0 - self.jitter * random.random())

    def pause_before_retry(self, code: grpc.StatusCode, attempts_made: int, remaining_s: float) -> float | None:
        """Seconds to pause before the next attempt of a call that just failed with `code` after
        `attempts_made` attempts and has `remaining_s` of its deadline left; None: give up now."""
        if code not in self.codes or attempts_made >= self.attempts:
            return None
        pause = self.backoff_s(attempts_made)
        return pause if remaining_s - pause >= self.min_attempt_s else None
