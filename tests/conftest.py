"""Shared fixtures: tiny synthetic datasets and tiny trained runs (tokenizer, dynamics, tokens.npz)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers WorldModel/Dream-v0)
from worldmodel.dataset import Dataset, Episode, EpisodeRecord, write_episode
from worldmodel.dynamics import DynamicsConfig
from worldmodel.logger import RunLogger
from worldmodel.tokenizer import TokenizerConfig
from worldmodel.train import DynamicsStage, TokenizerStage, train_dynamics, train_tokenizer
from worldmodel.trainer import TrainConfig

os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
torch.set_num_threads(1)

TINY_TOKENIZER = TokenizerConfig(widths=(8, 16, 16), levels=(4, 3))
TINY_DYNAMICS = DynamicsConfig(context_frames=3, d_model=32, layers=1, heads=2)


def moving_frames(steps: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """(steps + 1, size, size, channels) uint8: a bright square drifting over a noisy dark background."""
    frames = rng.integers(0, 40, size=(steps + 1, size, size, channels), dtype=np.uint8)
    x, y = rng.integers(0, size - 4, size=2)
    color = rng.integers(120, 256, size=channels, dtype=np.uint8)
    for t in range(steps + 1):
        px, py = (x + t) % (size - 4), (y + 2 * t) % (size - 4)
        frames[t, py : py + 4, px : px + 4] = color
    return frames


def make_episode(
    steps: int, size: int, channels: int, space: gym.Space, rng: np.random.Generator, terminal: bool = False
) -> Episode:
    if isinstance(space, gym.spaces.Discrete):
        actions = rng.integers(0, space.n, size=steps).astype(np.int64)
    else:
        actions = rng.uniform(space.low, space.high, size=(steps, *space.shape)).astype(np.float32)
    terminated = np.zeros(steps, dtype=bool)
    terminated[-1] = terminal
    truncated = np.zeros(steps, dtype=bool)
    truncated[-1] = not terminal
    return Episode(
        frames=moving_frames(steps, size, channels, rng),
        actions=actions,
        rewards=rng.normal(size=steps).astype(np.float32),
        terminated=terminated,
        truncated=truncated,
    )


def write_synthetic_dataset(
    root: Path,
    space: gym.Space,
    episodes: int = 4,
    steps: int = 12,
    size: int = 16,
    channels: int = 3,
    seed: int = 0,
    lengths: list[int] | None = None,
) -> Dataset:
    rng = np.random.default_rng(seed)
    dataset = Dataset.create(root, "synthetic", (size, size, channels), space)
    for i in range(episodes):
        n = lengths[i] if lengths is not None else steps
        episode = make_episode(n, size, channels, space, rng, terminal=i % 2 == 1)
        name = f"{i:06d}"
        write_episode(root, name, episode)
        dataset.add(EpisodeRecord(name, n, seed=i, ret=float(episode.rewards.sum()), kind="synthetic"))
    return dataset


def build_run(
    base: Path,
    space: gym.Space,
    channels: int = 3,
    size: int = 16,
    dynamics_steps: int = 3,
    tokenizer: TokenizerConfig = TINY_TOKENIZER,
) -> tuple[Path, Path]:
    """Synthetic dataset plus a run folder trained the way worldmodel/train.py does it (a few steps)."""
    data_dir, run_dir = base / "dataset", base / "run"
    write_synthetic_dataset(data_dir, space, episodes=4, steps=12, size=size, channels=channels)
    logger = RunLogger(run_dir)
    tok_train = TrainConfig(steps=3, batch_size=8, warmup_steps=1, log_every=1, eval_every=100, checkpoint_every=100)
    train_tokenizer(data_dir, run_dir, TokenizerStage(tokenizer, tok_train, val_frames=16), logger, 0.25)
    dyn_train = TrainConfig(
        steps=dynamics_steps, batch_size=4, warmup_steps=1, log_every=1, eval_every=100, checkpoint_every=100
    )
    train_dynamics(data_dir, run_dir, DynamicsStage(TINY_DYNAMICS, dyn_train, val_batches=1), logger, 0.25)
    logger.close()
    return data_dir, run_dir


BOX_SPACE = gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32), dtype=np.float32)


@pytest.fixture(scope="session")
def box_run(tmp_path_factory) -> Path:
    """A tiny trained run on 16x16 RGB synthetic frames with a Box(3) action space."""
    _, run_dir = build_run(tmp_path_factory.mktemp("box"), BOX_SPACE, channels=3)
    return run_dir


@pytest.fixture(scope="session")
def box_data(box_run) -> Path:
    return box_run.parent / "dataset"


@pytest.fixture(scope="session")
def discrete_run(tmp_path_factory) -> Path:
    """A tiny trained run on 16x16 grayscale synthetic frames with a Discrete(5) action space."""
    _, run_dir = build_run(tmp_path_factory.mktemp("discrete"), gym.spaces.Discrete(5), channels=1)
    return run_dir


@pytest.fixture(scope="session")
def box_world(box_run):
    from worldmodel.world_model import WorldModel

    return WorldModel.load(box_run)


@pytest.fixture(scope="session")
def discrete_world(discrete_run):
    from worldmodel.world_model import WorldModel

    return WorldModel.load(discrete_run)


def open_in_chromium(page):
    """(DOM after load, console messages) of `page` in headless Chromium; .ci/run installs it."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if chromium is not None and subprocess.run([chromium, "--version"], capture_output=True).returncode != 0:
        chromium = None  # a stub (Ubuntu's snap launcher in a container) that cannot run
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is not installed: .ci/run installs Debian's chromium")
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
