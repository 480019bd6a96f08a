"""Tiny video autoencoder: [3,8,32,32] pixels <-> [4,4,8,8] latents (4x spatial, 2x temporal).

Per-frame 2D convolutions do the spatial work (cheap on CPU); 3D convolutions at 8x8 mix time and
fold frame pairs into one latent frame, so latents have a real [C,T,H,W] shape like Wan/Open-Sora.
Latents are normalised per channel (shift/scale buffers fitted after training) so the diffusion
model sees roughly unit-variance inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VAEConfig:
    """Shape and width of the autoencoder."""

    latent_channels: int = 4
    c1: int = 24
    c2: int = 48
    c3: int = 64
    frames: int = 8
    size: int = 32

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.latent_channels, self.frames // 2, self.size // 4, self.size // 4)


class VideoAutoencoder(nn.Module):
    """Deterministic autoencoder with latent normalisation buffers."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c1, c2, c3, lc = cfg.c1, cfg.c2, cfg.c3, cfg.latent_channels
        act = nn.SiLU
        self.enc2d = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), act(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), act(),
            nn.Conv2d(c2, c2, 3, padding=1), act(),
            nn.Conv2d(c2, c3, 4, stride=2, padding=1), act(),
        )
        self.enc3d = nn.Sequential(
            nn.Conv3d(2 * c3, c3, 3, padding=1), act(),
            nn.Conv3d(c3, c3, 3, padding=1), act(),
            nn.Conv3d(c3, lc, 1),
        )
        self.dec3d = nn.Sequential(
            nn.Conv3d(lc, c3, 3, padding=1), act(),
            nn.Conv3d(c3, c3, 3, padding=1), act(),
            nn.Conv3d(c3, 2 * c3, 1), act(),
        )
        self.dec2d = nn.Sequential(
            nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1), act(),
            nn.Conv2d(c2, c2, 3, padding=1), act(),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), act(),
            nn.Conv2d(c1, 3, 3, padding=1),
        )
        self.register_buffer("shift", torch.zeros(lc))
        self.register_buffer("scale", torch.ones(lc))

    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """[B,T,3,H,W] in [0,1] -> un-normalised latent [B,C,T/2,H/4,W/4]."""
        b, t, c, h, w = video.shape
        x = self.enc2d(video.reshape(b * t, c, h, w) * 2 - 1)
        x = x.reshape(b, t // 2, 2, x.shape[1], h // 4, w // 4)  # pair frames
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, 2 * x.shape[3], t // 2, h // 4, w // 4)
        return self.enc3d(x)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Un-normalised latent -> [B,T,3,H,W] (not clamped; the loss sees raw values)."""
        b, _, t2, h4, w4 = z.shape
        x = self.dec3d(z)
        c3 = x.shape[1] // 2
        x = x.reshape(b, 2, c3, t2, h4, w4).permute(0, 3, 1, 2, 4, 5).reshape(b * t2 * 2, c3, h4, w4)
        x = self.dec2d(x)
        return (x.reshape(b, t2 * 2, 3, h4 * 4, w4 * 4) + 1) / 2

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B,T,3,H,W] in [0,1] -> normalised latent [B,C,T/2,H/4,W/4]."""
        z = self.encode_raw(video)
        return (z - self.shift.view(1, -1, 1, 1, 1)) / self.scale.view(1, -1, 1, 1, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> video [B,T,3,H,W] clamped to [0,1]."""
        z = z * self.scale.view(1, -1, 1, 1, 1) + self.shift.view(1, -1, 1, 1, 1)
        return self.decode_raw(z).clamp(0, 1)
