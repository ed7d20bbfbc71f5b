"""A small class-conditional eps-prediction UNet for 16x16 digits, shaped like Stable Diffusion's UNet contract:
``forward(x, t, cond)`` with the VP-scaled input, a (possibly fractional) timestep and the condition."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps, as in DDPM / Stable Diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block; the (time + label) embedding enters as a per-channel bias, as in SD."""

    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + self.skip(x)


class DigitsUNet(nn.Module):
    """A compact UNet: the 16x16 image is folded into 8x8x4 (pixel unshuffle, lossless), processed at 8x8 and 4x4,
    and unfolded again, which keeps a batch of 128 rows in the tens of milliseconds on a CPU. Label
    ``num_classes`` is the null label (unconditional)."""

    def __init__(self, num_classes: int = 10, width: int = 32, emb: int = 128) -> None:
        super().__init__()
        self.time_dim = emb // 2
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(num_classes + 1, emb)
        wide = width * 3 // 2
        self.inp = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4, width, 3, padding=1))
        self.down = ResBlock(width, width, emb)
        self.pool = nn.Conv2d(width, wide, 3, stride=2, padding=1)
        self.mid1 = ResBlock(wide, wide, emb)
        self.mid2 = ResBlock(wide, wide, emb)
        self.up = ResBlock(wide + width, width, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, 4, 3, padding=1),
                                 nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = nn.functional.silu(self.time_mlp(timestep_embedding(t, self.time_dim)) + self.label_emb(cond))
        h0 = self.down(self.inp(x), emb)                      # 8x8
        h = self.mid2(self.mid1(self.pool(h0), emb), emb)     # 4x4
        h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        return self.out(self.up(torch.cat([h, h0], 1), emb))
