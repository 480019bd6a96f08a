"""Small DiT denoiser over video latents, conditioned on a MiniLM caption embedding.

Latent [C,T,H,W] is cut into (pt,ph,pw) patches -> tokens; the caption embedding enters twice:
through adaLN modulation (with the timestep) and as one extra token attended to by every patch.
A learned null embedding replaces the caption for classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DiTConfig:
    """Width/depth and latent geometry of the denoiser."""

    latent_shape: tuple[int, int, int, int] = (4, 4, 8, 8)
    patch: tuple[int, int, int] = (1, 2, 2)
    width: int = 128
    depth: int = 4
    heads: int = 4
    text_dim: int = 384


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of times in [0, 1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


class Block(nn.Module):
    """Transformer block with adaLN-zero modulation."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.n1 = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.n2 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.mod = nn.Linear(d, 6 * d)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, b1, g1, s2, b2, g2 = self.mod(c).unsqueeze(1).chunk(6, dim=-1)
        h = self.n1(x) * (1 + s1) + b1
        x = x + g1 * self.attn(h, h, h, need_weights=False)[0]
        h = self.n2(x) * (1 + s2) + b2
        return x + g2 * self.mlp(h)


class DiT(nn.Module):
    """Predicts velocity (flow), epsilon or v (DDPM) for a batch of latents."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, t, h, w = cfg.latent_shape
        pt, ph, pw = cfg.patch
        self.grid = (t // pt, h // ph, w // pw)
        self.n_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        pdim = c * pt * ph * pw
        d = cfg.width
        self.inp = nn.Linear(pdim, d)
        self.pos = nn.Parameter(torch.randn(1, self.n_tokens + 1, d) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.txt_mlp = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.txt_tok = nn.Linear(cfg.text_dim, d)
        self.null = nn.Parameter(torch.zeros(cfg.text_dim))
        self.blocks = nn.ModuleList(Block(d, cfg.heads) for _ in range(cfg.depth))
        self.nf = nn.LayerNorm(d, elementwise_affine=False)
        self.fmod = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, pdim)
        for m in (self.fmod, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        (gt, gh, gw), (pt, ph, pw) = self.grid, self.cfg.patch
        x = x.reshape(b, c, gt, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, gt * gh * gw, c * pt * ph * pw)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        c = self.cfg.latent_shape[0]
        (gt, gh, gw), (pt, ph, pw) = self.grid, self.cfg.patch
        x = x.reshape(b, gt, gh, gw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, gt * pt, gh * ph, gw * pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                uncond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,C,T,H,W], t [B] in [0,1000], emb [B,384]; uncond [B] bool swaps in the null caption."""
        if uncond is not None:
            emb = torch.where(uncond[:, None], self.null[None].expand_as(emb), emb)
        d = self.cfg.width
        c = self.t_mlp(timestep_embedding(t, d)) + self.txt_mlp(emb)
        c = nn.functional.silu(c)
        tok = torch.cat([self.txt_tok(emb)[:, None], self.inp(self.patchify(x))], dim=1) + self.pos
        for blk in self.blocks:
            tok = blk(tok, c)
        sh, sc = self.fmod(c).unsqueeze(1).chunk(2, dim=-1)
        tok = self.nf(tok) * (1 + sc) + sh
        return self.unpatchify(self.out(tok[:, 1:]))
