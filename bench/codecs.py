"""Reference image codecs on the frames the tokenizer sees: WebP and JPEG through Pillow.

Each frame is encoded on its own, as a complete file (WebP: RIFF container, `method=6`, the slowest and
smallest; JPEG: baseline with optimized Huffman tables and Pillow's default 4:2:0 chroma subsampling; on
64x64 frames JPEG's own tables are most of the file). Bytes per frame are the files' mean size; PSNR and SSIM
are computed with the tokenizer's own functions (`worldmodel.tokenizer.psnr` and `ssim`), per frame then
averaged over the frames, exactly as `evaluate_reconstruction` scores the tokenizer.

`bytes_at_psnr` and `psnr_at_bytes` read a codec's rate-distortion curve at a given PSNR or byte budget: over
the points that no other point beats (fewer or equal bytes and at least the PSNR), log(bytes) is interpolated
linearly in PSNR between the two measured points that bracket the target. Outside the measured range they
return None, never an extrapolation: `bytes_bound` then says what is known (the codec needs at most the
fewest bytes measured, or more than the most).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, features

from worldmodel.tokenizer import frames_to_float, psnr, ssim

PILLOW_FORMATS = {"webp": "WEBP", "jpeg": "JPEG"}
QUALITIES = {
    "webp": (0, 5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95, 100),
    "jpeg": (1, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
}


class CodecUnavailable(RuntimeError):
    """Pillow was built without the codec."""


@dataclass
class CodecPoint:
    quality: int
    bytes_per_frame: float
    psnr: float
    ssim: float


def _options(codec: str, quality: int) -> dict:
    if codec == "webp":
        return {"quality": quality, "method": 6}
    if codec == "jpeg":
        return {"quality": quality, "optimize": True}
    raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(PILLOW_FORMATS)}")


def check_codec(codec: str) -> None:
    """Raise CodecUnavailable if this Pillow cannot write `codec`."""
    name = {"webp": "webp", "jpeg": "jpg"}.get(codec)
    if name is None:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(PILLOW_FORMATS)}")
    if not features.check(name):
        raise CodecUnavailable(f"this Pillow ({Image.__version__}) was built without {codec}")


def encode_frame(frame: np.ndarray, codec: str, quality: int) -> bytes:
    """One (H, W, C) uint8 frame (C = 1 or 3) as a complete `codec` file."""
    image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    buffer = io.BytesIO()
    image.save(buffer, format=PILLOW_FORMATS[codec], **_options(codec, quality))
    return buffer.getvalue()


def decode_frame(data: bytes, channels: int) -> np.ndarray:
    """A file written by `encode_frame` back to an (H, W, channels) uint8 frame."""
    image = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
    array = np.asarray(image)
    return array[..., None] if channels == 1 else array


def frame_scores(original: np.ndarray, decoded: np.ndarray, batch_size: int = 256) -> tuple[float, float]:
    """Mean per-frame PSNR and SSIM of (N, H, W, C) uint8 frames, as `evaluate_reconstruction` computes them."""
    psnr_sum = ssim_sum = 0.0
    for start in range(0, len(original), batch_size):
        target = frames_to_float(torch.from_numpy(np.ascontiguousarray(original[start : start + batch_size])))
        approx = frames_to_float(torch.from_numpy(np.ascontiguousarray(decoded[start : start + batch_size])))
        psnr_sum += psnr(approx, target).item() * len(target)
        ssim_sum += ssim(approx, target).item() * len(target)
    return psnr_sum / len(original), ssim_sum / len(original)


def measure_codec(
    frames: np.ndarray,
    codec: str,
    qualities: tuple[int, ...] | None = None,
    on_quality: Callable[[CodecPoint], None] | None = None,
) -> list[CodecPoint]:
    """Bytes per frame, PSNR and SSIM of `codec` on (N, H, W, C) uint8 frames at each quality."""
    check_codec(codec)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[-1] not in (1, 3) or not len(frames):
        raise ValueError(f"expected (N, H, W, 1 or 3) uint8 frames, N > 0, got {frames.shape} {frames.dtype}")
    points = []
    for quality in qualities or QUALITIES[codec]:
        sizes, decoded = [], np.empty_like(frames)
        for i, frame in enumerate(frames):
            data = encode_frame(frame, codec, quality)
            sizes.append(len(data))
            decoded[i] = decode_frame(data, frames.shape[-1])
        point = CodecPoint(quality, float(np.mean(sizes)), *frame_scores(frames, decoded))
        points.append(point)
        if on_quality is not None:
            on_quality(point)
    return points


def frontier(points: list[CodecPoint]) -> list[CodecPoint]:
    """The points no other point beats, by increasing bytes (and so increasing PSNR)."""
    best: list[CodecPoint] = []
    for point in sorted(points, key=lambda p: (p.bytes_per_frame, -p.psnr)):
        if not best or point.psnr > best[-1].psnr:
            best.append(point)
    return best


def _interpolate(xs: list[float], ys: list[float], target: float) -> float | None:
    """Piecewise-linear y at `target` over increasing xs; None outside [xs[0], xs[-1]]."""
    if not xs or not xs[0] <= target <= xs[-1]:
        return None
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x0 <= target <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (target - x0) / (x1 - x0)
    return ys[0]  # a single point, equal to the target


def bytes_at_psnr(points: list[CodecPoint], target_psnr: float) -> float | None:
    """Bytes per frame the codec needs for `target_psnr` dB (log-bytes interpolation on the frontier); None when
    the target lies outside the measured PSNR range (see `bytes_bound`)."""
    best = frontier(points)
    log_bytes = _interpolate([p.psnr for p in best], [math.log(p.bytes_per_frame) for p in best], target_psnr)
    return None if log_bytes is None else math.exp(log_bytes)


def psnr_at_bytes(points: list[CodecPoint], target_bytes: float) -> float | None:
    """The codec's PSNR at `target_bytes` per frame (linear in log bytes on the frontier); None outside the
    measured byte range."""
    best = frontier(points)
    if target_bytes <= 0:
        return None
    return _interpolate([math.log(p.bytes_per_frame) for p in best], [p.psnr for p in best], math.log(target_bytes))


def ssim_at_bytes(points: list[CodecPoint], target_bytes: float) -> float | None:
    """The codec's SSIM at `target_bytes` per frame, read like `psnr_at_bytes` on the PSNR frontier."""
    best = frontier(points)
    if target_bytes <= 0:
        return None
    return _interpolate([math.log(p.bytes_per_frame) for p in best], [p.ssim for p in best], math.log(target_bytes))


def bytes_bound(points: list[CodecPoint], target_psnr: float) -> dict[str, float] | None:
    """What is known when `bytes_at_psnr` is None: `{"at_most": b}` when even the fewest bytes measured beat the
    target, `{"more_than": b}` when no quality measured reaches it; None when the target is in range."""
    best = frontier(points)
    if not best:
        return None
    if target_psnr < best[0].psnr:
        return {"at_most": best[0].bytes_per_frame}
    if target_psnr > best[-1].psnr:
        return {"more_than": best[-1].bytes_per_frame}
    return None


def compare(codec: str, points: list[CodecPoint], target_psnr: float, target_bytes: float) -> dict[str, object]:
    """One codec beside a tokenizer of `target_psnr` dB at `target_bytes` per frame, as `<codec>_...` figures."""
    at_psnr = bytes_at_psnr(points, target_psnr)
    return {
        f"{codec}_bytes_at_equal_psnr": at_psnr,
        f"{codec}_bytes_at_equal_psnr_bound": bytes_bound(points, target_psnr),
        f"{codec}_psnr_at_equal_bytes": psnr_at_bytes(points, target_bytes),
        f"{codec}_ssim_at_equal_bytes": ssim_at_bytes(points, target_bytes),
        f"{codec}_ratio": None if at_psnr is None else at_psnr / target_bytes,
        f"{codec}_psnr_range": [min(p.psnr for p in points), max(p.psnr for p in points)],
        f"{codec}_bytes_range": [min(p.bytes_per_frame for p in points), max(p.bytes_per_frame for p in points)],
    }
