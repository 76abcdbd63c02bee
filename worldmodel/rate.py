"""The tokenizer's rate: how many bytes a frame's tokens take, raw and entropy-coded.

- `raw_bytes_per_frame`: tokens per frame x log2(codebook size) / 8, as `TokenizerConfig.bytes_per_frame`: the
  fixed-length rate, with fractional bits per token (a 240-way token counts 7.91 bits).
- `packed_bytes_per_frame`: the tokens packed at ceil(log2(codebook size)) bits each, the bytes a plain file of
  them takes.
- `lzma_bytes_per_frame`: the packed stream compressed by LZMA (raw LZMA2 stream, no container header), divided
  by the number of frames. It codes the whole stream at once, so it uses the redundancy between frames (if they
  are consecutive, like a video codec) as well as within them, and depends on the frames' order.
- `entropy_bytes_per_frame`: the empirical (zeroth-order) entropy of the tokens times the tokens per frame: what
  an ideal memoryless entropy coder whose token probabilities both ends know spends per frame, coding each frame
  on its own (as WebP and JPEG code images). The probabilities are measured on the same tokens, so it is
  slightly optimistic: the cost of sending the table (at most codebook size x bits per token, once) is left out.
"""

from __future__ import annotations

import lzma
import math
from dataclasses import dataclass

import numpy as np

LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def bits_per_token(codebook_size: int) -> int:
    """Whole bits that hold one token of a `codebook_size`-way codebook (at least 1)."""
    if codebook_size < 1:
        raise ValueError(f"codebook size must be positive, got {codebook_size}")
    return max(1, math.ceil(math.log2(codebook_size)))


def _flat_tokens(tokens: np.ndarray, codebook_size: int) -> np.ndarray:
    flat = np.asarray(tokens).reshape(-1)
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got {flat.dtype}")
    if flat.size and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"tokens must lie in [0, {codebook_size}), got [{flat.min()}, {flat.max()}]")
    return flat.astype(np.uint64)


def pack_tokens(tokens: np.ndarray, codebook_size: int) -> bytes:
    """The tokens in C order, each as `bits_per_token(codebook_size)` bits, most significant first; the last byte
    is padded with zeros."""
    bits = bits_per_token(codebook_size)
    flat = _flat_tokens(tokens, codebook_size)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    bit_matrix = ((flat[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)  # (n, bits)
    return np.packbits(bit_matrix.reshape(-1)).tobytes()


def unpack_tokens(data: bytes, count: int, codebook_size: int) -> np.ndarray:
    """The inverse of `pack_tokens`: the first `count` tokens of `data` as a flat int64 array."""
    bits = bits_per_token(codebook_size)
    if count * bits > 8 * len(data):
        raise ValueError(f"{len(data)} bytes hold fewer than {count} tokens of {bits} bits")
    bit_matrix = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits).reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return bit_matrix.astype(np.int64) @ weights


def lzma_compress(data: bytes) -> bytes:
    """A raw LZMA2 stream (no .xz header or index): `lzma.decompress(out, lzma.FORMAT_RAW, filters=LZMA_FILTERS)`."""
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


def entropy_bits(tokens: np.ndarray, codebook_size: int) -> float:
    """Empirical zeroth-order entropy of the tokens, in bits per token."""
    flat = _flat_tokens(tokens, codebook_size)
    if not flat.size:
        raise ValueError("no tokens to measure")
    counts = np.bincount(flat.astype(np.int64), minlength=codebook_size)
    p = counts[counts > 0] / flat.size
    return float(-(p * np.log2(p)).sum())


@dataclass
class TokenRate:
    """Rate figures of a stream of token grids (see the module docstring)."""

    frames: int
    tokens_per_frame: int
    codebook_size: int
    bits_per_token: int
    codes_used: int
    raw_bytes_per_frame: float
    packed_bytes_per_frame: float
    lzma_bytes_per_frame: float
    entropy_bits_per_token: float
    entropy_bytes_per_frame: float


def token_rate(tokens: np.ndarray, codebook_size: int) -> TokenRate:
    """Rate figures of (N, ...) token grids: N frames of prod(...) tokens each."""
    tokens = np.asarray(tokens)
    if tokens.ndim < 2 or not tokens.size:
        raise ValueError(f"expected (N, ...) token grids of at least one frame, got shape {tokens.shape}")
    frames, tokens_per_frame = len(tokens), tokens[0].size
    packed = pack_tokens(tokens, codebook_size)
    entropy = entropy_bits(tokens, codebook_size)
    return TokenRate(
        frames=frames,
        tokens_per_frame=tokens_per_frame,
        codebook_size=codebook_size,
        bits_per_token=bits_per_token(codebook_size),
        codes_used=int(np.unique(tokens).size),
        raw_bytes_per_frame=tokens_per_frame * math.log2(codebook_size) / 8,
        packed_bytes_per_frame=len(packed) / frames,
        lzma_bytes_per_frame=len(lzma_compress(packed)) / frames,
        entropy_bits_per_token=entropy,
        entropy_bytes_per_frame=entropy * tokens_per_frame / 8,
    )
