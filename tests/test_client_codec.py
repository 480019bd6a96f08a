"""The client compresses latents before they leave the worker and rebuilds step-K latents on a hit."""

from __future__ import annotations

import logging

import numpy as np
import torch

from flexcache.client import CacheClient, codec
from flexcache.v1 import cache_pb2 as pb
from tests.conftest import NS
from tests.vectors import unit


def smooth_latent(seed: int, shape=(16, 5, 30, 52)) -> np.ndarray:
    """A latent-like field: smooth in space and time, different mean and scale per channel."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((shape[0], shape[1], shape[2] // 6 + 1, shape[3] // 4 + 1))
    field = coarse.repeat(6, axis=2).repeat(4, axis=3)[:, :, : shape[2], : shape[3]]
    field = field + 0.1 * rng.standard_normal(shape)
    return (field * rng.uniform(0.5, 2, (shape[0], 1, 1, 1)) + rng.uniform(-1, 1, (shape[0], 1, 1, 1))).astype(
        np.float32)


def test_put_compresses_within_the_error_budget(daemon) -> None:
    x0 = smooth_latent(0)
    with CacheClient(daemon.target, NS, max_rel_error=0.01, timeout_s=5) as c:
        entry_id = c.put("a corgi on a beach", x0, unit(1), seed=1234)
        fetched = c.fetch(entry_id)
        assert fetched.blob.codec == "fxlc" and fetched.seed == 1234
        assert fetched.blob.size < x0.nbytes / 3  # network and disk carry the compressed bytes
        assert c.stats().bytes < x0.nbytes / 3
        decoded = fetched.latent()
        assert decoded.dtype == np.float32 and decoded.shape == x0.shape
        assert codec.relative_rmse(x0, decoded) <= 0.01


def test_bf16_tensor_through_the_codec(daemon) -> None:
    x0 = torch.from_numpy(smooth_latent(1)).to(torch.bfloat16)
    with CacheClient(daemon.target, NS, max_rel_error=0.01, timeout_s=5) as c:
        c.put("p", x0, unit(2), seed=1)
        latent = c.get(unit(2), as_torch=True).latent
    assert latent.dtype == torch.bfloat16
    err = (latent.float() - x0.float()).norm() / x0.float().norm()
    assert err <= 0.011


def test_get_rebuilds_the_latent_at_the_granted_step(daemon) -> None:
    calls = []

    def rebuild(x0, seed: int, k: int, total_steps: int):
        calls.append((seed, k, total_steps))
        eps = np.random.default_rng(seed).standard_normal(x0.shape).astype(np.float32)
        sigma = 1 - k / total_steps
        return (1 - sigma) * x0 + sigma * eps

    x0 = smooth_latent(2)
    with CacheClient(daemon.target, NS, max_rel_error=0.0, timeout_s=5) as c:
        c.put("with seed", x0, unit(3), seed=99)
        hit = c.get(unit(3), rebuild=rebuild)
        latent = hit.latent
        assert calls == [(99, 25, 50)] and hit.steps == 25 and hit.kind == "full"
        np.testing.assert_allclose(latent, rebuild(x0, 99, 25, 50), rtol=1e-6)
        c.put("a NIRVANA row at step 20", x0, unit(4), step=20)
        row = c.get(unit(4), rebuild=rebuild)  # stored at its step: returned as is
        assert row.steps == 20 and len(calls) == 2  # one by get(), one by the check above
        np.testing.assert_array_equal(row.latent, x0)
        c.get(unit(3), rebuild=rebuild, noise_seed=7)  # the request's noise instead of the entry's
        assert calls[-1] == (7, 25, 50)
        c.put("no seed stored", x0, unit(8))
        assert c.get(unit(8), rebuild=rebuild, noise_seed=5).steps == 25 and calls[-1] == (5, 25, 50)


def test_undecodable_entries_are_a_miss_with_a_warning(daemon, caplog) -> None:
    with CacheClient(daemon.target, NS, timeout_s=5, warn_every_s=0) as c, \
            caplog.at_level(logging.WARNING, "flexcache.client"):
        c.put("no seed", smooth_latent(3), unit(5))
        assert c.get(unit(5), rebuild=lambda x0, seed, k, n: x0) is None
        garbage = pb.BlobInfo(codec="fxlc", dtype="float32", shape=[4, 4])
        c.put_blob("foreign blob", b"not a latent at all", garbage, unit(6))
        assert c.get(unit(6)) is None
        truncated = codec.encode(smooth_latent(4), max_rel_error=0.01)[:-10]
        c.put_blob("truncated blob", truncated, pb.BlobInfo(codec="fxlc", dtype="float32", shape=[16, 5, 30, 52]),
                   unit(7))
        assert c.get(unit(7)) is None
        c.put_blob("unknown codec", b"x" * 64, pb.BlobInfo(codec="lz4", dtype="float32", shape=[16]), unit(8))
        assert c.get(unit(8)) is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "has no seed" in messages and "bad magic" in messages and "unknown codec 'lz4'" in messages


def test_non_float_and_bad_latents(daemon) -> None:
    with CacheClient(daemon.target, NS, timeout_s=5, warn_every_s=0) as c:
        ints = np.arange(64, dtype=np.int32).reshape(8, 8)
        entry = c.put("integer latent", ints, unit(9))
        assert c.fetch(entry).blob.codec == "raw"
        np.testing.assert_array_equal(c.get(unit(9)).latent, ints)
        nan = smooth_latent(5)
        nan[0, 0, 0, 0] = np.nan
        assert c.put("nan latent", nan, unit(10)) is None  # never raises into the worker
        assert isinstance(c.last_error, codec.CodecError)
