import json
import math

import numpy as np
import pytest
import torch

from bench.codecs import CodecPoint
from bench.tokenizer import latent_spread, load_frames, resize_frames, tokenizer_checkpoint, tokenizer_figures
from pipeline.cli import main
from worldmodel.checkpoint import save_checkpoint
from worldmodel.tokenizer import Tokenizer, TokenizerConfig
from worldmodel.train import evaluate_reconstruction, load_tokenizer

CONFIG = TokenizerConfig(image_size=16, widths=(8, 16, 16), levels=(4, 3))
QUALITY_FLAGS = ["--webp-qualities", "0,50,100", "--jpeg-qualities", "10,90", "--device", "cpu"]
FINITE_KEYS = (
    "bytes_per_frame",
    "entropy_coded_bytes_per_frame",
    "lzma_bytes_per_frame",
    "packed_bytes_per_frame",
    "psnr",
    "ssim",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder holding an untrained tokenizer checkpoint, and a dynamics-kind checkpoint beside it."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    tokenizer = Tokenizer(CONFIG)
    save_checkpoint(run / "tokenizer", tokenizer, "tokenizer", {"step": 0})
    save_checkpoint(run / "dynamics", tokenizer, "dynamics", {"step": 0})
    return run


def write_frames(path, frames):
    np.save(path, frames)
    return str(path)


def test_eval_tokenizer_writes_every_figure(run_dir, tmp_path, capsys):
    frames = np.random.default_rng(0).integers(0, 256, size=(6, 24, 24, 3), dtype=np.uint8)
    out = tmp_path / "eval.json"
    args = ["--frames", write_frames(tmp_path / "f.npy", frames), "--json", str(out), *QUALITY_FLAGS]
    main(["eval", "tokenizer", "--checkpoint", str(run_dir / "tokenizer"), *args])
    figures = json.loads(out.read_text())
    assert "wrote" in capsys.readouterr().out
    for key in FINITE_KEYS:
        assert math.isfinite(figures[key]), key
    assert figures["frames"] == 6 and figures["resized"] is True and figures["input_frame_shape"] == [24, 24, 3]
    assert figures["bytes_per_frame"] == pytest.approx(CONFIG.bytes_per_frame)
    assert figures["codes_used"] <= CONFIG.codebook_size
    for codec in ("webp", "jpeg"):
        points = figures[f"{codec}_points"]
        assert len(points) == (3 if codec == "webp" else 2)
        assert all(math.isfinite(p["psnr"]) and p["bytes_per_frame"] > 0 for p in points)
        for key in ("bytes_at_equal_psnr", "bytes_at_equal_psnr_bound", "ratio", "psnr_at_equal_bytes"):
            assert f"{codec}_{key}" in figures
        # interpolated inside the measured PSNR range, else None with the bound that is known
        low, high = figures[f"{codec}_psnr_range"]
        at_psnr = figures[f"{codec}_bytes_at_equal_psnr"]
        if low <= figures["psnr"] <= high:
            assert math.isfinite(at_psnr) and at_psnr > 0
            assert figures[f"{codec}_ratio"] == pytest.approx(at_psnr / figures["bytes_per_frame"])
        else:
            assert at_psnr is None and figures[f"{codec}_bytes_at_equal_psnr_bound"]
    # the run folder and the .safetensors path name the same checkpoint
    again = tmp_path / "again.json"
    args = ["--frames", str(tmp_path / "f.npy"), "--json", str(again), *QUALITY_FLAGS]
    main(["eval", "tokenizer", "--checkpoint", str(run_dir), *args])
    assert json.loads(again.read_text())["psnr"] == figures["psnr"]


def test_codec_figures_are_finite_when_the_psnr_is_in_range(run_dir):
    """An untrained tokenizer is worse than WebP at quality 0, so the command above may get None: here codec
    points that bracket its PSNR stand in for a codec, and every figure must come out finite."""
    tokenizer, _ = load_tokenizer(run_dir / "tokenizer")
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    psnr = evaluate_reconstruction(tokenizer, frames, torch.device("cpu"))["psnr"]
    points = [CodecPoint(0, 100.0, psnr - 1, 0.2), CodecPoint(50, 400.0, psnr + 1, 0.6)]
    figures = tokenizer_figures(tokenizer, frames, torch.device("cpu"), {"webp": points})
    assert figures["psnr"] == pytest.approx(psnr)
    assert figures["webp_bytes_at_equal_psnr"] == pytest.approx(200.0, rel=1e-4)
    assert figures["webp_ratio"] == pytest.approx(200.0 / CONFIG.bytes_per_frame, rel=1e-4)
    assert figures["webp_psnr_at_equal_bytes"] is None  # our 7.2 bytes per frame lie below the points
    if figures["entropy_coded_bytes_per_frame"] > 0:
        assert figures["webp_ratio_entropy_coded"] == pytest.approx(200.0 / figures["entropy_coded_bytes_per_frame"])
    for key in FINITE_KEYS:
        assert math.isfinite(figures[key]), key


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((2, 16, 16, 3), np.float32), "float32 values; expected an (N, H, W, 3) uint8 .npy array"),
        (np.zeros((2, 16, 16), np.uint8), "shape (2, 16, 16); expected an (N, H, W, 3) uint8"),
        (np.zeros((2, 16, 16, 4), np.uint8), "shape (2, 16, 16, 4); expected an (N, H, W, 3) uint8"),
        (np.zeros((0, 16, 16, 3), np.uint8), "holds no frames"),
        (None, "not found; expected an (N, H, W, 3) uint8 .npy array"),
    ],
)
def test_eval_tokenizer_refuses_bad_frames(frames, message, run_dir, tmp_path, capsys):
    path = tmp_path / "frames.npy"
    if frames is not None:
        np.save(path, frames)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "tokenizer", "--checkpoint", str(run_dir), "--frames", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_eval_tokenizer_refuses_other_files(run_dir, tmp_path, capsys):
    frames = write_frames(tmp_path / "f.npy", np.zeros((2, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "frames.npz", frames=np.zeros((2, 16, 16, 3), np.uint8))
    (tmp_path / "text.npy").write_text("not an array")
    cases = [
        (
            ["--checkpoint", str(run_dir / "dynamics"), "--frames", frames],
            "'dynamics' checkpoint, expected 'tokenizer'",
        ),
        (
            ["--checkpoint", str(tmp_path / "nowhere"), "--frames", frames],
            "nowhere does not exist; expected a run folder",
        ),
        (["--checkpoint", str(run_dir), "--frames", str(tmp_path / "frames.npz")], ".npz archive"),
        (["--checkpoint", str(run_dir), "--frames", str(tmp_path / "text.npy")], "text.npy is not a .npy file (numpy"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "tokenizer", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_checkpoint_paths(run_dir):
    assert tokenizer_checkpoint(run_dir) == run_dir / "tokenizer"
    assert tokenizer_checkpoint(run_dir / "tokenizer.safetensors") == run_dir / "tokenizer"
    assert tokenizer_checkpoint(run_dir / "tokenizer") == run_dir / "tokenizer"


def test_resize_averages_when_shrinking():
    # a 1-pixel checkerboard shrunk 2x is flat grey with an antialiasing filter (nearest would keep black or white)
    board = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    frames = np.repeat(board[None, :, :, None], 3, axis=-1)
    small = resize_frames(frames, 16)
    assert small.shape == (1, 16, 16, 3) and np.abs(small[:, 1:-1, 1:-1].astype(int) - 128).max() <= 1
    assert resize_frames(small, 16) is small
    gray = resize_frames(frames[..., :1], 8)
    assert gray.shape == (1, 8, 8, 1) and np.abs(gray[:, 1:-1, 1:-1].astype(int) - 128).max() <= 1


def test_load_frames_takes_evenly_spaced_frames(tmp_path):
    frames = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    loaded = load_frames(write_frames(tmp_path / "f.npy", frames), 3, max_frames=4)
    assert loaded[:, 0, 0, 0].tolist() == [0, 3, 6, 9]


def test_latent_spread_shows_a_channel_that_uses_few_levels(run_dir):
    """Levels 4 and 3: a channel spread from -3 to 3 reaches all 4 levels, one held at 0 only its middle level
    (FSQ rounds it to one value); the percentiles are the latent's own, before the tanh bound."""
    tokenizer, _ = load_tokenizer(run_dir / "tokenizer")
    spread = np.linspace(-3, 3, 1000, dtype=np.float32)
    latents = np.stack([spread, np.zeros_like(spread)]).reshape(2, 10, 10, 10).transpose(1, 0, 2, 3)  # (N, d, h, w)
    figures = latent_spread(tokenizer, latents)
    assert figures["levels_used"] == [4, 1]
    assert figures["latent_p01"][0] == pytest.approx(np.percentile(spread, 1), abs=1e-3)
    assert figures["latent_p99"][0] == pytest.approx(np.percentile(spread, 99), abs=1e-3)
    assert figures["latent_p01"][1] == figures["latent_p99"][1] == 0.0
    # and on real frames, every channel's figures come with the others
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    figures = tokenizer_figures(tokenizer, frames, torch.device("cpu"), {})
    assert len(figures["levels_used"]) == len(figures["latent_p99"]) == 2
    assert all(1 <= used <= levels for used, levels in zip(figures["levels_used"], CONFIG.levels, strict=True))
