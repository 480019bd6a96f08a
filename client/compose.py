"""Compose one starting latent from an object donor and a background donor.

x_K = m * rebuild(object donor) + (1 - m) * rebuild(background donor), with m a feathered mask on the
latent grid. Decisions, for a reader who wonders why:

- **Which pair.** The daemon returns up to top_k donors per role. We pick the pair with the best
  similarity sum plus a bonus for overlapping object masks: where the object donor's object sits is
  where the background donor's own object should be covered.
- **Where the object goes.** If the pair's masks overlap poorly (IoU < 0.5) and both have masks, the
  object donor's latent and mask are shifted (whole clip, integer cells) so its object's centroid
  lands on the background donor's object's centroid; the object then replaces the background
  donor's object instead of appearing beside it.
- **What m covers.** The union of the (shifted) object mask and the background donor's object mask,
  so no ghost of the background donor's object survives. Inside it m = 1; outside, m falls off over
  `feather` cells (a box blur), so the denoiser can blend the seam in its remaining steps.
- A donor without a mask cannot be placed: the pair is skipped, and with no usable pair the hit is
  a miss.
- **One part only** (`one_part`, a partial hit: only the object or only the background matched). The
  matched part of the donor is kept; the other is flattened to the donor's mean background (per
  channel and frame), so the donor's own object or scene detail does not survive where the request
  wants something else, while the latent keeps the statistics the denoiser expects at step K.

numpy only, so it serves numpy and (converted) torch latents alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .masks import iou

SHIFT_BELOW_IOU = 0.5
OVERLAP_BONUS = 0.1


@dataclass(frozen=True)
class Placement:
    shift: tuple[int, int]  # (rows, cols) on the latent grid applied to the object donor
    iou: float  # of the two donors' object masks before shifting


def pair_score(similarity_object: float, similarity_background: float, mask_object: np.ndarray | None,
               mask_background: np.ndarray | None) -> float | None:
    """Higher is better; None when the object donor cannot be placed (no mask, or masks of two grids)."""
    if mask_object is None or (mask_background is not None and mask_background.shape != mask_object.shape):
        return None
    overlap = iou(mask_object, mask_background, empty=0.0) if mask_background is not None else 0.0
    return similarity_object + similarity_background + OVERLAP_BONUS * overlap


def _centroid(mask: np.ndarray) -> np.ndarray:
    cells = np.argwhere(mask)  # [n, ndim] over (T, H, W)
    return cells[:, -2:].mean(axis=0)


def placement(mask_object: np.ndarray, mask_background: np.ndarray | None) -> Placement:
    overlap = iou(mask_object, mask_background, empty=0.0) if mask_background is not None else 1.0
    if mask_background is None or overlap >= SHIFT_BELOW_IOU or not mask_object.any() or not mask_background.any():
        return Placement((0, 0), overlap)
    dy, dx = np.rint(_centroid(mask_background) - _centroid(mask_object)).astype(int)
    return Placement((int(dy), int(dx)), overlap)


def shift(array: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """Move content by (rows, cols) over the last two axes, filling what is uncovered from the edge."""
    dy, dx = offset
    if dy == 0 and dx == 0:
        return array
    h, w = array.shape[-2:]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return array[..., rows, :][..., cols]


def _box_blur(m: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Mean over a window of 2 * radius + 1 cells along `axis`, edges repeated (cumulative sums)."""
    pad = [(0, 0)] * m.ndim
    pad[axis] = (radius, radius)
    sums = np.cumsum(np.pad(m, pad, mode="edge"), axis=axis)
    sums = np.concatenate([np.zeros_like(np.take(sums, [0], axis=axis)), sums], axis=axis)
    n, width = m.shape[axis], 2 * radius + 1
    return (np.take(sums, np.arange(width, n + width), axis=axis) - np.take(sums, np.arange(n), axis=axis)) / width


def feathered(mask: np.ndarray, feather: int) -> np.ndarray:
    """A float mask in [0, 1]: 1 on the mask, falling off over `feather` cells outside it (H and W)."""
    m = mask.astype(np.float32)
    if feather > 0:
        m = np.maximum(m, _box_blur(_box_blur(m, feather, m.ndim - 2), feather, m.ndim - 1))
    return np.clip(m, 0.0, 1.0)


def _check_grid(mask: np.ndarray, latent: np.ndarray) -> None:
    if mask.shape != latent.shape[1:]:
        raise ValueError(f"object mask {mask.shape} does not match the latent grid {latent.shape[1:]}")


def compose(object_latent: np.ndarray, background_latent: np.ndarray, mask_object: np.ndarray,
            mask_background: np.ndarray | None = None, feather: int = 1) -> tuple[np.ndarray, Placement]:
    """The composite latent [C, T, H, W] from two latents of the same shape and masks [T, H, W]."""
    if object_latent.shape != background_latent.shape:
        raise ValueError(f"donor latents differ in shape: {object_latent.shape} vs {background_latent.shape}")
    _check_grid(mask_object, object_latent)
    place = placement(mask_object, mask_background)
    obj = shift(object_latent, place.shift)
    region = shift(mask_object, place.shift)
    if mask_background is not None:
        region = region | mask_background
    m = feathered(region, feather)[None]
    composite = m * obj.astype(np.float32) + (1.0 - m) * background_latent.astype(np.float32)
    return composite.astype(object_latent.dtype), place


def one_part(latent: np.ndarray, mask: np.ndarray, keep: str, feather: int = 1) -> np.ndarray:
    """A start [C, T, H, W] from one donor whose `keep` part ("object" or "background") matched."""
    if keep not in ("object", "background"):
        raise ValueError(f"keep must be 'object' or 'background', not {keep!r}")
    _check_grid(mask, latent)
    x = latent.astype(np.float32)
    background = ~mask[None]  # [1, T, H, W]
    cells = background.sum(axis=(2, 3), keepdims=True)
    mean_bg = (x * background).sum(axis=(2, 3), keepdims=True) / np.maximum(cells, 1)
    fill = np.where(cells > 0, mean_bg, x.mean(axis=(2, 3), keepdims=True))  # a frame all object: its mean
    m = feathered(mask, feather)[None]
    out = m * x + (1.0 - m) * fill if keep == "object" else m * fill + (1.0 - m) * x
    return out.astype(latent.dtype)
