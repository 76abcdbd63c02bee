"""Finite scalar quantization (Mentzer et al., 2023): each latent channel is bounded and rounded to a few levels."""

from __future__ import annotations

import math

import torch
from torch import nn


class FSQ(nn.Module):
    """Quantize (..., d) latents with d = len(levels) to codes in [-1, 1] and integer indices in [0, prod(levels))."""

    def __init__(self, levels: tuple[int, ...] | list[int]):
        super().__init__()
        if not levels or any(int(level) < 2 for level in levels):
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels = tuple(int(level) for level in levels)
        levels_t = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.codebook_size)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash z so that rounding gives exactly `levels` values per channel (half-integer grid for even levels)."""
        half = (self._levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., d) latents -> (codes (..., d) in [-1, 1] with a straight-through gradient, indices (...))."""
        bounded = self.bound(z.float())
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        codes = rounded / (self._levels // 2)
        return codes, self.codes_to_indices(codes)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        half = self._levels // 2
        digits = torch.round(codes * half + half).long()
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        half = self._levels // 2
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels.long()
        return (digits.float() - half) / half
