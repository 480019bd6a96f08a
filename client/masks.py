"""Object masks on the latent grid: estimated from the latent video, or pooled from pixel masks.

A cache entry can carry where its object is ([T, H, W] on the latent grid) so that a composed hit
can put one entry's object onto another entry's background. Callers with better information (a
segmenter, cross-attention maps) pass their own mask; otherwise `estimate_object_mask` guesses it
from the latent alone, because that is all the cache side ever sees:

- motion: how far each cell is from its own temporal median (the static background stays put);
- saliency: how far each cell is from its frame's spatial median (the background dominates a frame).

Both are summed over channels and scaled to [0, 1] per clip; saliency counts double (on the
reference model's coarse 4-frame latents motion is the weaker cue: weights chosen on one set of
rendered clips, IoU reported on another by bench/bench_masks.py); the sum is split by Otsu's
threshold (the split that best separates the two score populations). numpy only.
"""

from __future__ import annotations

import numpy as np

MOTION_WEIGHT = 0.5


def _unit(score: np.ndarray) -> np.ndarray:
    span = float(score.max() - score.min())
    return (score - score.min()) / span if span > 0 else np.zeros_like(score)


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """The threshold that maximises the between-class variance of `values`."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centers)
    total, total_mean = weight[-1], mean[-1]
    w0, w1 = weight[:-1], total - weight[:-1]
    valid = (w0 > 0) & (w1 > 0)
    m0 = np.where(valid, mean[:-1] / np.maximum(w0, 1), 0)
    m1 = np.where(valid, (total_mean - mean[:-1]) / np.maximum(w1, 1), 0)
    between = np.where(valid, w0 * w1 * (m0 - m1) ** 2, -1)
    return float(edges[1:][int(np.argmax(between))])


def estimate_object_mask(latent: np.ndarray) -> np.ndarray:
    """Bool [T, H, W]: the cells of a latent video [C, T, H, W] that look like a moving or salient object."""
    x = np.asarray(latent, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected a latent video [C, T, H, W], got shape {x.shape}")
    motion = np.abs(x - np.median(x, axis=1, keepdims=True)).sum(axis=0)
    saliency = np.abs(x - np.median(x, axis=(2, 3), keepdims=True)).sum(axis=0)
    score = MOTION_WEIGHT * _unit(motion) + _unit(saliency)
    if not np.ptp(score):
        return np.zeros(score.shape, bool)
    return score > _otsu(score.ravel())


def pool_mask(mask: np.ndarray, grid: tuple[int, int, int], min_fraction: float = 0.25) -> np.ndarray:
    """A pixel mask [T, H, W] pooled onto a coarser latent grid: a cell is object if at least
    `min_fraction` of its pixels are (objects are small; a majority rule would drop them)."""
    t, h, w = grid
    m = np.asarray(mask, dtype=np.float32)
    if any(a % b for a, b in zip(m.shape, grid, strict=True)):
        raise ValueError(f"mask {m.shape} does not divide into the grid {grid}")
    blocks = m.reshape(t, m.shape[0] // t, h, m.shape[1] // h, w, m.shape[2] // w)
    return blocks.mean(axis=(1, 3, 5)) >= min_fraction


def iou(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> float:
    """Intersection over union of two boolean masks (`empty` when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else empty
