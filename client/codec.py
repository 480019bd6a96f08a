"""Latent codec: narrow / quantize, byte-shuffle and zstd-compress one cached latent.

FlexCache stores the final clean latent x0 of a generation once (the step-K latent is rebuilt
from x0 and the seed elsewhere).  This module turns such a latent, shape [C, ...] with the
channel axis first, into a self-describing blob and back.  It uses numpy, zstandard, struct and
zlib only: no torch (the client may not have it) and no pickle (a cache blob is untrusted input).

Chain (what happens to the values, in order):
  1. storage:  ``fp32`` / ``fp16`` / ``bf16`` (dtype narrowing, bf16 = uint16 bit patterns) or
     ``int4`` / ``int8`` / ``int16`` codes with a per-channel scale and bias,
     ``x_hat = code * scale[c] + bias[c]`` (float32 arithmetic, then cast to the original dtype).
  2. ``shuffle``: byte shuffle per channel (all first bytes, then all second bytes, ...), which
     gives zstd long runs of similar exponent / high bytes.  A no-op for 1-byte storage.
  3. ``zstd``:  one zstd frame per channel, optionally with a trained dictionary.  Frames are
     independent so encode and decode run channels in parallel threads (zstd and numpy release
     the GIL).
Chains are named ``storage[+shuffle][+zstd]``, e.g. ``"fp16+shuffle+zstd"``, ``"int8+zstd"``,
``"int4+zstd"``; ``"raw"`` stores the original bytes unchanged.

Quantizers (how scale/bias are chosen; the decoder does not care):
  * ``range`` (forced ``int4/int8/int16`` chains): per channel, ``bits`` fixed.  Symmetric
    (``scale = max|x| / (2^(b-1)-1)``, zero point mid-range) unless affine
    (``scale = (max-min) / (2^b-1)``) gives a step more than 10 % finer.  Why: affine never costs
    bytes (a bias is stored per channel either way) and can gain up to 1 bit on off-centre channels
    (VAE latent channels have means of the order of their std); for centred channels the two steps
    are equal and symmetric keeps the grid sign-symmetric, so x and -x reconstruct as exact
    negatives.  Both keep 0.0 exactly representable (integer zero point).
  * ``step`` (error budget, ``encode(x, max_rel_error=e)``): one uniform step for all channels,
    chosen from the budget (``rel_rmse ~ step / sqrt(12) / rms(x)``), per-channel integer offsets,
    codes entropy-coded by zstd.  For an RMSE target a common step is optimal at high rate (equal
    marginal bits per unit of error in every channel) and the step is continuous, so the error lands
    just under the budget instead of jumping by 2x per bit.  The container is the narrowest that
    holds the levels needed: int4 (<= 16 levels, two codes per byte), int8, int16 (+shuffle).

Byte layout (all little-endian; ``struct`` format in ``_FIXED``):

  ====== ===== ===== =====================================================================
  offset size  type  field
  ====== ===== ===== =====================================================================
  0      4     4s    magic ``b"FXLC"``
  4      1     u8    format version (1)
  5      1     u8    original dtype: 1 fp32, 2 fp16, 3 bf16
  6      1     u8    stored kind: 1 fp32, 2 fp16, 3 bf16, 4 int8 codes (u8), 5 int16 codes (u16),
                     6 int4 codes (two per byte, low nibble first)
  7      1     u8    flags: bit0 shuffle, bit1 zstd, bit2 dictionary
  8      1     u8    quantizer: 0 none, 1 range, 2 step
  9      1     u8    ndim (1..16)
  10     1     i8    zstd level (informational)
  11     1     u8    reserved, 0
  12     4     u32   dictionary id (0 = none)
  16     4     u32   header length H (fixed + variable part); the payload starts at H
  20     4     u32   frame count F (= channel count C = shape[0], or 1 for a 1-D array)
  24     8     u64   payload length P
  32     8     f64   achieved relative RMSE ||x - x_hat|| / ||x|| (exact, measured at encode)
  40     8     f64   requested max_rel_error (NaN when a chain was forced)
  48     4     u32   zlib.crc32 over bytes [0, 48) + [52, H + P): header and payload
  52     8*nd  u64   shape
  ..     4*C   f32   per-channel scale      } only when quantizer != 0
  ..     4*C   f32   per-channel bias       }
  ..     C     u8    per-channel mode: 0 symmetric, 1 affine, 2 step }
  ..     16*F  u64x2 per frame: stored (compressed) length, raw length
  H      P           frames, concatenated in channel order
  ====== ===== ===== =====================================================================

Every failure on decode (bad magic, unknown version, checksum, truncation, inconsistent sizes,
dictionary mismatch, zstd error) raises ``CodecError``; a wrong latent is never returned.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import zstandard

__all__ = [
    "CHAINS",
    "DEFAULT_LEVEL",
    "DEFAULT_MAX_REL_ERROR",
    "FORMAT_VERSION",
    "MAGIC",
    "CodecDictionary",
    "CodecError",
    "CodecInfo",
    "bf16_to_fp32",
    "decode",
    "encode",
    "fp32_to_bf16",
    "inspect",
    "relative_rmse",
    "train_dictionary",
]

MAGIC = b"FXLC"
FORMAT_VERSION = 1
#: 5 % relative RMSE on x0 (26 dB latent SNR; the step-K rebuild attenuates it by 1 - sigma_K): the finest
#: budget that meets the target of Wan/Open-Sora-shaped latents >= 15x smaller than NIRVANA-style without
#: a change in sample fidelity on the reference model (measured in docs/compression.md and docs/codec.md).
DEFAULT_MAX_REL_ERROR = 0.05
DEFAULT_LEVEL = 3

#: Chains accepted by ``encode(chain=...)`` (storage may be any of fp32/fp16/bf16/int4/int8/int16).
CHAINS = (
    "raw",
    "fp32+shuffle+zstd",
    "fp16",
    "fp16+zstd",
    "fp16+shuffle+zstd",
    "bf16",
    "bf16+shuffle+zstd",
    "int16+shuffle+zstd",
    "int8",
    "int8+zstd",
    "int8+shuffle+zstd",
    "int4",
    "int4+zstd",
)


class CodecError(ValueError):
    """Any problem with a latent or a blob: bad input, corrupt, truncated or foreign data."""


# ---------------------------------------------------------------------------------------------
# constants of the format
_FP32, _FP16, _BF16, _U8, _U16, _U4 = 1, 2, 3, 4, 5, 6
_STORAGE_NAME = {_FP32: "fp32", _FP16: "fp16", _BF16: "bf16", _U8: "int8", _U16: "int16", _U4: "int4"}
_STORAGE_CODE = {v: k for k, v in _STORAGE_NAME.items()}
_DTYPE_NAME = {_FP32: "float32", _FP16: "float16", _BF16: "bfloat16"}
_NP_DTYPE = {_FP32: np.dtype(np.float32), _FP16: np.dtype(np.float16), _BF16: np.dtype(np.uint16),
             _U8: np.dtype(np.uint8), _U16: np.dtype(np.uint16)}
_INT_BITS = {_U4: 4, _U8: 8, _U16: 16}
_F_SHUFFLE, _F_ZSTD, _F_DICT = 1, 2, 4
_Q_NONE, _Q_RANGE, _Q_STEP = 0, 1, 2
_QUANT_NAME = {_Q_NONE: "none", _Q_RANGE: "range", _Q_STEP: "step"}
_CH_SYM, _CH_AFFINE, _CH_STEP = 0, 1, 2
_CH_NAME = {_CH_SYM: "symmetric", _CH_AFFINE: "affine", _CH_STEP: "step"}

_FIXED = struct.Struct("<4sBBBBBBbBIIIQddI")
_CRC_OFFSET = 48
assert _FIXED.size == 52 and _FIXED.size == _CRC_OFFSET + 4
_MAX_NDIM = 16
_AFFINE_GAIN = 1.10  # affine only when its step is >10 % finer than the symmetric one
_PARALLEL_MIN_BYTES = 1 << 20  # below this, thread hand-off costs more than it saves

# ---------------------------------------------------------------------------------------------
# bf16 helpers


def fp32_to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN, overflow -> inf."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (u >> 16) & 1
    lsb += 0x7FFF
    lsb += u  # cannot overflow except for negative NaNs, which are patched below
    out = (lsb >> 16).astype(np.uint16)
    nan = np.isnan(u.view(np.float32))
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)  # keep sign, force a quiet NaN
    return out


def bf16_to_fp32(b: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> fp32, exact."""
    b = np.asarray(b)
    if b.dtype != np.uint16:
        raise CodecError(f"bf16 bit patterns must be uint16, got {b.dtype}")
    out = b.astype(np.uint32)
    out <<= 16
    return out.view(np.float32)


def _to_f32(a: np.ndarray, code: int) -> np.ndarray:
    """Values of a float array stored as ``code`` as float32 (no copy for fp32)."""
    if code == _FP32:
        return a
    if code == _FP16:
        return a.astype(np.float32)
    return bf16_to_fp32(a)


def _from_f32(f: np.ndarray, code: int, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> float storage ``code``, written to ``out`` when given."""
    if code == _FP32:
        r = f
    elif code == _FP16:
        if out is not None:
            np.copyto(out, f, casting="unsafe")
            return out
        r = f.astype(np.float16)
    else:
        r = fp32_to_bf16(f)
    if out is not None:
        np.copyto(out, r)
        return out
    return r


def relative_rmse(x: np.ndarray, x_hat: np.ndarray, dtype: str | None = None) -> float:
    """||x - x_hat|| / ||x|| in float64 (bf16 inputs as uint16 with ``dtype='bfloat16'``)."""
    code = _dtype_code(np.asarray(x), dtype)
    a = _to_f32(np.asarray(x), code).astype(np.float64)
    b = _to_f32(np.asarray(x_hat), code).astype(np.float64)
    num = float(np.sum((a - b) ** 2))
    den = float(np.sum(a * a))
    return _rel(num, den)


def _rel(sq_err: float, sq_ref: float) -> float:
    if sq_ref > 0:
        return math.sqrt(sq_err / sq_ref)
    return 0.0 if sq_err == 0 else math.inf


# ---------------------------------------------------------------------------------------------
# threads and zstd objects

_T = TypeVar("_T")
_R = TypeVar("_R")
_Z = TypeVar("_Z")
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _map(fn: Callable[[_T], _R], items: Sequence[_T], threads: int | None, nbytes: int) -> list[_R]:
    """Map over channels, in the shared pool when it pays (zstd and numpy drop the GIL)."""
    global _POOL
    n = _default_threads() if threads is None else max(1, threads)
    if n == 1 or len(items) < 2 or nbytes < _PARALLEL_MIN_BYTES:
        return [fn(i) for i in items]
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=_default_threads(), thread_name_prefix="fxcodec")
        pool = _POOL
    return list(pool.map(fn, items))


def _per_thread(slot: str, key: object, zdict: zstandard.ZstdCompressionDict | None, make: Callable[[], _Z]) -> _Z:
    """One zstd context per thread, slot and setting (zstd contexts are not thread-safe)."""
    cache = _LOCAL.__dict__.setdefault(slot, {})
    hit = cache.get(key)
    if hit is None:  # the entry holds zdict, so its id cannot be reused while cached
        if len(cache) > 64:
            cache.clear()
        hit = cache[key] = (zdict, make())
    return hit[1]


def _compressor(level: int, zdict: zstandard.ZstdCompressionDict | None) -> zstandard.ZstdCompressor:
    return _per_thread("c", (level, id(zdict)), zdict, lambda: zstandard.ZstdCompressor(
        level=level, dict_data=zdict, write_checksum=False, write_content_size=True, write_dict_id=False))


def _decompressor(zdict: zstandard.ZstdCompressionDict | None) -> zstandard.ZstdDecompressor:
    return _per_thread("d", id(zdict), zdict, lambda: zstandard.ZstdDecompressor(dict_data=zdict))


# ---------------------------------------------------------------------------------------------
# dictionaries


@dataclass(frozen=True)
class CodecDictionary:
    """A zstd dictionary for one namespace; store ``data`` and rebuild with ``CodecDictionary(data)``."""

    data: bytes
    dict_id: int = field(init=False)
    _zdict: zstandard.ZstdCompressionDict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            zd = zstandard.ZstdCompressionDict(bytes(self.data), dict_type=zstandard.DICT_TYPE_FULLDICT)
            zd.precompute_compress(level=DEFAULT_LEVEL)  # fails on anything that is not a dictionary
            did = zd.dict_id()
        except zstandard.ZstdError as e:
            raise CodecError(f"not a zstd dictionary: {e}") from e
        if did == 0:
            raise CodecError("dictionary has id 0; train it with train_dictionary()")
        object.__setattr__(self, "dict_id", did)
        object.__setattr__(self, "_zdict", zd)


def train_dictionary(
    latents: Iterable[np.ndarray],
    *,
    max_rel_error: float | None = None,
    chain: str | None = None,
    dtype: str | None = None,
    dict_size: int = 16384,
    dict_id: int | None = None,
    sample_bytes: int = 16384,
) -> CodecDictionary:
    """Train a zstd dictionary on what zstd will see for these latents (post quantize + shuffle).

    Use the same ``max_rel_error`` / ``chain`` as for encoding.  A blob holds one zstd frame per
    channel and a dictionary only primes each frame's start, so it pays for small latents, not for
    large ones (measured in docs/codec.md).
    """
    samples: list[bytes] = []
    for x in latents:
        plan = _plan(x, max_rel_error=max_rel_error, chain=chain, dtype=dtype, threads=None)[0]
        for s in plan.streams:
            mv = memoryview(s).cast("B")
            samples.extend(bytes(mv[i:i + sample_bytes]) for i in range(0, len(mv), sample_bytes))
    if not samples:
        raise CodecError("no samples to train a dictionary on")
    try:
        zd = zstandard.train_dictionary(dict_size, samples, dict_id=dict_id or 0, level=DEFAULT_LEVEL)
    except zstandard.ZstdError as e:
        raise CodecError(f"dictionary training failed: {e}") from e
    return CodecDictionary(zd.as_bytes())


# ---------------------------------------------------------------------------------------------
# encode


@dataclass
class _Plan:
    """Everything before entropy coding: stored arrays per channel plus their metadata."""

    orig: int
    shape: tuple[int, ...]
    stored: int
    shuffle: bool
    qmode: int
    streams: list[np.ndarray]  # per channel, contiguous, already shuffled
    raw_lens: list[int]
    error: float
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    chmode: np.ndarray | None = None


def _dtype_code(x: np.ndarray, dtype: str | None) -> int:
    if dtype is not None:
        d = str(dtype).lower().replace("torch.", "")
        if d in ("bfloat16", "bf16"):
            if x.dtype != np.uint16:
                raise CodecError(f"dtype='bfloat16' needs a uint16 array of bit patterns, got {x.dtype}")
            return _BF16
        want = {"float32": _FP32, "fp32": _FP32, "float16": _FP16, "fp16": _FP16}.get(d)
        if want is None:
            raise CodecError(f"unsupported dtype tag {dtype!r} (float32, float16, bfloat16)")
        if x.dtype != _NP_DTYPE[want]:
            raise CodecError(f"dtype tag {dtype!r} does not match array dtype {x.dtype}")
        return want
    if x.dtype == np.float32:
        return _FP32
    if x.dtype == np.float16:
        return _FP16
    if x.dtype == np.uint16:
        raise CodecError("uint16 array: pass dtype='bfloat16' if these are bf16 bit patterns")
    raise CodecError(f"unsupported dtype {x.dtype}: float32, float16 or bf16 (uint16 + dtype='bfloat16')")


def _parse_chain(chain: str, orig: int) -> tuple[int, bool, bool]:
    """'int8+shuffle+zstd' -> (storage code, shuffle, zstd)."""
    if chain == "raw":
        return orig, False, False
    parts = chain.split("+")
    storage = _STORAGE_CODE.get(parts[0])
    rest = parts[1:]
    if storage is None or rest not in ([], ["shuffle"], ["zstd"], ["shuffle", "zstd"]):
        raise CodecError(f"unknown chain {chain!r}: storage[+shuffle][+zstd] with storage in "
                         f"{sorted(_STORAGE_CODE)}, or 'raw'")
    return storage, "shuffle" in rest, "zstd" in rest


def _chain_name(orig: int, stored: int, flags: int) -> str:
    if stored == orig and not flags & (_F_SHUFFLE | _F_ZSTD):
        return "raw"
    name = _STORAGE_NAME[stored]
    if flags & _F_SHUFFLE:
        name += "+shuffle"
    if flags & _F_ZSTD:
        name += "+zstd"
    return name


_UINT = {2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}


def _shuffle(a: np.ndarray) -> np.ndarray:
    """Group byte k of every element together (plane k = byte k); identity for 1-byte items.

    Shifts and strided copies instead of a transpose: numpy's (n, k) -> (k, n) byte transpose is
    several times slower (measured in docs/codec.md).
    """
    k = a.dtype.itemsize
    if k == 1:
        return a
    u = a.view(_UINT[k])
    out = np.empty((k, u.size), np.uint8)
    if k == 2:
        np.copyto(out[0], u, casting="unsafe")  # unsigned narrowing keeps the low byte
        np.right_shift(u, 8, out=out[1], casting="unsafe")
    else:
        b = a.view(np.uint8)
        for i in range(k):
            out[i] = b[i::k]
    return out


def _unshuffle(raw: Any, k: int, n: int, dst: np.ndarray) -> None:
    """Inverse of ``_shuffle``: byte planes in ``raw`` -> ``dst`` (n items of k bytes)."""
    planes = np.frombuffer(raw, np.uint8, k * n).reshape(k, n)
    if k == 2:
        u = dst.view(np.uint16)
        np.copyto(u, planes[1])
        np.left_shift(u, 8, out=u)
        np.bitwise_or(u, planes[0], out=u)
    else:
        b = dst.view(np.uint8)
        for i in range(k):
            b[i::k] = planes[i]


def _pack4(codes: np.ndarray) -> np.ndarray:
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    pair = codes.reshape(-1, 2)
    return pair[:, 0] | (pair[:, 1] << 4)


def _unpack4(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(2 * packed.size, np.uint8)
    np.bitwise_and(packed, 15, out=out[0::2])
    np.right_shift(packed, 4, out=out[1::2])
    return out[:n]


def _dequant(codes: np.ndarray, scale: np.float32, bias: np.float32, orig: int,
             out: np.ndarray | None = None) -> np.ndarray:
    """codes * scale + bias in float32, cast to the original dtype (same code for encode and decode)."""
    if orig == _FP32:
        r = np.multiply(codes, scale, out=out, dtype=np.float32)
        np.add(r, bias, out=r)
        return r
    tmp = np.multiply(codes, scale, dtype=np.float32)
    np.add(tmp, bias, out=tmp)
    with np.errstate(over="ignore"):  # an overflow shows up as an infinite error at encode
        return _from_f32(tmp, orig, out)


def _dequant_table(codes: np.ndarray, scale: np.float32, bias: np.float32, orig: int) -> np.ndarray:
    """``_dequant`` of every code up to the largest in ``codes``, indexed by code: for 16-bit outputs a
    gather from this table replaces numpy's slower fp32 -> fp16 cast of every value, with identical
    values (measured in docs/codec.md)."""
    top = 255 if codes.dtype == np.uint8 else int(codes.max())
    return _dequant(np.arange(top + 1, dtype=codes.dtype), scale, bias, orig)


def _channels(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)


def _plan(x: np.ndarray, *, max_rel_error: float | None, chain: str | None, dtype: str | None,
          threads: int | None) -> list[_Plan]:
    """Validate x, choose the chain (forced or from the budget) and produce the stored streams.

    Returns one plan, or a few candidates (all within the budget) when sizes can only be compared
    after compression.
    """
    if not isinstance(x, np.ndarray):
        raise CodecError(f"expected a numpy array, got {type(x).__name__} (convert torch tensors first)")
    orig = _dtype_code(x, dtype)
    if x.ndim < 1 or x.ndim > _MAX_NDIM or x.size == 0:
        raise CodecError(f"latent must have 1..{_MAX_NDIM} dims and at least one value, got shape {x.shape}")
    if max_rel_error is not None and (not math.isfinite(max_rel_error) or max_rel_error < 0):
        raise CodecError(f"max_rel_error must be a finite number >= 0, got {max_rel_error}")
    x = np.ascontiguousarray(x)
    xc = _channels(x)
    nbytes = x.nbytes

    # 16-bit input: widen once (numpy's fp16 cast is slow, and every candidate needs fp32 values).
    if orig == _FP32:
        xf = xc
    else:
        xf = np.empty(xc.shape, np.float32)

        def widen(c: int) -> None:
            xf[c] = _to_f32(xc[c], orig)

        _map(widen, range(xc.shape[0]), threads, nbytes)

    # One pass for stats: per-channel min/max (NaN/Inf check for free) and sum of squares.
    def stats(c: int) -> tuple[float, float, float]:
        f = xf[c]
        return float(f.min()), float(f.max()), float(np.dot(f, f))

    st = np.array(_map(stats, range(xc.shape[0]), threads, nbytes), dtype=np.float64)
    lo, hi, sq = st[:, 0], st[:, 1], st[:, 2]
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        bad = int(np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi)))[0])
        raise CodecError(f"latent contains NaN or Inf (first in channel {bad})")
    sq_ref = float(sq.sum())

    def check(p: _Plan, name: str) -> _Plan:
        if not math.isfinite(p.error):
            raise CodecError(f"chain {name!r} overflows the {_DTYPE_NAME[orig]} range on decode")
        if max_rel_error is not None and p.error > max_rel_error:
            raise CodecError(f"chain {name!r} gives relative error {p.error:.3g} > max_rel_error "
                             f"{max_rel_error:.3g}")
        return p

    if chain is not None:
        stored, shuffle, _ = _parse_chain(chain, orig)
        if stored in _INT_BITS:
            return [check(_quant_range(xf, orig, stored, shuffle, lo, hi, sq_ref, threads, x.shape), chain)]
        return [check(_narrow(xc, xf, orig, stored, shuffle, sq_ref, threads, x.shape), chain)]

    budget = DEFAULT_MAX_REL_ERROR if max_rel_error is None else max_rel_error
    if budget == 0:
        return [_narrow(xc, xf, orig, orig, True, sq_ref, threads, x.shape)]
    p = _quant_step(xf, orig, lo, hi, sq_ref, budget, threads, x.shape)
    if p is not None and p.stored != _U16:
        return [p]  # 8 bits or fewer per value: nothing float-based is smaller
    # Fine budgets: int16 codes may lose to fp16 (fp32 input) or to the lossless 16-bit input;
    # encode() compresses these few candidates and keeps the smallest.
    cands = [p] if p is not None else []
    if orig == _FP32:
        f = _narrow(xc, xf, orig, _FP16, True, sq_ref, threads, x.shape)
        if f.error <= budget:
            cands.append(f)
    if orig != _FP32 or not cands:
        cands.append(_narrow(xc, xf, orig, orig, True, sq_ref, threads, x.shape))
    return cands


def _narrow(xc: np.ndarray, xf: np.ndarray, orig: int, stored: int, shuffle: bool, sq_ref: float,
            threads: int | None, shape: tuple[int, ...]) -> _Plan:
    """Float storage (possibly the original dtype: lossless); xf = xc as float32."""

    def work(c: int) -> tuple[np.ndarray, float]:
        a = xc[c]
        if stored == orig:
            return (_shuffle(a) if shuffle else a), 0.0
        f = xf[c]
        with np.errstate(over="ignore"):
            s = _from_f32(f, stored)
        if stored == _FP16 and not np.isfinite(s).all():
            raise CodecError(f"channel {c} has values outside the fp16 range (|x| > 65504)")
        back = _to_f32(_from_f32(_to_f32(s, stored), orig), orig)
        d = back - f
        return (_shuffle(s) if shuffle else s), float(np.dot(d, d))

    res = _map(work, range(xc.shape[0]), threads, xc.nbytes)
    streams = [r[0] for r in res]
    return _Plan(orig, shape, stored, shuffle, _Q_NONE, streams, [s.nbytes for s in streams],
                 _rel(sum(r[1] for r in res), sq_ref))


def _quant_codes(xc: np.ndarray, orig: int, stored: int, shuffle: bool, scale: np.ndarray,
                 bias: np.ndarray, qmax: int, threads: int | None) -> tuple[list[np.ndarray], float]:
    """Quantize every channel (xc: float32) and measure the exact squared error of the decoded result."""
    cdt = np.uint16 if stored == _U16 else np.uint8

    def work(c: int) -> tuple[np.ndarray, float]:
        f = xc[c]
        s, b = np.float32(scale[c]), np.float32(bias[c])
        t = np.subtract(f, b, dtype=np.float32)
        t *= np.float32(1.0) / s
        np.rint(t, out=t)
        np.clip(t, 0, qmax, out=t)
        codes = t.astype(cdt)
        if orig == _FP32:
            back = _dequant(codes, s, b, orig)
        else:  # widened from the decoder's own table: the error of exactly what decode returns
            back = np.take(_to_f32(_dequant_table(codes, s, b, orig), orig), codes)
        d = np.subtract(back, f, out=t)
        err = float(np.dot(d, d))
        if stored == _U4:
            return _pack4(codes), err
        return (_shuffle(codes) if shuffle else codes), err

    res = _map(work, range(xc.shape[0]), threads, xc.nbytes)
    return [r[0] for r in res], sum(r[1] for r in res)


def _quant_range(xc: np.ndarray, orig: int, stored: int, shuffle: bool, lo: np.ndarray, hi: np.ndarray,
                 sq_ref: float, threads: int | None, shape: tuple[int, ...]) -> _Plan:
    """Fixed-bit per-channel quantization, symmetric or affine per channel (see module doc)."""
    bits = _INT_BITS[stored]
    qmax = (1 << bits) - 1
    half = 1 << (bits - 1)
    amax = np.maximum(np.abs(lo), np.abs(hi))
    s_sym = amax / (half - 1)
    s_aff = (hi - lo) / qmax
    affine = s_sym > _AFFINE_GAIN * s_aff
    scale = np.where(affine, s_aff, s_sym)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zp = np.where(affine, -np.rint(lo / scale), half)
    bias = (-zp * scale.astype(np.float64)).astype(np.float32)
    flat = hi == lo  # constant channel: code 0 with bias = the value, exact
    bias[flat] = lo[flat]
    affine |= flat
    chmode = np.where(affine, _CH_AFFINE, _CH_SYM).astype(np.uint8)
    streams, sq = _quant_codes(xc, orig, stored, shuffle, scale, bias, qmax, threads)
    raw = [s.nbytes for s in streams]
    return _Plan(orig, shape, stored, shuffle, _Q_RANGE, streams, raw, _rel(sq, sq_ref), scale, bias, chmode)


def _quant_step(xc: np.ndarray, orig: int, lo: np.ndarray, hi: np.ndarray, sq_ref: float,
                budget: float, threads: int | None, shape: tuple[int, ...]) -> _Plan | None:
    """Uniform step from the error budget; None if even int16 codes cannot meet it.

    First with at most 256 levels per channel (int8/int4 container: half the bytes to move and a
    table decode), capping the step of wide channels and shrinking the common step to pay for it;
    then, if that cannot meet the budget, with a common step in an int16 container.
    """
    rms = math.sqrt(sq_ref / xc.size)
    # uniform-noise model with a 3 % margin; all zeros: any step reconstructs exactly
    step0 = 1.0 if rms == 0 else 0.97 * budget * rms * math.sqrt(12.0)
    width = hi - lo
    for cap in (256, 65536):
        step = step0
        for _ in range(5):
            s_c = np.maximum(step, width / (cap - 1) * (1 + 1e-6)).astype(np.float32)
            if not (np.isfinite(s_c).all() and (s_c > 0).all()):
                return None
            s64 = s_c.astype(np.float64)
            zp = -np.rint(lo / s64)
            levels = float(np.max(np.rint(hi / s64) + zp)) + 1
            if levels > cap:
                break  # float rounding put a channel over the container
            stored = _U4 if levels <= 16 else _U8 if levels <= 256 else _U16
            qmax = (1 << _INT_BITS[stored]) - 1
            bias = (-zp * s64).astype(np.float32)
            bias[width == 0] = lo[width == 0]  # constant channel: code 0 decodes to the value exactly
            shuffle = stored == _U16
            streams, sq = _quant_codes(xc, orig, stored, shuffle, s_c, bias, qmax, threads)
            err = _rel(sq, sq_ref)
            if err <= budget:
                chmode = np.full(xc.shape[0], _CH_STEP, np.uint8)
                return _Plan(orig, shape, stored, shuffle, _Q_STEP, streams, [x.nbytes for x in streams],
                             err, s_c, bias, chmode)
            if (s_c > step).all():
                break  # every channel is at its cap: a finer common step changes nothing
            step *= 0.97 * budget / err  # model was optimistic (coarse steps, caps, output rounding)
    return None


def encode(
    x: np.ndarray,
    *,
    max_rel_error: float | None = None,
    chain: str | None = None,
    dtype: str | None = None,
    level: int = DEFAULT_LEVEL,
    dictionary: CodecDictionary | None = None,
    threads: int | None = None,
) -> bytes:
    """Encode a latent [C, ...] (fp32, fp16, or bf16 as uint16 with ``dtype='bfloat16'``).

    Without ``chain`` the codec picks the smallest encoding whose relative RMSE is at most
    ``max_rel_error`` (default ``DEFAULT_MAX_REL_ERROR``; 0 = lossless): budget-stepped integer
    codes + zstd, else fp16 + shuffle + zstd, else the original dtype + shuffle + zstd.  With
    ``chain`` (see ``CHAINS``) that chain is used; a ``max_rel_error`` given too is then checked.
    """
    plans = _plan(x, max_rel_error=max_rel_error, chain=chain, dtype=dtype, threads=threads)
    use_zstd = chain is None or _parse_chain(chain, plans[0].orig)[2]
    if dictionary is not None and not isinstance(dictionary, CodecDictionary):
        raise CodecError("dictionary must be a CodecDictionary")
    zdict = dictionary._zdict if (dictionary is not None and use_zstd) else None
    if not -7 <= level <= 22:
        raise CodecError(f"zstd level must be in -7..22, got {level}")

    best: tuple[int, _Plan, list[Any]] | None = None
    for plan in plans:
        if use_zstd:
            def comp(s: np.ndarray) -> bytes:
                return _compressor(level, zdict).compress(s)

            frames: list[Any] = _map(comp, plan.streams, threads, sum(plan.raw_lens))
        else:
            frames = [memoryview(s).cast("B") for s in plan.streams]
        size = sum(len(f) for f in frames)
        if best is None or size < best[0]:
            best = (size, plan, frames)
    assert best is not None
    _, plan, frames = best

    flags = (_F_SHUFFLE if plan.shuffle else 0) | (_F_ZSTD if use_zstd else 0) | (_F_DICT if zdict else 0)
    var = [struct.pack(f"<{len(plan.shape)}Q", *plan.shape)]
    if plan.qmode != _Q_NONE:
        assert plan.scale is not None and plan.bias is not None and plan.chmode is not None
        var += [plan.scale.astype("<f4").tobytes(), plan.bias.astype("<f4").tobytes(), plan.chmode.tobytes()]
    lens = np.array([[len(f), r] for f, r in zip(frames, plan.raw_lens, strict=True)], dtype="<u8")
    var.append(lens.tobytes())
    varb = b"".join(var)
    header_len = _FIXED.size + len(varb)
    payload_len = int(lens[:, 0].sum())
    fixed = _FIXED.pack(
        MAGIC, FORMAT_VERSION, plan.orig, plan.stored, flags, plan.qmode, len(plan.shape), level, 0,
        dictionary.dict_id if zdict else 0, header_len, len(frames), payload_len, plan.error,
        _recorded_budget(chain, max_rel_error), 0,
    )
    crc = zlib.crc32(fixed[:_CRC_OFFSET])
    crc = zlib.crc32(varb, crc)
    for f in frames:
        crc = zlib.crc32(f, crc)
    fixed = fixed[:_CRC_OFFSET] + struct.pack("<I", crc)
    return b"".join([fixed, varb, *frames])


def _recorded_budget(chain: str | None, max_rel_error: float | None) -> float:
    """The budget the header records: NaN for a forced chain without one."""
    if max_rel_error is not None:
        return float(max_rel_error)
    return math.nan if chain is not None else DEFAULT_MAX_REL_ERROR


# ---------------------------------------------------------------------------------------------
# decode


@dataclass(frozen=True)
class CodecInfo:
    """What ``inspect`` reports about a blob (no payload is decompressed)."""

    version: int
    dtype: str
    stored: str
    chain: str
    quantizer: str
    shape: tuple[int, ...]
    achieved_rel_error: float
    max_rel_error: float | None
    zstd_level: int
    dictionary_id: int
    header_bytes: int
    payload_bytes: int
    total_bytes: int
    original_bytes: int
    ratio: float
    channel_modes: tuple[str, ...] = ()
    scales: tuple[float, ...] = ()
    biases: tuple[float, ...] = ()


@dataclass
class _Header:
    orig: int
    stored: int
    flags: int
    qmode: int
    level: int
    dict_id: int
    header_len: int
    payload_len: int
    error: float
    budget: float
    shape: tuple[int, ...]
    scale: np.ndarray | None
    bias: np.ndarray | None
    chmode: np.ndarray | None
    lens: np.ndarray  # [F, 2] stored, raw


def _parse(blob: bytes | bytearray | memoryview, verify: bool = True) -> tuple[_Header, memoryview]:
    """Parse and validate the header; check sizes and the checksum before anything is trusted."""
    try:
        mv = memoryview(blob).cast("B")
    except TypeError as e:
        raise CodecError(f"blob must be bytes-like, got {type(blob).__name__}") from e
    n = len(mv)
    if n < 4 or bytes(mv[:4]) != MAGIC:
        raise CodecError(f"bad magic {bytes(mv[:4])!r}: not a FlexCache latent blob (expected {MAGIC!r})")
    if n < _FIXED.size:
        raise CodecError(f"truncated header: {n} of at least {_FIXED.size} bytes")
    (_, ver, orig, stored, flags, qmode, ndim, level, _res, dict_id, header_len, nframes, payload_len,
     error, budget, crc) = _FIXED.unpack_from(mv, 0)
    if ver != FORMAT_VERSION:
        raise CodecError(f"unsupported format version {ver} (this codec reads version {FORMAT_VERSION})")
    if n < header_len:
        raise CodecError(f"truncated header: {n} of {header_len} bytes")
    if n < header_len + payload_len:
        raise CodecError(f"truncated payload: {n - header_len} of {payload_len} bytes")
    if n > header_len + payload_len:
        raise CodecError(f"{n - header_len - payload_len} trailing bytes after the payload")
    if verify:
        got = zlib.crc32(mv[_CRC_OFFSET + 4:], zlib.crc32(mv[:_CRC_OFFSET]))
        if got != crc:
            raise CodecError(f"checksum mismatch: header says {crc:#010x}, data gives {got:#010x} "
                             "(corrupt blob)")
    if orig not in _DTYPE_NAME or stored not in _STORAGE_NAME or qmode not in _QUANT_NAME:
        raise CodecError(f"invalid header: dtype {orig}, storage {stored}, quantizer {qmode}")
    if (qmode == _Q_NONE) != (stored not in _INT_BITS) or flags & ~7 or not 1 <= ndim <= _MAX_NDIM:
        raise CodecError("invalid header: inconsistent storage/quantizer/flags/ndim")
    if bool(flags & _F_DICT) != (dict_id != 0) or (flags & _F_DICT and not flags & _F_ZSTD):
        raise CodecError("invalid header: dictionary flag and id disagree")
    off = _FIXED.size
    try:
        shape = struct.unpack_from(f"<{ndim}Q", mv, off)
        off += 8 * ndim
        nch = shape[0] if ndim >= 2 else 1
        scale = bias = chmode = None
        if qmode != _Q_NONE:
            scale = np.frombuffer(mv, "<f4", nch, off).astype(np.float32)
            bias = np.frombuffer(mv, "<f4", nch, off + 4 * nch).astype(np.float32)
            chmode = np.frombuffer(mv, np.uint8, nch, off + 8 * nch).copy()
            off += 9 * nch
        lens = np.frombuffer(mv, "<u8", 2 * nframes, off).reshape(nframes, 2).astype(np.int64)
        off += 16 * nframes
    except (struct.error, ValueError) as e:
        raise CodecError(f"invalid header: variable part does not fit: {e}") from e
    if off != header_len:
        raise CodecError(f"invalid header: length {header_len}, fields end at {off}")
    count = math.prod(shape)
    if nframes != nch or count == 0 or count % nch:
        raise CodecError(f"invalid header: {nframes} frames for shape {shape}")
    per = count // nch
    item = _NP_DTYPE[stored].itemsize if stored != _U4 else None
    want_raw = (per + 1) // 2 if item is None else per * item
    if (lens[:, 1] != want_raw).any() or int(lens[:, 0].sum()) != payload_len:
        raise CodecError("invalid header: frame lengths do not match shape and payload")
    if not flags & _F_ZSTD and (lens[:, 0] != lens[:, 1]).any():
        raise CodecError("invalid header: uncompressed frame with stored != raw length")
    if scale is not None and not (np.isfinite(scale).all() and np.isfinite(bias).all()):
        raise CodecError("invalid header: non-finite scale or bias")
    h = _Header(orig, stored, flags, qmode, level, dict_id, header_len, payload_len, error, budget,
                tuple(int(s) for s in shape), scale, bias, chmode, lens)
    return h, mv


def inspect(blob: bytes | bytearray | memoryview, *, verify: bool = True) -> CodecInfo:
    """Describe a blob: dtype, shape, chain, achieved error, sizes (checksum checked unless verify=False)."""
    h, mv = _parse(blob, verify)
    orig_bytes = math.prod(h.shape) * _NP_DTYPE[h.orig].itemsize
    return CodecInfo(
        version=FORMAT_VERSION,
        dtype=_DTYPE_NAME[h.orig],
        stored=_STORAGE_NAME[h.stored],
        chain=_chain_name(h.orig, h.stored, h.flags),
        quantizer=_QUANT_NAME[h.qmode],
        shape=h.shape,
        achieved_rel_error=h.error,
        max_rel_error=None if math.isnan(h.budget) else h.budget,
        zstd_level=h.level,
        dictionary_id=h.dict_id,
        header_bytes=h.header_len,
        payload_bytes=h.payload_len,
        total_bytes=len(mv),
        original_bytes=orig_bytes,
        ratio=orig_bytes / len(mv),
        channel_modes=tuple(_CH_NAME.get(int(m), "?") for m in h.chmode) if h.chmode is not None else (),
        scales=tuple(float(s) for s in h.scale) if h.scale is not None else (),
        biases=tuple(float(b) for b in h.bias) if h.bias is not None else (),
    )


def decode(
    blob: bytes | bytearray | memoryview,
    *,
    dictionary: CodecDictionary | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Decode a blob to a new array of the original dtype (bf16 comes back as uint16 bit patterns)."""
    h, mv = _parse(blob)
    zdict = None
    if h.dict_id:
        if dictionary is None:
            raise CodecError(f"blob was encoded with dictionary id {h.dict_id}; none given")
        if dictionary.dict_id != h.dict_id:
            raise CodecError(f"dictionary mismatch: blob needs id {h.dict_id}, given id {dictionary.dict_id}")
        zdict = dictionary._zdict
    out = np.empty(h.shape, _NP_DTYPE[h.orig])
    oc = _channels(out)
    per = oc.shape[1]
    starts = np.concatenate([[h.header_len], h.header_len + np.cumsum(h.lens[:, 0])])
    stored_dt = _NP_DTYPE.get(h.stored, np.dtype(np.uint8))
    k = stored_dt.itemsize

    def work(c: int) -> None:
        frame = mv[int(starts[c]):int(starts[c + 1])]
        raw_len = int(h.lens[c, 1])
        if h.flags & _F_ZSTD:
            try:
                raw = _decompressor(zdict).decompress(frame, max_output_size=raw_len)
            except zstandard.ZstdError as e:
                raise CodecError(f"zstd error in channel {c}: {e}") from e
            if len(raw) != raw_len:
                raise CodecError(f"channel {c}: decompressed {len(raw)} of {raw_len} bytes")
        else:
            raw = frame
        dst = oc[c]
        if h.stored == _U4:
            codes = _unpack4(np.frombuffer(raw, np.uint8), per)
        elif h.flags & _F_SHUFFLE and k > 1:
            if h.stored == h.orig:
                _unshuffle(raw, k, per, dst)
                return
            codes = np.empty(per, stored_dt)
            _unshuffle(raw, k, per, codes)
        else:
            codes = np.frombuffer(raw, stored_dt)
        if h.qmode != _Q_NONE:
            assert h.scale is not None and h.bias is not None
            if h.orig != _FP32:
                np.take(_dequant_table(codes, h.scale[c], h.bias[c], h.orig), codes, out=dst)
            else:
                _dequant(codes, h.scale[c], h.bias[c], h.orig, dst)
        elif h.stored == h.orig:
            dst[...] = codes
        else:
            _from_f32(_to_f32(codes, h.stored), h.orig, dst)

    _map(work, range(oc.shape[0]), threads, out.nbytes)
    return out
