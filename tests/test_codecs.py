import math

import numpy as np
import pytest
import torch

from bench.codecs import (
    CodecPoint,
    bytes_at_psnr,
    bytes_bound,
    compare,
    frame_scores,
    frontier,
    measure_codec,
    psnr_at_bytes,
)
from worldmodel.tokenizer import frames_to_float, image_psnr, ssim

POINTS = [
    CodecPoint(quality=10, bytes_per_frame=100.0, psnr=20.0, ssim=0.5),
    CodecPoint(quality=50, bytes_per_frame=400.0, psnr=30.0, ssim=0.9),
    CodecPoint(quality=30, bytes_per_frame=500.0, psnr=25.0, ssim=0.8),  # beaten by quality 50: more bytes, less PSNR
]


def smooth_frames(count: int, size: int, channels: int) -> np.ndarray:
    """Gradients with a little noise: frames a codec can trade bytes for PSNR on."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    frames = []
    for i in range(count):
        image = np.stack([np.sin(3 * x + i + c) * np.cos(2 * y - c) for c in range(channels)], -1)
        frames.append(127 + 100 * image + rng.normal(0, 6, image.shape))
    return np.clip(frames, 0, 255).astype(np.uint8)


def test_frontier_drops_beaten_points():
    assert [p.quality for p in frontier(POINTS)] == [10, 50]


def test_bytes_at_psnr_interpolates_log_bytes():
    assert bytes_at_psnr(POINTS, 25.0) == pytest.approx(200.0)  # halfway in PSNR: the geometric mean of 100 and 400
    assert bytes_at_psnr(POINTS, 20.0) == pytest.approx(100.0)
    assert bytes_at_psnr(POINTS, 30.0) == pytest.approx(400.0)
    assert psnr_at_bytes(POINTS, 200.0) == pytest.approx(25.0)


def test_out_of_range_is_none_with_a_bound():
    assert bytes_at_psnr(POINTS, 19.0) is None and bytes_bound(POINTS, 19.0) == {"at_most": 100.0}
    assert bytes_at_psnr(POINTS, 31.0) is None and bytes_bound(POINTS, 31.0) == {"more_than": 400.0}
    assert bytes_bound(POINTS, 25.0) is None
    assert psnr_at_bytes(POINTS, 50.0) is None and psnr_at_bytes(POINTS, 800.0) is None
    figures = compare("webp", POINTS, target_psnr=35.0, target_bytes=50.0)
    assert figures["webp_bytes_at_equal_psnr"] is None and figures["webp_ratio"] is None
    assert figures["webp_bytes_at_equal_psnr_bound"] == {"more_than": 400.0}
    assert figures["webp_psnr_range"] == [20.0, 30.0]


def test_compare_ratio_is_codec_bytes_over_ours():
    figures = compare("webp", POINTS, target_psnr=25.0, target_bytes=50.0)
    assert figures["webp_ratio"] == pytest.approx(4.0)
    assert figures["webp_bytes_at_equal_psnr_bound"] is None


def test_frame_scores_average_per_frame_like_the_tokenizer():
    rng = np.random.default_rng(1)
    original = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    decoded = original.copy()
    decoded[1] = np.clip(original[1].astype(int) + 20, 0, 255)
    decoded[2] = 255 - original[2]
    psnr, structural = frame_scores(original, decoded, batch_size=2)  # batches of 2 and 1: weighted by frames
    a, b = frames_to_float(torch.from_numpy(original)), frames_to_float(torch.from_numpy(decoded))
    per_frame = image_psnr(b, a)
    assert psnr == pytest.approx(per_frame.mean().item(), rel=1e-5)
    assert psnr != pytest.approx(-10 * math.log10(((a - b) ** 2).mean().item()), rel=1e-3)  # not pooled MSE
    assert structural == pytest.approx(np.mean([ssim(b[i : i + 1], a[i : i + 1]).item() for i in range(3)]), rel=1e-5)


@pytest.mark.parametrize(("codec", "qualities"), [("webp", (0, 50, 100)), ("jpeg", (5, 50, 95))])
@pytest.mark.parametrize("channels", [3, 1])
def test_measure_codec_trades_bytes_for_psnr(codec, qualities, channels):
    frames = smooth_frames(4, 32, channels)
    points = measure_codec(frames, codec, qualities)
    assert [p.quality for p in points] == list(qualities)
    assert points[0].bytes_per_frame < points[-1].bytes_per_frame
    assert points[0].psnr < points[-1].psnr
    assert points[-1].psnr > 30 and 0 < points[-1].ssim <= 1
    target = (points[0].psnr + points[-1].psnr) / 2
    assert points[0].bytes_per_frame < bytes_at_psnr(points, target) < points[-1].bytes_per_frame


def test_measure_codec_refuses_bad_frames():
    with pytest.raises(ValueError, match="uint8"):
        measure_codec(np.zeros((2, 8, 8, 3), np.float32), "webp", (50,))
