"""Test vectors with a chosen cosine similarity to each other."""

from __future__ import annotations

import numpy as np

DIM = 384


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def at_similarity(base: np.ndarray, similarity: float, seed: int) -> np.ndarray:
    """A unit vector whose cosine similarity to `base` is exactly `similarity`."""
    other = unit(seed, base.size)
    other -= other.dot(base) * base
    other /= np.linalg.norm(other)
    return (similarity * base + np.sqrt(1 - similarity**2) * other).astype(np.float32)
