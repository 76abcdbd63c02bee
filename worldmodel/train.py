"""The training stages: tokenizer on frames, then dynamics on the tokenized dataset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from worldmodel import distributed
from worldmodel.checkpoint import CheckpointError, fingerprint, load_module, read_checkpoint
from worldmodel.config import ConfigError, from_dict
from worldmodel.dataset import Dataset, DatasetError, FrameSampler, window_counts
from worldmodel.dynamics import DynamicsConfig, DynamicsModel
from worldmodel.logger import RunLogger
from worldmodel.run_dir import RunDir
from worldmodel.tokenizer import Tokenizer, TokenizerConfig, psnr, ssim
from worldmodel.tokens import TokenizedDataset, tokenize_dataset
from worldmodel.trainer import TrainConfig, train

TOKENIZER = "tokenizer"
DYNAMICS = "dynamics"


@dataclass
class TokenizerStage:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val_frames: int = 512


@dataclass
class DynamicsStage:
    model: DynamicsConfig = field(default_factory=DynamicsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val_batches: int = 8
    reward_smoothing: int = 1
    """Train the reward on each episode's centred moving average over this many steps (odd; 1: the raw reward);
    validation always scores the raw reward. See `TokenizedDataset.smoothed_rewards`."""
    termination_lookahead: int = 1
    """Train the termination head to say "the episode ends within this many steps" (1: "it ends now"); validation
    always scores the raw end. See `TokenizedDataset.foreseen_terminations`."""
    past_end: bool = False
    """Let training windows run past their episode's end, the steps after it padded and left out of the loss. A
    window inside its episode never holds the end anywhere but at its last step, so the heads learn that nothing
    ends with less than a full window of context, which is where a dream's first steps stand (docs/loop.md,
    "The end of an episode at every place of the window"); past the end, a step stands once at each place it can
    reach (step s at places 0 to s). Validation windows stay inside their episodes."""


def resolve_device(device: str) -> torch.device:
    """`cpu`, `cuda` or `auto` (CUDA when present); under torchrun, CUDA is this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this torch sees no CUDA device; use cpu or auto")
    return distributed.local_device(chosen)


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> tuple[Tokenizer, dict]:
    tokenizer, meta, _ = load_module(path, TOKENIZER, Tokenizer, TokenizerConfig, device)
    return tokenizer.eval(), meta


def load_dynamics(
    path: str | Path, tokenizer_fingerprint: str | None = None, device: str | torch.device = "cpu"
) -> tuple[DynamicsModel, dict]:
    """Load a dynamics model; if `tokenizer_fingerprint` is given, refuse one trained on another tokenizer."""
    model, meta, _ = load_module(path, DYNAMICS, DynamicsModel, DynamicsConfig, device)
    trained_on = meta.get("tokenizer_fingerprint")
    if tokenizer_fingerprint is not None and trained_on != tokenizer_fingerprint:
        raise CheckpointError(
            f"{path} was trained on tokenizer {trained_on}, but the tokenizer given is "
            f"{tokenizer_fingerprint}; use the tokenizer from the same run"
        )
    return model.eval(), meta


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer: Tokenizer, frames: np.ndarray, device: torch.device, batch_size: int = 128
) -> dict[str, float]:
    """Mean PSNR and SSIM of decoded tokens against `frames` ((N, H, W, C) uint8), and codebook usage."""
    psnrs, ssims, used = [], [], set()
    for start in range(0, len(frames), batch_size):
        batch = torch.from_numpy(frames[start : start + batch_size]).to(device)
        tokens = tokenizer.encode(batch).tokens
        recon = tokenizer.decode(tokens).float()
        target = batch.permute(0, 3, 1, 2).float() / 255
        psnrs.append(psnr(recon, target).item() * len(batch))
        ssims.append(ssim(recon, target).item() * len(batch))
        used.update(torch.unique(tokens).tolist())
    return {"psnr": sum(psnrs) / len(frames), "ssim": sum(ssims) / len(frames), "codes_used": float(len(used))}


class StepRng:
    """The generator a training's batches are drawn with at each step: one stream seeded `seed` from the first step,
    reseeded with the step where a training resumes (from its `_last` checkpoint), so that a resumed training draws new
    batches rather than again the ones it began with."""

    def __init__(self, seed: int):
        self.seed, self.generator, self.next = seed, np.random.default_rng(seed), 0

    def __call__(self, step: int) -> np.random.Generator:
        if step != self.next:
            self.generator = np.random.default_rng([self.seed, step])
        self.next = step + 1
        return self.generator


def train_tokenizer(
    dataset_dir: str | Path,
    run_dir: str | Path,
    stage: TokenizerStage,
    logger: RunLogger,
    val_fraction: float = 0.1,
    device: str = "cpu",
) -> dict[str, float]:
    """Train the tokenizer on the dataset's training episodes; returns validation metrics and the rate.

    Runs data-parallel when launched with torchrun (see `worldmodel.distributed`), e.g.
    `torchrun --standalone --nproc_per_node 2 -m pipeline train tokenizer --preset tiny`.
    """
    dev = resolve_device(device)
    dataset = Dataset.open(dataset_dir)
    height, width, channels = dataset.frame_shape
    config = dataclasses.replace(
        stage.model, image_size=height, image_width=None if width == height else width, channels=channels
    )
    config.validate()  # frames the stages cannot halve are refused before any work
    train_ids, val_ids = dataset.split(val_fraction)
    sampler = FrameSampler(dataset, dataset.usable(train_ids))
    rng = StepRng(stage.train.seed + distributed.rank())
    val_all = FrameSampler(dataset, dataset.usable(val_ids)).all_frames()
    val_frames = val_all[np.linspace(0, len(val_all) - 1, min(stage.val_frames, len(val_all))).astype(int)]
    torch.manual_seed(stage.train.seed)  # the same seed gives the same initial weights, on every rank
    tokenizer = Tokenizer(config).to(dev)
    path = RunDir(run_dir).tokenizer

    def sample(step: int) -> dict[str, torch.Tensor]:
        return {"frames": torch.from_numpy(sampler.sample(stage.train.batch_size, rng(step))).to(dev)}

    metrics = train(
        tokenizer,
        sample,
        stage.train,
        path,
        TOKENIZER,
        logger,
        evaluate=lambda m: evaluate_reconstruction(m, val_frames, dev),
        extra_meta={"dataset": str(dataset_dir), "val_episodes": val_ids},
        description="tokenizer",
    )
    return {
        "bytes_per_frame": config.bytes_per_frame,
        "tokens_per_frame": config.tokens_per_frame,
        "codebook_size": config.codebook_size,
        "val_psnr": metrics["psnr"],
        "val_ssim": metrics["ssim"],
        "codes_used": metrics["codes_used"],
        "steps": metrics["steps"],
    }


def fitted_dynamics_config(model: DynamicsConfig, tokenizer: TokenizerConfig, action_space) -> DynamicsConfig:
    """`model`'s shape fitted to a tokenizer's vocabulary and grid and to an action space (a gymnasium Discrete or
    Box): what the dynamics stage trains, and what `bench train-step` times."""
    discrete = action_space.shape == ()
    return dataclasses.replace(
        model,
        vocab_size=tokenizer.codebook_size,
        tokens_per_frame=tokenizer.tokens_per_frame,
        discrete_actions=discrete,
        action_dim=int(action_space.n) if discrete else int(action_space.shape[0]),
    )


def tokens_for_run(dataset_dir: str | Path, run_dir: str | Path, device: str = "cpu") -> TokenizedDataset:
    """The run's token cache (`<run>/tokens.npz`) for the dataset as it is now: episodes the cache holds from the
    same content and tokenizer are reused, new or changed ones are tokenized, and the cache is rewritten when
    anything changed (see `tokenize_dataset`)."""
    run_dir = Path(run_dir)
    tokenizer, _ = load_tokenizer(RunDir(run_dir).tokenizer, resolve_device(device))
    current = fingerprint(tokenizer)
    path = RunDir(run_dir).tokens
    cached = None
    if path.is_file():
        try:
            cached = TokenizedDataset.load(path)
        except DatasetError as err:
            tqdm.write(f"re-tokenizing: {err}")
    tokenized = tokenize_dataset(
        Dataset.open(dataset_dir), tokenizer, current, device=resolve_device(device), cached=cached
    )
    unchanged = (
        cached is not None
        and cached.tokenizer_fingerprint == current
        and cached.episode_keys is not None
        and np.array_equal(cached.episode_keys, tokenized.episode_keys)
        and np.array_equal(cached.episode_ids, tokenized.episode_ids)
    )
    if not unchanged:
        tokenized.save(path)
    return tokenized


def recent_weights(
    tokenized: TokenizedDataset, window: int, recent: list[int], share: float, past_end: bool = False
) -> np.ndarray | None:
    """Per-episode weights under which windows of `window` steps (`past_end`: as `sample_windows`) come from the
    episodes whose dataset indices are in `recent` with probability `share`, and from the others with `1 - share`
    (uniformly within each group). None (uniform) when either group has no such window. The share is of windows,
    not of trained steps: with `past_end`, a window near an end holds fewer steps that count."""
    if not 0 <= share <= 1:
        raise ValueError(f"the recent episodes' share of training windows must be in [0, 1], got {share}")
    is_recent = np.isin(tokenized.episode_ids, np.asarray(list(recent), dtype=np.int64))
    counts = window_counts(tokenized.lengths, window, past_end).astype(np.float64)
    mass_recent, mass_rest = counts[is_recent].sum(), counts[~is_recent].sum()
    if mass_recent == 0 or mass_rest == 0:
        return None
    return np.where(is_recent, share / mass_recent, (1 - share) / mass_rest)


def _to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
    tensors["tokens"] = tensors["tokens"].flatten(2)  # (B, T + 1, K)
    return tensors


def train_dynamics(
    dataset_dir: str | Path,
    run_dir: str | Path,
    stage: DynamicsStage,
    logger: RunLogger,
    val_fraction: float = 0.1,
    device: str = "cpu",
    checkpoint: Path | None = None,
    init: Path | None = None,
    recent: tuple[list[int], float] | None = None,
    step_offset: int = 0,
) -> dict[str, float]:
    """Train the dynamics model on the tokenized training episodes; returns teacher-forced validation metrics.

    Writes `<run>/dynamics` (or `checkpoint`). `init` continues from another checkpoint's weights and optimizer
    (`trainer.train`); `recent` = (dataset indices, share) draws that share of the training windows from those
    episodes (the newest ones, in the dream-to-real loop) and the rest uniformly from the others."""
    dev = resolve_device(device)
    run_dir = Path(run_dir)
    dataset = Dataset.open(dataset_dir)
    tokenizer_meta, _ = read_checkpoint(RunDir(run_dir).tokenizer, TOKENIZER)
    tokenizer_config = from_dict(TokenizerConfig, tokenizer_meta["config"])
    (grid_h, grid_w), (height, width) = tokenizer_config.grid_shape, tokenizer_config.image_shape
    if grid_h != grid_w:
        raise DatasetError(
            f"the dynamics model needs a square token grid; {run_dir}'s tokenizer makes {grid_h}x{grid_w} tokens of"
            f" {height}x{width} frames (non-square frames are for `collect` and the tokenizer's train, eval and bench"
            " commands so far)"
        )
    tokenized = tokens_for_run(dataset_dir, run_dir, device)
    train_ids, val_ids = dataset.split(val_fraction)
    train_set = (
        tokenized.select(train_ids)
        .smoothed_rewards(stage.reward_smoothing)
        .foreseen_terminations(stage.termination_lookahead)
    )
    val_set = tokenized.select(val_ids)
    config = fitted_dynamics_config(stage.model, tokenizer_config, dataset.action_space)
    window = config.context_frames
    torch.manual_seed(stage.train.seed)  # the same seed gives the same initial weights, on every rank
    model = DynamicsModel(config).to(dev)
    weights = None if recent is None else recent_weights(train_set, window, *recent, past_end=stage.past_end)
    rng = StepRng(stage.train.seed + distributed.rank())
    val_rng = np.random.default_rng(12345)
    val_batches = [
        _to_tensors(val_set.sample(window, stage.train.batch_size, val_rng), dev) for _ in range(stage.val_batches)
    ]

    @torch.no_grad()
    def evaluate(m: DynamicsModel) -> dict[str, float]:
        totals: dict[str, float] = {}
        for batch in val_batches:
            _, logs = m.forward_batch(batch)
            out = m(batch["tokens"][:, :-1], batch["actions"])
            reward = m.step_reward(out, batch["tokens"][:, :-1], batch["tokens"][:, 1:])
            logs["reward_mae"] = (reward - batch["rewards"]).abs().mean().item()
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + v / len(val_batches)
        return totals

    metrics = train(
        model,
        lambda step: _to_tensors(
            train_set.sample(window, stage.train.batch_size, rng(step), weights=weights, past_end=stage.past_end), dev
        ),
        stage.train,
        checkpoint or RunDir(run_dir).dynamics,
        DYNAMICS,
        logger,
        evaluate=evaluate,
        extra_meta={
            "tokenizer_fingerprint": tokenized.tokenizer_fingerprint,
            "action_space": dataset.manifest.action_space,
            "val_episodes": val_ids,
        },
        description="dynamics",
        init=init,
        step_offset=step_offset,
    )
    return {
        "val_token_accuracy": metrics["token_accuracy"],
        "val_copy_last_accuracy": metrics["copy_last_accuracy"],
        "val_token_ce": metrics["token_ce"],
        "val_reward_mae": metrics["reward_mae"],
        "steps": metrics["steps"],
    }
