"""Quality metric: a 3D-conv probe trained on the world's ground truth.

- prompt fidelity: the fraction of a prompt's attributes (from `world.parse_caption`) that the probe
  recognises in a clip, in [0, 1] (reported x100 as points);
- Frechet distance between the probe's penultimate features of two clip sets (an FVD analogue).

Object attributes are multi-label (two-object clips): a prompt value counts as recognised when it is
among the probe's top-k for that attribute, k = number of distinct values the prompt gives it.
Background type and colour are single-label (argmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint, world

# attribute -> vocabulary; "bg_color" adds "none" for the fixed-palette scenes
HEADS: dict[str, tuple[str, ...]] = {
    "shape": world.SHAPES,
    "color": world.OBJ_COLORS,
    "size": world.SIZES,
    "motion": world.MOTIONS,
    "bg_type": world.BG_TYPES,
    "bg_color": (*world.BG_COLORS, "none"),
}
MULTI_LABEL = ("shape", "color", "size", "motion")


@dataclass
class ProbeConfig:
    """Probe width."""

    c1: int = 16
    c2: int = 32
    c3: int = 64
    feat: int = 128


class Probe(nn.Module):
    """Small 3D conv net: video [B,T,3,32,32] -> penultimate features and per-attribute logits."""

    def __init__(self, cfg: ProbeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        act = nn.SiLU
        self.net = nn.Sequential(
            nn.Conv3d(3, cfg.c1, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)), act(),  # 8x16x16
            nn.Conv3d(cfg.c1, cfg.c2, 3, stride=(1, 2, 2), padding=1), act(),  # 8x8x8
            nn.Conv3d(cfg.c2, cfg.c3, 3, stride=(2, 1, 1), padding=1), act(),  # 4x8x8
            nn.Conv3d(cfg.c3, cfg.c3, 3, stride=2, padding=1), act(),  # 2x4x4
            nn.Flatten(),
            nn.Linear(cfg.c3 * 2 * 4 * 4, cfg.feat), act(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.feat, len(v)) for k, v in HEADS.items()})

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f = self.net(video.permute(0, 2, 1, 3, 4) * 2 - 1)
        return f, {k: h(f) for k, h in self.heads.items()}


def targets(specs: Sequence[world.ClipSpec]) -> dict[str, torch.Tensor]:
    """Multi-hot targets for object heads, class indices for background heads."""
    out: dict[str, torch.Tensor] = {}
    for k in MULTI_LABEL:
        t = torch.zeros(len(specs), len(HEADS[k]))
        for i, s in enumerate(specs):
            for o in s.objects:
                t[i, HEADS[k].index(getattr(o, k))] = 1
        out[k] = t
    out["bg_type"] = torch.tensor([HEADS["bg_type"].index(s.bg_type) for s in specs])
    out["bg_color"] = torch.tensor([HEADS["bg_color"].index(s.bg_color or "none") for s in specs])
    return out


def probe_loss(logits: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> torch.Tensor:
    """BCE on object heads + CE on background heads."""
    loss = sum(nn.functional.binary_cross_entropy_with_logits(logits[k], tgt[k]) for k in MULTI_LABEL)
    ce = nn.functional.cross_entropy
    return loss + ce(logits["bg_type"], tgt["bg_type"]) + ce(logits["bg_color"], tgt["bg_color"])


def augment(video: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur and noise so the probe judges content, not the decoder's blur or grain."""
    b = video.shape[0]
    x = video.reshape(-1, 3, *video.shape[-2:])
    blurred = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).view_as(video)
    w = (torch.rand(b, 1, 1, 1, 1, generator=g) < 0.5).float() * torch.rand(b, 1, 1, 1, 1, generator=g)
    video = (1 - w) * video + w * blurred
    sigma = 0.05 * torch.rand(b, 1, 1, 1, 1, generator=g)
    return (video + sigma * torch.randn(video.shape, generator=g)).clamp(0, 1)


class QualityMetric:
    """Scores clips against prompts with a trained probe."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe.eval()

    @torch.no_grad()
    def predict(self, videos: np.ndarray | torch.Tensor, batch: int = 128
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Videos [B,T,3,H,W] in [0,1] -> features [B,feat] and per-attribute probabilities."""
        v = torch.as_tensor(np.asarray(videos) if not isinstance(videos, torch.Tensor) else videos).float()
        feats, probs = [], {k: [] for k in HEADS}
        for i in range(0, v.shape[0], batch):
            f, lg = self.probe(v[i:i + batch])
            feats.append(f)
            for k, x in lg.items():
                probs[k].append(torch.sigmoid(x) if k in MULTI_LABEL else torch.softmax(x, -1))
        return torch.cat(feats).numpy(), {k: torch.cat(x).numpy() for k, x in probs.items()}

    def fidelity(self, videos: np.ndarray | torch.Tensor, prompts: Sequence[str | world.ClipSpec]
                 ) -> np.ndarray:
        """Per-clip prompt fidelity in [0,1] (NaN if the prompt names no known attribute)."""
        _, probs = self.predict(videos)
        out = np.full(len(prompts), np.nan)
        for i, p in enumerate(prompts):
            spec = world.parse_caption(p) if isinstance(p, str) else p
            attrs = spec.attributes()
            if not attrs:
                continue
            hit = 0
            for name, value in attrs:
                pr = probs[name][i]
                if name in MULTI_LABEL:
                    k = len({v for a, v in attrs if a == name})
                    hit += HEADS[name].index(value) in np.argsort(-pr)[:k]
                else:
                    hit += int(np.argmax(pr)) == HEADS[name].index(value)
            out[i] = hit / len(attrs)
        return out

    def features(self, videos: np.ndarray | torch.Tensor) -> np.ndarray:
        """Penultimate probe features [B, feat] (for Frechet distance)."""
        return self.predict(videos)[0]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [n,d] and b [m,d]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(S1 S2) = sum of sqrt of the eigenvalues of S1 S2 (real and >= 0 for PSD S1, S2)
    ev = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def load_metric(checkpoint_dir: str | Path | None = None) -> QualityMetric:
    """Load the shipped probe."""
    d = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint.CHECKPOINT_DIR
    info = checkpoint.load_config(d, "probe")
    return QualityMetric(checkpoint.load_weights(Probe(ProbeConfig(**info["config"])), d, "probe"))
