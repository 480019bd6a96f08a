"""Per-tenant limits: request rates and Verify bytes (token buckets), namespaces per tenant, byte quotas.

The tenant of a request is its `namespace.tenant`. With auth on, the server has checked that it is the
caller's credential's tenant before the cache sees the request; without auth it is whatever the client
wrote, so these limits then bound what one well-behaved tenant can take, not what an attacker who makes
up tenant names can (docs/security.md, "Per-tenant limits").

What lives here, all of it without a lock of the cache's:

- `RateLimiter`: one token bucket per tenant, thread-safe (its own lock), on the monotonic clock, with
  bounded memory. A bucket that has refilled to its capacity carries no state (a fresh bucket is full),
  so buckets are kept in least-recently-used order and the refilled ones at the old end are dropped as
  new ones come: a tenant idle for `capacity / rate` seconds costs nothing. At most `max_buckets` are
  kept; while that many tenants are all active at once, any further tenant draws from one shared
  overflow bucket, so a flood of made-up tenant names can neither grow memory nor multiply the rate.
- `TenantLimits`: what the cache façade calls: `request` (every Put, Lookup, Fetch/FetchDirect, Delete
  and Verify: one token), `verify_bytes` (a Verify's re-read bytes), `new_namespace` (a Put creating a
  namespace, against tenant_max_namespaces) and `entry_fits` (an entry larger than a tenant's quota can
  allow). Refusals are RESOURCE_EXHAUSTED: `guard.Refused` for the rates (refused before any work; the
  server counts them in flexcache_calls_refused_total by reason), `errors.TooLarge` for the sizes.
- `fair_share`: the max-min fair share of a byte target among tenants, which global eviction uses when
  tenant quotas are set (Cache._evict_if_needed).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .entries import NamespaceKey
from .errors import TooLarge
from .guard import Refused
from .limits import Limits

MAX_BUCKETS = 10_000  # tenants with a bucket of their own per limiter (the default max_namespaces: one each)
REASON_REQUESTS = "tenant_requests"  # flexcache_calls_refused_total reasons
REASON_VERIFY = "verify_bytes"


@dataclass
class _Bucket:
    tokens: float
    at: float  # monotonic time `tokens` was measured at


class RateLimiter:
    """Token buckets by key: `rate` tokens a second up to `capacity`, each key's bucket full at first.

    `take(key, cost)` admits a request when the key's bucket holds `min(cost, capacity)` tokens, and
    then takes `cost` (a bucket may go into debt, so that a cost above the capacity, a Verify of an
    entry larger than a second's bytes, is admitted once the bucket is full and paid back over the
    following seconds); otherwise it takes nothing and returns the seconds until it would be admitted.
    Thread-safe; memory bounded by `max_buckets` (module docstring)."""

    def __init__(self, rate: float, capacity: float, max_buckets: int = MAX_BUCKETS,
                 clock: Callable[[], float] = time.monotonic):
        if not rate > 0 or not capacity > 0:
            raise ValueError(f"a rate limiter needs a positive rate and capacity, not {rate} and {capacity}")
        self.rate = rate
        self.capacity = capacity
        self.max_buckets = max(1, max_buckets)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently used first
        self._overflow: _Bucket | None = None  # shared by keys past max_buckets

    def take(self, key: str, cost: float = 1.0) -> float:
        """0.0 if admitted (the cost taken), else the seconds to wait before this cost would be."""
        with self._lock:
            now = self._clock()
            bucket = self._bucket(key, now)
            tokens = min(self.capacity, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.tokens, bucket.at = tokens, now
            need = min(cost, self.capacity)
            if tokens >= need:
                bucket.tokens = tokens - cost
                return 0.0
            return (need - tokens) / self.rate

    def __len__(self) -> int:
        """Buckets held (the overflow bucket not counted)."""
        return len(self._buckets)

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket
        self._drop_refilled(now)
        if len(self._buckets) >= self.max_buckets:
            if self._overflow is None:
                self._overflow = _Bucket(self.capacity, now)
            return self._overflow
        bucket = self._buckets[key] = _Bucket(self.capacity, now)
        return bucket

    def _drop_refilled(self, now: float) -> None:
        """Forget the least recently used buckets that are full again (no state lost: a new one is full).
        Stops at the first that is not: amortized O(1) a call."""
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if bucket.tokens + (now - bucket.at) * self.rate < self.capacity:
                break
            del self._buckets[key]
        overflow = self._overflow
        if overflow is not None and overflow.tokens + (now - overflow.at) * self.rate >= self.capacity:
            self._overflow = None


class TenantLimits:
    """The per-tenant limits of `limits` (all off at their defaults), as the cache façade applies them.

    - `request(tenant)`: one token of the tenant's request bucket (tenant_requests_per_second, bursts of
      tenant_request_burst); Refused(tenant_requests) past it.
    - `verify_bytes(tenant, size)`: `size` bytes of the tenant's Verify budget (verify_bytes_per_second,
      bursts of one second's bytes); Refused(verify_bytes) past it.
    - `new_namespace(ns, tenant, held)`: TooLarge when the tenant holds tenant_max_namespaces already.
    - `entry_fits(size, tenant)`: TooLarge when an entry of `size` budget bytes could never fit the
      tenant's quota (more than low_watermark x tenant_max_bytes, the level its eviction goes down to).
    """

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic,
                 max_buckets: int = MAX_BUCKETS):
        self.limits = limits
        self._requests = (RateLimiter(limits.tenant_requests_per_second, limits.tenant_request_burst, max_buckets,
                                      clock) if limits.tenant_requests_per_second > 0 else None)
        self._verify = (RateLimiter(limits.verify_bytes_per_second, limits.verify_bytes_per_second, max_buckets,
                                    clock) if limits.verify_bytes_per_second > 0 else None)

    def request(self, tenant: str) -> None:
        if self._requests is None:
            return
        wait = self._requests.take(tenant)
        if wait:
            raise Refused(REASON_REQUESTS,
                          f"tenant {tenant!r} is over its request rate (tenant_requests_per_second = "
                          f"{self.limits.tenant_requests_per_second:g}, bursts of {self.limits.tenant_request_burst}); "
                          f"try again in {wait:.2f} s")

    def verify_bytes(self, tenant: str, size: int) -> None:
        if self._verify is None:
            return
        wait = self._verify.take(tenant, float(size))
        if wait:
            raise Refused(REASON_VERIFY,
                          f"tenant {tenant!r} has used its Verify budget (verify_bytes_per_second = "
                          f"{self.limits.verify_bytes_per_second} bytes re-read a second); this entry's {size} "
                          f"bytes can be verified in {wait:.2f} s")

    def new_namespace(self, ns: NamespaceKey, tenant: str, held: int) -> None:
        limit = self.limits.tenant_max_namespaces
        if limit and held >= limit:
            raise TooLarge(f"namespace {ns.name} is new and tenant {tenant!r} already holds {held} namespaces "
                           f"(tenant_max_namespaces = {limit}); put into one of its namespaces, or raise "
                           f"tenant_max_namespaces")

    def entry_fits(self, size: int, tenant: str) -> None:
        quota = self.limits.tenant_max_bytes
        if quota and size > quota * self.limits.low_watermark:
            raise TooLarge(f"entry of {size} bytes cannot fit tenant {tenant!r}'s quota (tenant_max_bytes = {quota}, "
                           f"evicted down to low_watermark = {self.limits.low_watermark:g} of it)")

    def over_quota(self, held: int) -> bool:
        """Whether a tenant holding `held` bytes must evict (above high_watermark x tenant_max_bytes)."""
        quota = self.limits.tenant_max_bytes
        return bool(quota) and held > quota * self.limits.high_watermark

    def quota_target(self) -> float:
        """What a tenant over its quota is evicted down to: low_watermark x tenant_max_bytes."""
        return self.limits.tenant_max_bytes * self.limits.low_watermark


def fair_share(held: Mapping[str, int], target: float) -> float:
    """The max-min fair share of `target` bytes among tenants holding `held` bytes: the level L with
    sum(min(held[t], L)) == target, so a tenant holding less than L leaves the rest of its share to the
    others. Infinite when everything held fits the target (nobody is over its share)."""
    if sum(held.values()) <= target:
        return float("inf")
    remaining, sizes = target, sorted(held.values())
    for i, size in enumerate(sizes):
        level = remaining / (len(sizes) - i)
        if size > level:
            return level
        remaining -= size
    return float("inf")  # not reached: the sum is above the target
