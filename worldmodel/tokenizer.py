"""Frame tokenizer: an encoder to a small latent grid, an FSQ bottleneck, and a decoder back to pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from worldmodel.fsq import FSQ


@dataclass
class TokenizerConfig:
    backbone: Literal["conv"] = "conv"
    image_size: int = 64
    channels: int = 3
    widths: tuple[int, ...] = (32, 64, 96, 96)
    """Channel width per resolution stage; each stage after the first halves the resolution."""
    levels: tuple[int, ...] = (8, 6, 5)
    """FSQ levels per latent channel; the codebook has prod(levels) codes."""
    ssim_weight: float = 0.1
    bottom_rows: float = 0.0
    """Fraction of the frame's rows, from the bottom, whose pixel error is weighted by `bottom_weight`: CarRacing
    draws its speed, steering and gyro gauges in the bottom eighth, a few pixels that carry the car's state."""
    bottom_weight: float = 1.0
    latent_penalty: float = 0.01
    """Weight of a penalty on |z| > 2 before the FSQ bound, which keeps tanh out of saturation."""

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** (len(self.widths) - 1)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_size**2

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def bytes_per_frame(self) -> float:
        return self.tokens_per_frame * math.log2(self.codebook_size) / 8

    def validate(self) -> None:
        if self.image_size % 2 ** (len(self.widths) - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{len(self.widths) - 1}")


@dataclass
class TokenizerEncoderOutput:
    z: torch.Tensor  # (B, d, h, w) latents before quantization
    z_quantized: torch.Tensor  # (B, d, h, w) codes in [-1, 1]
    tokens: torch.Tensor  # (B, h, w) int64 indices


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ConvEncoder(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B, d, h, w) latents, with strided convolutions and residual blocks."""

    def __init__(self, config: TokenizerConfig, latent_dim: int):
        super().__init__()
        widths = config.widths
        layers: list[nn.Module] = [nn.Conv2d(config.channels, widths[0], 3, padding=1), ResBlock(widths[0])]
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(w_in, w_out, 4, stride=2, padding=1), ResBlock(w_out)]
        layers += [nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, d, h, w) codes -> (B, C, H, W) images, mirroring ConvEncoder with nearest upsampling."""

    def __init__(self, config: TokenizerConfig, latent_dim: int):
        super().__init__()
        widths = config.widths[::-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_dim, widths[0], 3, padding=1), ResBlock(widths[0])]
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(w_in, w_out, 3, padding=1),
                ResBlock(w_out),
            ]
        layers += [nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], config.channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net(codes)


BACKBONES = {"conv": (ConvEncoder, ConvDecoder)}


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean structural similarity of (B, C, H, W) images in [0, 1] over a uniform window."""
    c1, c2 = 0.01**2, 0.03**2
    pad = window // 2
    mu_x = F.avg_pool2d(x, window, 1, pad, count_include_pad=False)
    mu_y = F.avg_pool2d(y, window, 1, pad, count_include_pad=False)
    var_x = F.avg_pool2d(x * x, window, 1, pad, count_include_pad=False) - mu_x**2
    var_y = F.avg_pool2d(y * y, window, 1, pad, count_include_pad=False) - mu_y**2
    cov = F.avg_pool2d(x * y, window, 1, pad, count_include_pad=False) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.mean()


def image_psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) peak signal-to-noise ratio in dB of each pair of images in [0, 1]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1], averaged over the batch (per-image MSE)."""
    return image_psnr(x, y).mean()


def frames_to_float(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float in [0, 1]."""
    return rearrange(frames, "b h w c -> b c h w").float() / 255


class Tokenizer(nn.Module):
    """Frames <-> (h, w) grids of discrete tokens; `forward(frames)` returns (loss, logs) for training."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.quantizer = FSQ(config.levels)
        encoder_cls, decoder_cls = BACKBONES[config.backbone]
        self.encoder = encoder_cls(config, self.quantizer.dim)
        self.decoder = decoder_cls(config, self.quantizer.dim)

    def _check_frames(self, frames: torch.Tensor) -> None:
        c = self.config
        expected = (c.image_size, c.image_size, c.channels)
        if frames.ndim != 4 or tuple(frames.shape[1:]) != expected or frames.dtype != torch.uint8:
            raise ValueError(
                f"tokenizer expects (B, {c.image_size}, {c.image_size}, {c.channels}) uint8 frames,"
                f" got {tuple(frames.shape)} {frames.dtype}"
            )

    def encode(self, frames: torch.Tensor) -> TokenizerEncoderOutput:
        """(B, H, W, C) uint8 frames -> latents, codes and (B, h, w) tokens."""
        self._check_frames(frames)
        z = self.encoder(frames_to_float(frames))
        codes, tokens = self.quantizer(rearrange(z, "b d h w -> b h w d"))
        return TokenizerEncoderOutput(z, rearrange(codes, "b h w d -> b d h w"), tokens)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) codes -> (B, C, H, W) float images (unclamped)."""
        return self.decoder(codes)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) tokens -> (B, C, H, W) float images in [0, 1]."""
        codes = rearrange(self.quantizer.indices_to_codes(tokens), "b h w d -> b d h w")
        return self.decode_codes(codes).clamp(0, 1)

    @torch.no_grad()
    def tokens_to_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) tokens -> (B, H, W, C) uint8 frames."""
        images = self.decode(tokens).float()
        return rearrange((images * 255).round().to(torch.uint8), "b c h w -> b h w c")

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.encode(frames)
        target = frames_to_float(frames)
        recon = self.decode_codes(out.z_quantized)
        error = (recon - target).abs()
        l1 = error.mean()
        weighted = l1
        rows = round(self.config.bottom_rows * target.shape[-2])
        if rows and self.config.bottom_weight != 1.0:
            weighted = l1 + (self.config.bottom_weight - 1) * error[..., -rows:, :].sum() / error.numel()
        structural = 1 - ssim(recon.clamp(0, 1), target)
        overflow = F.relu(out.z.abs() - 2).pow(2).mean()
        loss = weighted + self.config.ssim_weight * structural + self.config.latent_penalty * overflow
        with torch.no_grad():
            used = torch.unique(out.tokens).numel()
            logs = {
                "loss": loss.item(),
                "l1": l1.item(),
                "ssim": 1 - structural.item(),
                "psnr": psnr(recon.clamp(0, 1), target).item(),
                "z_absmax": out.z.abs().max().item(),
                "codes_used": float(used),
            }
        return loss, logs

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self(batch["frames"])
