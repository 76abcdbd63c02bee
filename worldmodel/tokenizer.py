"""Frame tokenizer: an encoder to a small latent grid, an FSQ bottleneck, and a decoder back to pixels.

Three backbones share that interface and differ only in how they map pixels to the grid and back: `conv`
(strided convolutions with residual blocks), `vit` (one linear projection per patch, then transformer blocks)
and `hybrid` (the convolutional stages down to the grid, then transformer blocks over it). Each gives a
(B, d, h, w) latent grid of the same size for the same config, so the tokens are the same in kind whichever
backbone made them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.func import functional_call

from worldmodel.fsq import FSQ


@dataclass
class TokenizerConfig:
    backbone: Literal["conv", "vit", "hybrid"] = "conv"
    """How pixels map to the latent grid and back: `conv`, `vit` or `hybrid` (see the module docstring)."""
    image_size: int = 64
    """Frame height in pixels, and width too unless `image_width` is set."""
    image_width: int | None = None
    """Frame width of frames that are not square (road-camera frames, 128 x 256); the grid then has that shape."""
    channels: int = 3
    widths: tuple[int, ...] = (32, 64, 96, 96)
    """Channel width per resolution stage of the convolutions (`conv`, `hybrid`); each stage after the first halves
    the resolution, so the number of stages fixes the grid for every backbone (`vit` uses only that number)."""
    levels: tuple[int, ...] = (8, 6, 5)
    """FSQ levels per latent channel; the codebook has prod(levels) codes."""
    l1_weight: float = 1.0
    """Weight of the mean absolute pixel error in the loss."""
    mse_weight: float = 0.0
    """Weight of the mean squared pixel error. L1 alone is slow to draw what is absent from most frames, such as
    CarRacing's red gyroscope bar: L1's best guess for a pixel that is lit in fewer than half the frames is dark,
    and its gradient does not grow with the error; the squared error's does (docs/tokenizers.md)."""
    ssim_weight: float = 0.1
    bottom_rows: float = 0.0
    """Fraction of the frame's rows, from the bottom, whose pixel error is weighted by `bottom_weight`: CarRacing
    draws its speed, steering and gyro gauges in the bottom eighth, a few pixels that carry the car's state."""
    bottom_weight: float = 1.0
    rare_weight: float = 1.0
    """Weight of the pixel error where a frame differs from the batch's per-pixel median by more than
    `rare_threshold`: what few frames show at that place, such as highway-env's other cars (a few dark pixels each
    on a grey road, which neither L1 nor the squared error draws in minutes at weight 1; docs/loop.md). Multiplies
    with `bottom_weight`. 1 turns it off."""
    rare_threshold: float = 0.1
    """Intensity difference (0 to 1, largest over the channels) from the batch's median that makes a pixel rare."""
    latent_penalty: float = 0.01
    """Weight of a penalty on |z| > 2 before the FSQ bound, which keeps tanh out of saturation."""
    attention_width: int = 128
    """Token width of the transformer blocks of the `vit` and `hybrid` backbones (a multiple of 4 and of the heads)."""
    attention_layers: int = 4
    """Transformer blocks in the encoder and again in the decoder (`vit`, `hybrid`)."""
    attention_heads: int = 4
    """Attention heads per transformer block (`vit`, `hybrid`)."""
    vit_stem: Literal["patchify", "conv"] = "patchify"
    """How the `vit` encoder (only) turns pixels into tokens: one linear map per patch, or a convolutional stem of 3x3
    stride-2 convolutions (widths[1:], one per halving) and a 1x1 one, which Xiao et al. ("Early convolutions help
    transformers see better") found to make ViTs train more stably. The decoder is the same either way."""
    adversarial_weight: float = 0.0
    """Weight of a PatchGAN hinge loss that pushes the decoder towards frames a discriminator takes for real ones,
    for sharper frames at low rates. 0 turns it off and builds no discriminator."""
    adversarial_start: int = 1000
    """Training steps before the adversarial term reaches the encoder and decoder (the discriminator learns from
    the first step, so it is ready when the term starts)."""
    discriminator_widths: tuple[int, ...] = (32, 64, 128)
    """Channels of the discriminator's stride-2 convolutions (multiples of 8), one per halving of the resolution."""

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return self.image_size, self.image_width or self.image_size

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of the token grid: the frame's shape over `patch_size`."""
        return self.image_shape[0] // self.patch_size, self.image_shape[1] // self.patch_size

    @property
    def grid_size(self) -> int:
        """Side of a square token grid (what the dynamics model, the dream and the policy take)."""
        h, w = self.grid_shape
        if h != w:
            raise ValueError(f"the token grid is {h}x{w}, not square; the dynamics model and the dream need square")
        return h

    @property
    def patch_size(self) -> int:
        """Pixels along each side of the square patch that one token covers, for every backbone."""
        return 2 ** (len(self.widths) - 1)

    @property
    def tokens_per_frame(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def bytes_per_frame(self) -> float:
        return self.tokens_per_frame * math.log2(self.codebook_size) / 8

    def validate(self) -> None:
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths {self.widths}: expected at least one stage, each of at least 1 channel")
        if self.rare_weight < 0 or not 0 <= self.rare_threshold < 1 or self.bottom_weight < 0:
            raise ValueError(
                f"rare_weight {self.rare_weight} and bottom_weight {self.bottom_weight} must be >= 0 and"
                f" rare_threshold {self.rare_threshold} in [0, 1)"
            )
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown tokenizer backbone {self.backbone!r}; expected one of {sorted(BACKBONES)}")
        if self.vit_stem not in ("patchify", "conv"):
            raise ValueError(f"vit_stem {self.vit_stem!r}: expected 'patchify' or 'conv'")
        if self.image_width is not None and self.image_width < 1:
            raise ValueError(f"image_width {self.image_width}: expected None (square) or a width >= 1")
        if any(side % self.patch_size for side in self.image_shape) or min(self.image_shape) < 1:
            raise ValueError(
                f"image_size {self.image_size} and image_width {self.image_width} must be multiples of"
                f" 2**{len(self.widths) - 1} = {self.patch_size} (one halving per stage after the first)"
            )
        if self.backbone != "conv":
            width, heads = self.attention_width, self.attention_heads
            if heads < 1 or self.attention_layers < 1 or width % heads or width % 4:
                raise ValueError(
                    f"attention_width {width} must be a multiple of 4 (2-D sine-cosine positions) and of"
                    f" attention_heads {heads}, and attention_heads and attention_layers at least 1"
                )
        if min(self.l1_weight, self.mse_weight, self.ssim_weight) < 0 or not (self.l1_weight or self.mse_weight):
            raise ValueError(
                f"l1_weight {self.l1_weight}, mse_weight {self.mse_weight} and ssim_weight {self.ssim_weight} must be"
                " >= 0, and l1_weight or mse_weight > 0 (a pixel loss)"
            )
        if self.adversarial_weight < 0 or self.adversarial_start < 0:
            raise ValueError("adversarial_weight and adversarial_start must be >= 0")
        if self.adversarial_weight > 0 and (
            not self.discriminator_widths or any(w % 8 for w in self.discriminator_widths)
        ):
            raise ValueError(f"discriminator_widths {self.discriminator_widths} must be multiples of 8")


@dataclass
class TokenizerEncoderOutput:
    z: torch.Tensor  # (B, d, h, w) latents before quantization
    z_quantized: torch.Tensor  # (B, d, h, w) codes in [-1, 1]
    tokens: torch.Tensor  # (B, h, w) int64 indices


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that, in inference on the CPU, normalises small channels-last maps in channels-first order.

    PyTorch's channels-last CPU kernel is slow on small maps with wide groups. Per 32-frame chunk of the tiny
    decoder in bf16: 1.38 ms at 16x16x64 against 0.26 ms for the same tensor channels-first, 0.38 against 0.07
    ms at 8x8x96; from 32x32 on channels-last is the faster. So maps of fewer than 32 * 32 pixels are normalised
    channels-first and converted back (GroupNorm and SiLU with both copies: 0.62 against 1.30 ms at 16x16x64).
    The same function and parameters; training keeps the plain path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if normalise_channels_first(x):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def normalise_channels_first(x: torch.Tensor) -> bool:
    """Whether `GroupNorm` takes its channels-first path for `x`: a small channels-last map, CPU inference."""
    small = x.ndim == 4 and x.shape[-2] * x.shape[-1] < 32 * 32
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return small and channels_last and x.device.type == "cpu" and not torch.is_grad_enabled()


def norm_silu(width: int) -> list[nn.Module]:
    """GroupNorm (8 groups) then SiLU, in place: its input is the norm's fresh output (autograd allows it)."""
    return [GroupNorm(8, width), nn.SiLU(inplace=True)]


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.block = nn.Sequential(
            *norm_silu(width),
            nn.Conv2d(width, width, 3, padding=1),
            *norm_silu(width),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def conv_down_layers(config: TokenizerConfig) -> list[nn.Module]:
    """A stem convolution and one residual stage per width, each after the first halving the resolution:
    (B, C, H, W) -> (B, widths[-1], h, w)."""
    widths = config.widths
    layers: list[nn.Module] = [nn.Conv2d(config.channels, widths[0], 3, padding=1), ResBlock(widths[0])]
    for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Conv2d(w_in, w_out, 4, stride=2, padding=1), ResBlock(w_out)]
    return layers


# phase x tap x kernel row: which rows of a 3x3 kernel land on each of the two input rows that an output row of
# phase 0 (even) or 1 (odd) reads after nearest 2x upsampling (see `UpsampledConv`)
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class UpsampledConv(nn.Conv2d):
    """Nearest 2x upsampling followed by this 3x3 convolution (padding 1), computed without upsampling.

    After upsampling, an even output row 2i reads input rows i - 1, i, i (kernel rows 0, 1, 2) and an odd one
    2i + 1 reads i, i, i + 1: so each of the four output phases (row and column parity) is a 2x2 convolution of
    the input, its taps the sums of the kernel's rows and columns that land on the same input pixel. One
    convolution with padding 1 and 4x the output channels computes all four; each phase's output is read at its
    offset and interleaved. 16 (h + 1)^2 multiply-adds per input channel and output channel against 36 h^2 for
    the plain pair (0.47x at h = 32), and no 4x-sized upsampled input. The parameters are the plain 3x3
    convolution's, so a checkpoint's weights mean the same either way; `plain_forward` is the reference."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self._inference_kernels: tuple | None = None  # (what they were derived for, kernels, bias)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))

    def phase_kernels(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (4 * out, in, 2, 2) kernels and the bias of the four phases, (row phase, column phase, out) order."""
        taps = _PHASE_TAPS.to(self.weight)
        kernels = torch.einsum("ajy,bkx,oiyx->aboijk", taps, taps, self.weight).flatten(0, 2)
        return kernels, None if self.bias is None else self.bias.repeat(4)

    def train(self, mode: bool = True) -> UpsampledConv:
        self._inference_kernels = None  # a fused optimizer updates weights without bumping their version
        return super().train(mode)

    def _kernels_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training derives the kernels at every call (gradients flow to the 3x3 weight); inference (eval mode,
        no grad) derives them once per weight version, input layout and precision, in that layout and precision,
        and forgets them when the module is switched to training or eval."""
        if self.training or torch.is_grad_enabled():
            return self.phase_kernels()
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        bias_version = None if self.bias is None else self.bias._version
        key = (self.weight._version, bias_version, self.weight.data_ptr(), layout, dtype)
        if self._inference_kernels is None or self._inference_kernels[0] != key:
            kernels, bias = self.phase_kernels()
            self._inference_kernels = (key, kernels.to(dtype, memory_format=layout), bias)
        return self._inference_kernels[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels, bias = self._kernels_for(x)
        y = F.conv2d(x, kernels, bias, padding=1)  # (B, 4 * out, h + 1, w + 1): phase (a, b) at offset (a, b)
        b, _, h, w = x.shape
        channels = self.out_channels
        phases = y.view(b, 2, 2, channels, h + 1, w + 1)
        # keep the layout the input came in; each layout gets its own copy loop, since writing channels-last output
        # through one channels-first-shaped view was markedly slower
        if x.is_contiguous(memory_format=torch.channels_last):
            out = y.new_empty(b, h, 2, w, 2, channels)
            for a in (0, 1):
                for c in (0, 1):
                    out[:, :, a, :, c] = phases[:, a, c, :, a : a + h, c : c + w].permute(0, 2, 3, 1)
            return out.view(b, 2 * h, 2 * w, channels).permute(0, 3, 1, 2)
        out = y.new_empty(b, channels, h, 2, w, 2)
        for a in (0, 1):
            for c in (0, 1):
                out[:, :, :, a, :, c] = phases[:, a, c, :, a : a + h, c : c + w]
        return out.view(b, channels, 2 * h, 2 * w)


def conv_up_layers(config: TokenizerConfig) -> list[nn.Module]:
    """The mirror of `conv_down_layers` with nearest upsampling, ending in a convolution to the image's channels:
    (B, widths[-1], h, w) -> (B, C, H, W)."""
    widths = config.widths[::-1]
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
        # the Identity holds the place of the nn.Upsample that UpsampledConv took in, so that checkpoints' keys
        # (net.<index>.weight) stay as they were
        layers += [nn.Identity(), UpsampledConv(w_in, w_out), ResBlock(w_out)]
    layers += [*norm_silu(widths[-1]), nn.Conv2d(widths[-1], config.channels, 3, padding=1)]
    return layers


class ConvEncoder(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B, d, h, w) latents, with strided convolutions and residual blocks."""

    def __init__(self, config: TokenizerConfig, latent_dim: int):
        super().__init__()
        width = config.widths[-1]
        layers = conv_down_layers(config)
        layers += [*norm_silu(width), nn.Conv2d(width, latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, d, h, w) codes -> (B, C, H, W) images, mirroring ConvEncoder with nearest upsampling."""

    def __init__(self, config: TokenizerConfig, latent_dim: int):
        super().__init__()
        width = config.widths[-1]
        stem = [nn.Conv2d(latent_dim, width, 3, padding=1), ResBlock(width)]
        self.net = nn.Sequential(*stem, *conv_up_layers(config))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net(codes)


def sincos_positions(height: int, width: int, dim: int) -> torch.Tensor:
    """(height * width, dim) fixed 2-D position embeddings, row-major: sines and cosines of the row, then of the
    column, each over dim / 4 geometrically spaced frequencies."""
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    rows = rows.flatten()[:, None].float() * frequencies  # (K, D/4)
    cols = cols.flatten()[:, None].float() * frequencies
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)


class AttentionBlock(nn.Module):
    """Pre-norm transformer block on (B, K, D) tokens: full self-attention, then an MLP, each added to its input."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.attention_norm(x))  # (B, K, 3 * D)
        query, key, value = rearrange(qkv, "b k (three heads e) -> three b heads k e", three=3, heads=self.heads)
        mixed = F.scaled_dot_product_attention(query, key, value)
        x = x + self.out(rearrange(mixed, "b heads k e -> b k (heads e)"))
        return x + self.mlp(x)


class GridTransformer(nn.Module):
    """(B, D_in, h, w) map -> (B, D_out, h, w): every cell a token, a linear map in, 2-D sine-cosine positions,
    pre-norm attention blocks over all cells, a final norm and a linear map out. The shared part of `vit` and
    `hybrid`, in their encoders and decoders."""

    def __init__(self, config: TokenizerConfig, in_dim: int, out_dim: int):
        super().__init__()
        width = config.attention_width
        self.embed = nn.Linear(in_dim, width)
        self.register_buffer("positions", sincos_positions(*config.grid_shape, width), persistent=False)
        blocks = (AttentionBlock(width, config.attention_heads) for _ in range(config.attention_layers))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(rearrange(x, "b d h w -> b (h w) d")) + self.positions  # (B, K, D)
        out = self.head(self.norm(self.blocks(tokens)))
        return rearrange(out, "b (h w) d -> b d h w", h=x.shape[-2])


def conv_stem(config: TokenizerConfig) -> nn.Sequential:
    """(B, C, H, W) -> (B, widths[-1], h, w): one 3x3 stride-2 convolution per halving (widths[1:]), each followed
    by GroupNorm and SiLU, then a 1x1 convolution: the ViT's convolutional stem (`vit_stem="conv"`)."""
    layers: list[nn.Module] = []
    width = config.channels
    for out in config.widths[1:]:
        layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), *norm_silu(out)]
        width = out
    return nn.Sequential(*layers, nn.Conv2d(width, width, 1))


class ViTEncoder(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B, d, h, w) latents: each patch_size x patch_size patch flattened and projected
    linearly to one token (no other convolution), or a small convolutional stem (`vit_stem`), then transformer
    blocks over the patches."""

    def __init__(self, config: TokenizerConfig, latent_dim: int):
        super().__init__()
        self.patch = config.patch_size
        self.stem = conv_stem(config) if config.vit_stem == "conv" else None
        stem_width = config.widths[-1] if len(config.widths) > 1 else config.channels
        in_dim = stem_width if self.stem is not None else config.channels * self.patch**2
        self.transformer = GridTransformer(config, in_dim, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            return self.transformer(self.stem(x))
        return self.transformer(F.pixel_unshuffle(x, self.patch))  # (B, C * P * P, h, w) patches in


class ViTDecoder(nn.Module):
    """(B, d, h, w) codes -> (B, C, H, W) images: transformer blocks over the code tokens, then a linear map of
    each token to the pixels of its patch."""

    def __init__(self, config: TokenizerConfig, latent_dim: int):
        super().__init__()
        self.patch = config.patch_size
        self.transformer = GridTransformer(config, latent_dim, config.channels * self.patch**2)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.transformer(codes), self.patch)


class HybridEncoder(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B, d, h, w) latents: ConvEncoder's strided residual stages down to the grid,
    then transformer blocks over its cells."""

    def __init__(self, config: TokenizerConfig, latent_dim: int):
        super().__init__()
        self.stem = nn.Sequential(*conv_down_layers(config))
        self.transformer = GridTransformer(config, config.widths[-1], latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.stem(x))


class HybridDecoder(nn.Module):
    """(B, d, h, w) codes -> (B, C, H, W) images: transformer blocks over the code tokens, then ConvDecoder's
    upsampling stages."""

    def __init__(self, config: TokenizerConfig, latent_dim: int):
        super().__init__()
        self.transformer = GridTransformer(config, latent_dim, config.widths[-1])
        self.upsample = nn.Sequential(*conv_up_layers(config))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.transformer(codes))


BACKBONES = {
    "conv": (ConvEncoder, ConvDecoder),
    "vit": (ViTEncoder, ViTDecoder),
    "hybrid": (HybridEncoder, HybridDecoder),
}


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) images in [0, 1] -> (B, 1, h', w') logits, one per overlapping patch, of the patch being from a
    real frame rather than a reconstruction (PatchGAN): stride-2 convolutions, then a 3x3 convolution to one
    channel. GroupNorm, not BatchNorm, so that real and fake images in one batch do not share statistics."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        widths = config.discriminator_widths
        layers: list[nn.Module] = [nn.Conv2d(config.channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(w_in, w_out, 4, stride=2, padding=1), nn.GroupNorm(8, w_out), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


def box_mean(x: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean of each (B, C, H, W) pixel's window x window neighbourhood, counting only pixels inside the image: the
    same as `F.avg_pool2d(x, window, 1, window // 2, count_include_pad=False)` (`box_mean_reference`), computed
    as differences of cumulative sums along each axis, which on a CPU is several times faster forward and backward
    (at 64x64: 10 against 26 ms for the five maps of one SSIM at batch 8, forward and backward)."""
    pad = window // 2
    for dim in (3, 2):
        size = x.shape[dim]
        sums = F.pad(torch.cumsum(x, dim), (1, 0) if dim == 3 else (0, 0, 1, 0))  # a leading 0 along `dim`
        index = torch.arange(size, device=x.device)
        high, low = (index + pad + 1).clamp(max=size), (index - pad).clamp(min=0)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        x = (sums.index_select(dim, high) - sums.index_select(dim, low)) / (high - low).to(x.dtype).view(shape)
    return x


def box_mean_reference(x: torch.Tensor, window: int = 7) -> torch.Tensor:
    """The plain definition of `box_mean`."""
    return F.avg_pool2d(x, window, 1, window // 2, count_include_pad=False)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean structural similarity of (B, C, H, W) images in [0, 1] over a uniform window."""
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = box_mean(x, window), box_mean(y, window)
    var_x = box_mean(x * x, window) - mu_x**2
    var_y = box_mean(y * y, window) - mu_y**2
    cov = box_mean(x * y, window) - mu_x * mu_y
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
        self.discriminator = PatchDiscriminator(config) if config.adversarial_weight > 0 else None
        if self.discriminator is not None:
            # training forwards so far, saved with the weights so that a resumed run keeps its schedule
            self.register_buffer("adversarial_step", torch.zeros((), dtype=torch.long))

    def _tensor(self, array: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A numpy array as a tensor on this model's device (copied: a dataset's read-only memory map or a reversed
        view cannot be shared); a tensor as it is."""
        if isinstance(array, np.ndarray):
            return torch.from_numpy(np.array(array)).to(next(self.parameters()).device)
        return array

    def _check_frames(self, frames: torch.Tensor) -> None:
        c = self.config
        expected = (*c.image_shape, c.channels)
        if frames.ndim != 4 or tuple(frames.shape[1:]) != expected or frames.dtype != torch.uint8:
            raise ValueError(
                f"tokenizer expects (B, {expected[0]}, {expected[1]}, {c.channels}) uint8 frames,"
                f" got {tuple(frames.shape)} {frames.dtype}"
            )

    def encode(self, frames: torch.Tensor) -> TokenizerEncoderOutput:
        """(B, H, W, C) uint8 frames (a tensor or numpy array) -> latents, codes and (B, h, w) tokens."""
        frames = self._tensor(frames)
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
    def tokens_to_frames(self, tokens: torch.Tensor | np.ndarray, check: bool = True) -> torch.Tensor:
        """(B, h, w) integer tokens in [0, codebook_size) (a tensor or numpy array) -> (B, H, W, C) uint8 frames.
        `check=False` skips the check of the tokens (one device sync), for tokens this project's models made."""
        tokens = self._tensor(tokens)
        if check:
            tokens = self.check_tokens(tokens)
        images = self.decode(tokens).float()
        return rearrange((images * 255).round().to(torch.uint8), "b c h w -> b h w c")

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens` as int64, refusing what `decode` would turn into frames of codes that do not exist: FSQ's indices
        wrap around, so a token past the codebook or a float would decode silently."""
        h, w = self.config.grid_shape
        expected = f"(B, {h}, {w}) integer tokens in [0, {self.config.codebook_size})"
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (h, w):
            raise ValueError(f"expected {expected}, got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"expected {expected}, got {tokens.dtype}")
        tokens = tokens.long()  # torch has no min/max of its unsigned types but uint8
        if tokens.numel() and bool(((tokens < 0) | (tokens >= self.config.codebook_size)).any()):
            low, high = int(tokens.min()), int(tokens.max())
            raise ValueError(f"expected {expected}, got values from {low} to {high}")
        return tokens

    def pixel_weights(self, target: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, H, W) weights of the pixel losses for (B, C, H, W) `target` frames in [0, 1], or None when every
        pixel counts once: `bottom_weight` on the gauge strip, times `rare_weight` where a frame differs from the
        batch's per-pixel median by more than `rare_threshold`."""
        config = self.config
        rows = round(config.bottom_rows * target.shape[-2])
        bottom = bool(rows) and config.bottom_weight != 1.0
        rare = config.rare_weight != 1.0 and len(target) > 1
        if not (bottom or rare):
            return None
        weights = torch.ones_like(target[:, :1])
        if bottom:
            weights[..., -rows:, :] = config.bottom_weight
        if rare:
            median = target.median(dim=0, keepdim=True).values
            differs = (target - median).abs().amax(dim=1, keepdim=True) > config.rare_threshold
            weights = torch.where(differs, weights * config.rare_weight, weights)
        return weights

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.encode(frames)
        target = frames_to_float(frames)
        recon = self.decode_codes(out.z_quantized)
        error = recon - target
        weights = self.pixel_weights(target)

        def weighted_mean(values: torch.Tensor) -> torch.Tensor:
            return values.mean() if weights is None else (values * weights).mean()

        absolute = error.abs()
        loss = torch.zeros((), device=error.device)
        if self.config.l1_weight:
            loss = loss + self.config.l1_weight * weighted_mean(absolute)
        if self.config.mse_weight:
            loss = loss + self.config.mse_weight * weighted_mean(error.square())
        structural = 1 - ssim(recon.clamp(0, 1), target)
        overflow = F.relu(out.z.abs() - 2).pow(2).mean()
        loss = loss + self.config.ssim_weight * structural + self.config.latent_penalty * overflow
        adversarial_logs = {}
        if self.discriminator is not None:
            generator, discriminator, adversarial_logs = self.adversarial_losses(recon, target)
            loss = loss + self.config.adversarial_weight * generator + discriminator
        with torch.no_grad():
            used = torch.unique(out.tokens).numel()
            logs = {
                "loss": loss.item(),
                "l1": absolute.mean().item(),
                "ssim": 1 - structural.item(),
                "psnr": psnr(recon.clamp(0, 1), target).item(),
                "z_absmax": out.z.abs().max().item(),
                "codes_used": float(used),
                **adversarial_logs,
            }
        return loss, logs

    def adversarial_losses(
        self, recon: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(generator term, discriminator hinge loss, logs) for (B, C, H, W) reconstructions and targets.

        Both go into the one loss that the generic trainer minimises with one optimizer over all parameters, and
        each reaches only its own player's parameters, so one backward pass gives each player the gradient of its
        own objective (simultaneous gradient descent):
        - the discriminator's hinge loss, relu(1 - D(real)) + relu(1 + D(fake)), sees the reconstructions detached,
          so it moves the discriminator and not the decoder;
        - the generator term, -D(fake), runs the discriminator with detached copies of its weights
          (`functional_call`), so its gradient flows through the reconstructions into the decoder and encoder and
          not into the discriminator, which would otherwise learn to call fakes real.
        The two players share the trainer's learning rate, schedule, weight decay and gradient clipping (whose
        norm counts both). The generator term is zero for the first `adversarial_start` training forwards, while
        the discriminator already learns, so that every parameter has a gradient at every step (as
        DistributedDataParallel expects unless told to look for unused parameters).
        """
        logits = self.discriminator(torch.cat([target, recon.detach()]))
        real, fake = logits.chunk(2)
        discriminator = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        step = int(self.adversarial_step)
        if self.training and torch.is_grad_enabled():
            self.adversarial_step += 1
        if step >= self.config.adversarial_start:
            frozen = {name: weight.detach() for name, weight in self.discriminator.named_parameters()}
            generator = -functional_call(self.discriminator, frozen, (recon,)).mean()
        else:
            generator = torch.zeros((), device=recon.device)
        logs = {
            "adversarial": -fake.mean().item(),
            "discriminator": discriminator.item(),
            "discriminator_accuracy": ((real > 0).float().mean() + (fake < 0).float().mean()).item() / 2,
        }
        return generator, discriminator, logs

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self(batch["frames"])
