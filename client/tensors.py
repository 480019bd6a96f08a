"""Latents <-> numpy arrays and raw bytes, for numpy arrays and torch tensors.

torch is optional: it is imported only when a tensor is passed in or asked for. numpy has no
bfloat16, so a bf16 tensor travels as its 16-bit patterns (uint16) under the dtype name "bfloat16";
returned as numpy it widens exactly to float32 (a bf16 value is the top half of a float32).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from flexcache.v1 import wire

from .optional import require

BF16 = wire.BF16


def is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def to_numpy(latent: Any) -> tuple[np.ndarray, str]:
    """(contiguous little-endian array, dtype name); bf16 comes out as uint16 bit patterns."""
    if is_torch_tensor(latent):
        import torch

        tensor = latent.detach().to("cpu").contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(np.uint16), BF16
        array = tensor.numpy()
    else:
        array = np.asarray(latent)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"latents must be numeric, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")), array.dtype.name


def from_numpy(array: np.ndarray, dtype: str, as_torch: bool = False):
    """Undo `to_numpy`: numpy by default (bf16 widened to float32), a torch tensor with `as_torch`."""
    if dtype == BF16:
        bits = array.view(np.uint16)
        if as_torch:
            torch = _torch()
            return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if as_torch:
        return _torch().from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    return array


def _torch() -> Any:
    return require("torch", "model", "as_torch=True")


def to_bytes(latent: Any) -> tuple[bytes, str, tuple[int, ...]]:
    """(raw little-endian bytes, dtype name, shape) of a numpy array or a torch tensor."""
    array, dtype = to_numpy(latent)
    return array.tobytes(), dtype, array.shape


def from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...], as_torch: bool = False):
    """The latent `to_bytes` encoded."""
    stored = np.dtype("<u2") if dtype == BF16 else np.dtype(dtype).newbyteorder("<")
    return from_numpy(np.frombuffer(data, dtype=stored).reshape(shape), dtype, as_torch)


def pack_mask(mask: Any) -> tuple[list[int], bytes]:
    """A boolean mask (numpy or torch) -> (shape, bits packed MSB-first in C order)."""
    if is_torch_tensor(mask):
        mask = mask.detach().to("cpu").numpy()
    array = np.asarray(mask).astype(bool)
    return list(array.shape), np.packbits(array, axis=None).tobytes()


def unpack_mask(shape: Any, bits: bytes) -> np.ndarray:
    shape = tuple(int(n) for n in shape)
    cells = int(np.prod(shape))
    return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=cells).astype(bool).reshape(shape)
