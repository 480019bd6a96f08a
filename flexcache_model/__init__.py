"""FlexCache reference model: a procedural video world, a small latent video diffusion model
(flow matching and DDPM/DDIM) and a probe-based quality metric, all trained on CPU.

Importing the package does not import torch: heavy names are resolved lazily on first use, so
numpy-only modules here (world, codec, prompt_split) stay usable by a torch-free client.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_pipeline": "pipeline",
    "Pipeline": "pipeline",
    "load_metric": "quality",
    "QualityMetric": "quality",
    "frechet_distance": "quality",
    "FlowMatchScheduler": "schedulers",
    "DDIMScheduler": "schedulers",
    "initial_noise": "schedulers",
    "embed": "text",
    "rebuild_for": "rebuild",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
