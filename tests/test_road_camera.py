"""Frames that are not square (road-camera shapes, 2:1) go through the tokenizer's stages and its measurements; the
stages after it, which take square token grids, refuse them with an error that says so before any work."""

import json

import numpy as np
import pytest
from conftest import BOX_SPACE, TINY_DYNAMICS, moving_frames

from agents.config import load_pipeline_config
from bench.tokenizer import resize_frames
from pipeline.cli import main
from pipeline.run import run_pipeline
from worldmodel.config import ConfigError
from worldmodel.dataset import Dataset, DatasetError, Episode, EpisodeRecord, write_episode
from worldmodel.logger import RunLogger
from worldmodel.tokenizer import TokenizerConfig
from worldmodel.train import DynamicsStage, TokenizerStage, load_tokenizer, train_dynamics, train_tokenizer
from worldmodel.trainer import TrainConfig

TRAIN = TrainConfig(steps=2, batch_size=4, warmup_steps=1, log_every=1, eval_every=100, checkpoint_every=100)


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A dataset of 16x32 frames (two drifting squares side by side) and a run whose tokenizer trained on it."""
    base = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    data_dir, run_dir = base / "dataset", base / "run"
    dataset = Dataset.create(data_dir, "synthetic", (16, 32, 3), BOX_SPACE)
    for i in range(4):
        frames = np.concatenate([moving_frames(8, 16, 3, rng), moving_frames(8, 16, 3, rng)], axis=2)
        truncated = np.arange(8) == 7
        actions = rng.uniform(0, 1, (8, 3)).astype(np.float32)
        episode = Episode(frames, actions, np.zeros(8, np.float32), np.zeros(8, bool), truncated)
        write_episode(data_dir, f"{i:06d}", episode)
        dataset.add(EpisodeRecord(f"{i:06d}", 8, seed=i, ret=0.0, kind="synthetic"))
    tokenizer = TokenizerConfig(widths=(8, 16, 16), levels=(4, 3))  # image size: the dataset's
    logger = RunLogger(run_dir)
    train_tokenizer(data_dir, run_dir, TokenizerStage(tokenizer, TRAIN, val_frames=8), logger, 0.25)
    logger.close()
    return data_dir, run_dir


def test_the_tokenizer_trains_on_non_square_frames(wide_run):
    _, run_dir = wide_run
    tokenizer, meta = load_tokenizer(run_dir / "tokenizer", "cpu")
    assert tokenizer.config.image_shape == (16, 32) and tokenizer.config.grid_shape == (4, 8)
    assert meta["step"] == 2


def test_the_dynamics_stage_refuses_a_non_square_grid_before_any_work(wide_run):
    data_dir, run_dir = wide_run
    stage = DynamicsStage(TINY_DYNAMICS, TRAIN, val_batches=1)
    with pytest.raises(DatasetError, match=r"square token grid.*4x8 tokens of 16x32 frames"):
        train_dynamics(data_dir, run_dir, stage, RunLogger(run_dir), 0.25)
    assert not (run_dir / "tokens.npz").exists() and not (run_dir / "dynamics.safetensors").exists()


def test_a_pipeline_run_refuses_non_square_frames_before_collecting(tmp_path):
    config = load_pipeline_config(
        "tiny", [f"run.runs_dir={tmp_path}", "collect.source.frame_size=128", "collect.source.frame_width=256"]
    )
    with pytest.raises(ConfigError, match="square frames, not 128x256"):
        run_pipeline(config)
    assert not any(tmp_path.iterdir())


def test_eval_tokenizer_fits_other_frames_to_its_shape(wide_run, tmp_path):
    _, run_dir = wide_run
    frames = np.random.default_rng(1).integers(0, 256, size=(5, 40, 48, 3), dtype=np.uint8)  # 6:5, not 2:1
    fitted = resize_frames(frames, 16, 32)
    assert fitted.shape == (5, 16, 32, 3)
    np.save(tmp_path / "f.npy", frames)
    out = tmp_path / "eval.json"
    flags = ["--webp-qualities", "0,100", "--jpeg-qualities", "10,90", "--device", "cpu"]
    main(
        [
            "eval",
            "tokenizer",
            "--checkpoint",
            str(run_dir),
            "--frames",
            str(tmp_path / "f.npy"),
            "--json",
            str(out),
            *flags,
        ]
    )
    figures = json.loads(out.read_text())
    assert figures["image_shape"] == [16, 32] and figures["input_frame_shape"] == [40, 48, 3] and figures["resized"]
    assert figures["tokens_per_frame"] == 32 and figures["psnr"] > 0
