"""Tests for flexcache.client.codec: round trips, error budget, bf16 helpers, corrupt input."""

from __future__ import annotations

import importlib.util
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from flexcache.client import codec
from flexcache.client.codec import CodecError, decode, encode, inspect

CODEC_PATH = Path(codec.__file__)


def smooth_latent(shape: tuple[int, ...], seed: int = 0, texture: float = 0.3) -> np.ndarray:
    """Small smooth-plus-texture latent with per-channel mean/scale (fp32)."""
    rng = np.random.default_rng(seed)
    c = shape[0]
    rest = shape[1:]
    base = rng.standard_normal((c, *rest)).astype(np.float32)
    for ax in range(1, len(shape)):  # cheap smoothing: running mean along each axis
        k = min(5, shape[ax])
        acc = np.zeros_like(base)
        for i in range(k):
            acc += np.roll(base, i, axis=ax)
        base = acc / k
    base /= base.std(axis=tuple(range(1, len(shape))), keepdims=True) + 1e-12
    tex = rng.standard_normal(shape).astype(np.float32)
    v = math.sqrt(1 - texture) * base + math.sqrt(texture) * tex
    mean = rng.uniform(-1.0, 1.5, (c,) + (1,) * (len(shape) - 1)).astype(np.float32)
    std = rng.uniform(1.1, 3.3, (c,) + (1,) * (len(shape) - 1)).astype(np.float32)
    return (mean + std * v).astype(np.float32)


X32 = smooth_latent((4, 5, 12, 16))
X16 = X32.astype(np.float16)
XBF = codec.fp32_to_bf16(X32)
INPUTS = [(X32, None), (X16, None), (XBF, "bfloat16")]
INPUT_IDS = ["fp32", "fp16", "bf16"]


def true_error(x: np.ndarray, y: np.ndarray, dtype: str | None) -> float:
    return codec.relative_rmse(x, y, dtype=dtype)


def refresh_crc(blob: bytes | bytearray) -> bytes:
    """Recompute the checksum so a test can forge a header that passes it."""
    b = bytearray(blob)
    crc = zlib.crc32(bytes(b[52:]), zlib.crc32(bytes(b[:48])))
    b[48:52] = struct.pack("<I", crc)
    return bytes(b)


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("x", "tag"), INPUTS, ids=INPUT_IDS)
@pytest.mark.parametrize("chain", codec.CHAINS)
def test_round_trip_every_chain(x: np.ndarray, tag: str | None, chain: str) -> None:
    blob = encode(x, chain=chain, dtype=tag)
    y = decode(blob)
    assert y.dtype == x.dtype and y.shape == x.shape
    info = inspect(blob)
    assert info.dtype == {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[
        {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", np.dtype(np.uint16): "bf16"}[x.dtype]
    ]
    assert info.shape == x.shape and info.total_bytes == len(blob)
    assert info.max_rel_error is None
    err = true_error(x, y, tag)
    assert info.achieved_rel_error == pytest.approx(err, rel=1e-4, abs=1e-7)
    # storage at least as wide as the input is lossless
    width = {"fp32": 32, "fp16": 16, "bf16": 16, "int16": 16, "int8": 8, "int4": 4}
    stored = chain.split("+")[0]
    if chain == "raw" or stored == {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[info.dtype] or (
        stored == "fp32"
    ):
        assert np.array_equal(y, x)
        assert err == 0.0
    elif stored.startswith("int"):
        assert err < {4: 0.3, 8: 0.02, 16: 1e-3}[width[stored]]
    else:
        assert err < 5e-3


@pytest.mark.parametrize(("x", "tag"), INPUTS, ids=INPUT_IDS)
def test_round_trip_default_and_lossless(x: np.ndarray, tag: str | None) -> None:
    y = decode(encode(x, dtype=tag))
    assert true_error(x, y, tag) <= codec.DEFAULT_MAX_REL_ERROR
    blob = encode(x, dtype=tag, max_rel_error=0)
    assert np.array_equal(decode(blob), x)
    assert inspect(blob).achieved_rel_error == 0.0


def test_shapes_and_special_values() -> None:
    for shape in [(7,), (1, 1), (3, 1, 1, 1), (2, 3, 5), (5, 2, 3, 4, 1)]:
        x = smooth_latent(shape, seed=len(shape)) if len(shape) > 1 else np.linspace(-3, 4, 7, dtype=np.float32)
        for kw in ({}, {"chain": "int4+zstd"}, {"max_rel_error": 0}):
            blob = encode(x, **kw)
            y = decode(blob)
            assert y.shape == x.shape
            assert inspect(blob).achieved_rel_error == pytest.approx(true_error(x, y, None), rel=1e-4, abs=1e-7)
    zeros = np.zeros((2, 3, 4), np.float32)
    assert np.array_equal(decode(encode(zeros)), zeros)
    assert inspect(encode(zeros)).achieved_rel_error == 0.0
    const = np.full((2, 3, 4), 2.5, np.float32)
    assert np.array_equal(decode(encode(const, chain="int8+zstd")), const)


def test_zero_is_exact_and_symmetric_vs_affine() -> None:
    rng = np.random.default_rng(1)
    centred = rng.standard_normal((1, 4000)).astype(np.float32)
    offset = (5.0 + rng.standard_normal((1, 4000))).astype(np.float32)
    x = np.concatenate([centred, offset])
    x[0, :10] = 0.0
    blob = encode(x, chain="int8+zstd")
    info = inspect(blob)
    assert info.channel_modes == ("symmetric", "affine")
    assert info.quantizer == "range"
    y = decode(blob)
    assert np.all(y[0, :10] == 0.0)
    assert np.allclose(y[0, 10:20], -decode(encode(-x, chain="int8+zstd"))[0, 10:20])  # sign-symmetric grid


def test_parallel_path_matches_serial() -> None:
    x = smooth_latent((16, 8, 32, 64), seed=3)  # 1 MiB of fp32: uses the thread pool
    for kw in ({}, {"chain": "fp16+shuffle+zstd"}, {"max_rel_error": 1e-3}):
        a = encode(x, threads=1, **kw)
        b = encode(x, **kw)
        assert a == b
        assert np.array_equal(decode(a, threads=1), decode(b))


# --------------------------------------------------------------------------------------------- error budget

BUDGETS = [0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 1e-3, 3e-4, 1e-4, 1e-5, 0.0]


@pytest.mark.parametrize(("x", "tag"), INPUTS, ids=INPUT_IDS)
def test_error_budget_respected_true_and_monotone(x: np.ndarray, tag: str | None) -> None:
    sizes = []
    for e in BUDGETS:
        blob = encode(x, max_rel_error=e, dtype=tag)
        info = inspect(blob)
        err = true_error(x, decode(blob), tag)
        assert err <= e, (e, info.chain)
        assert info.achieved_rel_error == pytest.approx(err, rel=1e-4, abs=1e-7)
        assert info.max_rel_error == e
        sizes.append(len(blob))
    assert sizes == sorted(sizes), list(zip(BUDGETS, sizes, strict=True))


def test_budget_uses_the_room_it_is_given() -> None:
    x = smooth_latent((4, 8, 24, 32), seed=5)
    for e in (0.05, 0.01, 0.002):
        info = inspect(encode(x, max_rel_error=e))
        assert info.quantizer == "step"
        assert 0.5 * e < info.achieved_rel_error <= e
    assert inspect(encode(x, max_rel_error=0.01)).stored == "int8"


def test_forced_chain_over_budget_raises() -> None:
    with pytest.raises(CodecError, match=r"above|>"):
        encode(X32, chain="int4+zstd", max_rel_error=0.01)


# --------------------------------------------------------------------------------------------- bf16


def test_bf16_round_to_nearest_even() -> None:
    one = 1.0
    vals = np.array([one, one + 2**-8, one + 3 * 2**-8, one + 2**-8 + 2**-20, -2.5, 0.0, -0.0,
                     np.inf, -np.inf, 3.4e38, 1e-40], np.float32)
    got = codec.fp32_to_bf16(vals)
    back = codec.bf16_to_fp32(got)
    assert back[0] == 1.0
    assert back[1] == 1.0  # tie -> even (mantissa 0)
    assert back[2] == one + 2**-6  # tie -> even (up)
    assert back[3] == one + 2**-7  # above the tie -> up
    assert back[4] == -2.5 and back[5] == 0.0 and np.signbit(back[6])
    assert np.isposinf(back[7]) and np.isneginf(back[8]) and np.isposinf(back[9])  # overflow rounds to inf
    assert back[10] == pytest.approx(1e-40, rel=1e-2)
    nan = codec.fp32_to_bf16(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(codec.bf16_to_fp32(nan)).all()
    with pytest.raises(CodecError):
        codec.bf16_to_fp32(np.zeros(3, np.int16))


def test_bf16_matches_torch_if_available() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal(10000).astype(np.float32) * 100
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(codec.fp32_to_bf16(x), ref)


def test_codec_does_not_import_torch() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(CODEC_PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['c'] = m; spec.loader.exec_module(m)\n"
        "import numpy as np; m.decode(m.encode(np.ones((2, 3), np.float32)))\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert importlib.util.find_spec("zstandard") is not None


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("chain", [None, "raw", "fp16+shuffle+zstd", "int8+zstd"])
def test_nan_inf_rejected(bad: float, chain: str | None) -> None:
    x = X32.copy()
    x[2, 1, 3, 4] = bad
    with pytest.raises(CodecError, match=r"NaN or Inf .*channel 2"):
        encode(x, chain=chain)
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode(codec.fp32_to_bf16(x), dtype="bfloat16")


def test_bad_arguments() -> None:
    with pytest.raises(CodecError, match="bfloat16"):
        encode(np.zeros((2, 2), np.uint16))
    with pytest.raises(CodecError, match="unsupported dtype"):
        encode(np.zeros((2, 2), np.float64))
    with pytest.raises(CodecError, match="unsupported dtype"):
        encode(np.zeros((2, 2), np.int8))
    with pytest.raises(CodecError, match="does not match"):
        encode(X32, dtype="float16")
    with pytest.raises(CodecError, match="uint16"):
        encode(X32, dtype="bfloat16")
    with pytest.raises(CodecError, match="unknown chain"):
        encode(X32, chain="int8+zstd+shuffle")
    with pytest.raises(CodecError, match="unknown chain"):
        encode(X32, chain="lz4")
    with pytest.raises(CodecError, match="at least one value"):
        encode(np.zeros((0, 3), np.float32))
    with pytest.raises(CodecError, match="max_rel_error"):
        encode(X32, max_rel_error=-1)
    with pytest.raises(CodecError, match="numpy array"):
        encode([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="fp16 range"):
        encode(np.array([[1e6, 1.0]], np.float32), chain="fp16+zstd")


@pytest.fixture(scope="module")
def blob() -> bytes:
    return encode(X32)


def test_bad_magic(blob: bytes) -> None:
    with pytest.raises(CodecError, match="bad magic"):
        decode(b"PK\x03\x04" + blob[4:])
    with pytest.raises(CodecError, match="bad magic"):
        decode(b"")
    with pytest.raises(CodecError, match="bad magic"):
        decode(np.arange(10, dtype=np.float32).tobytes())


def test_unsupported_version(blob: bytes) -> None:
    b = bytearray(blob)
    b[4] = 2
    with pytest.raises(CodecError, match="unsupported format version 2"):
        decode(bytes(b))
    with pytest.raises(CodecError, match="unsupported format version"):
        inspect(bytes(b))


def test_checksum_mismatch(blob: bytes) -> None:
    for pos in (len(blob) - 1, len(blob) // 2, 60, 33):  # payload, header fields, achieved error
        b = bytearray(blob)
        b[pos] ^= 0x10
        with pytest.raises(CodecError, match="checksum mismatch"):
            decode(bytes(b))


def test_truncated(blob: bytes) -> None:
    h = inspect(blob)
    cut = blob[: h.header_bytes + 100]
    with pytest.raises(CodecError, match=f"truncated payload: 100 of {h.payload_bytes} bytes"):
        decode(cut)
    with pytest.raises(CodecError, match="truncated header"):
        decode(blob[:30])
    with pytest.raises(CodecError, match="truncated header"):
        decode(blob[: h.header_bytes - 1])
    with pytest.raises(CodecError, match="trailing bytes"):
        decode(blob + b"\0")


def test_random_corruption_never_returns_a_latent(blob: bytes) -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        b = bytearray(blob)
        pos = int(rng.integers(0, len(b)))
        b[pos] ^= int(rng.integers(1, 256))
        with pytest.raises(CodecError):
            decode(bytes(b))


def test_forged_headers_with_valid_crc(blob: bytes) -> None:
    """A header that passes the checksum but lies about sizes or kinds is still refused."""
    h = inspect(blob)
    for off, val in [(6, 9), (5, 7), (8, 0), (9, 0), (7, 0x80), (16, h.header_bytes + 1)]:
        b = bytearray(blob)
        if off == 16:
            b[16:20] = struct.pack("<I", val)
        else:
            b[off] = val
        with pytest.raises(CodecError):
            decode(refresh_crc(b))
    b = bytearray(blob)  # shape product changed: frame lengths no longer match
    b[52:60] = struct.pack("<Q", X32.shape[0] + 1)
    with pytest.raises(CodecError, match="invalid header"):
        decode(refresh_crc(b))
    b = bytearray(blob)  # zstd payload garbage behind a valid crc
    b[-8:] = b"\xff" * 8
    with pytest.raises(CodecError, match=r"zstd error|decompressed"):
        decode(refresh_crc(b))


def test_not_bytes() -> None:
    with pytest.raises(CodecError, match="bytes-like"):
        decode("FXLC")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- dictionaries


def test_dictionary_round_trip_and_mismatch() -> None:
    samples = [smooth_latent((4, 4, 16, 16), seed=s) for s in range(12)]
    d1 = codec.train_dictionary(samples, dict_size=4096, dict_id=1234)
    d2 = codec.train_dictionary(samples[:6], dict_size=4096, dict_id=5678)
    assert d1.dict_id == 1234 and d2.dict_id == 5678
    x = smooth_latent((4, 4, 16, 16), seed=99)
    blob = encode(x, dictionary=d1)
    assert inspect(blob).dictionary_id == 1234
    assert np.array_equal(decode(blob, dictionary=d1), decode(encode(x)))
    assert np.array_equal(decode(blob, dictionary=codec.CodecDictionary(d1.data)), decode(blob, dictionary=d1))
    with pytest.raises(CodecError, match="dictionary mismatch: blob needs id 1234, given id 5678"):
        decode(blob, dictionary=d2)
    with pytest.raises(CodecError, match="dictionary id 1234; none given"):
        decode(blob)
    assert np.array_equal(decode(encode(x), dictionary=d2), decode(encode(x)))  # no dict needed: ignored
    with pytest.raises(CodecError, match="not a zstd dictionary"):
        codec.CodecDictionary(b"nonsense")


# --------------------------------------------------------------------------------------------- property test

try:  # hypothesis is optional (dev extra); the rest of this file must run without it
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = settings = st = None


def _property_round_trip(shape: tuple[int, ...], seed: int, scale: float, dt: str, how: object) -> None:
    rng = np.random.default_rng(seed)
    x32 = (rng.standard_normal(shape) * scale + rng.normal() * scale).astype(np.float32)
    x, tag = {"fp32": (x32, None), "fp16": (x32.astype(np.float16), None),
              "bf16": (codec.fp32_to_bf16(x32), "bfloat16")}[dt]
    kw = {"chain": how} if isinstance(how, str) else {"max_rel_error": how}
    blob = encode(x, dtype=tag, **kw)
    y = decode(blob)
    assert y.dtype == x.dtype and y.shape == x.shape
    err = true_error(x, y, tag)
    info = inspect(blob)
    assert info.achieved_rel_error == pytest.approx(err, rel=1e-3, abs=1e-6)
    if "max_rel_error" in kw:
        assert err <= kw["max_rel_error"]


if given is not None:

    @settings(max_examples=60, deadline=None)
    @given(
        shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
        seed=st.integers(0, 2**31 - 1),
        scale=st.floats(1e-3, 1e3),
        dt=st.sampled_from(["fp32", "fp16", "bf16"]),
        how=st.sampled_from([*codec.CHAINS, 0.0, 1e-4, 1e-3, 0.01, 0.05, 0.3]),
    )
    def test_property_round_trip(shape: tuple[int, ...], seed: int, scale: float, dt: str, how: object) -> None:
        _property_round_trip(shape, seed, scale, dt, how)

else:

    @pytest.mark.skip(reason="hypothesis not installed (add it to the dev extra)")
    def test_property_round_trip() -> None:
        pass


def test_property_round_trip_seeded() -> None:
    """The same property over a fixed random sample, so it runs without hypothesis too."""
    rng = np.random.default_rng(11)
    hows: list[object] = [*codec.CHAINS, 0.0, 1e-4, 1e-3, 0.01, 0.05, 0.3]
    for _ in range(80):
        shape = tuple(int(v) for v in rng.integers(1, 7, int(rng.integers(1, 5))))
        _property_round_trip(shape, int(rng.integers(0, 2**31)), float(10 ** rng.uniform(-3, 3)),
                             str(rng.choice(["fp32", "fp16", "bf16"])), hows[int(rng.integers(len(hows)))])
