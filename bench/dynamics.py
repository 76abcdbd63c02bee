"""`worldmodel bench dynamics`: how close the dream stays to held-out real episodes.

- Teacher-forced, over every window of the held-out episodes: next-frame token accuracy and cross-entropy,
  reward mean absolute error, termination precision and recall.
- Open loop: from real context frames, the dream is fed the episode's real actions and imagines on its own;
  its decoded frames are compared with the real frames at each horizon (PSNR, and agreement of its tokens with
  the real frames' tokens), beside copying the last context frame (`copy_last`), beside copying that frame's
  tokenizer reconstruction (`copy_last_decoded`: the same baseline seen through the tokenizer, as the dream's
  frames are), and beside the tokenizer's own reconstruction of the real frame (the best the dream could do
  through this tokenizer).
- Action faithfulness (`bench/faithfulness.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from bench.faithfulness import ProbeConfig, ProbeUnavailable, action_faithfulness
from worldmodel.dataset import Dataset, DatasetError
from worldmodel.export import MANIFEST as EXPORT_MANIFEST
from worldmodel.files import save_figure_atomic, write_json_atomic
from worldmodel.run_dir import RunDir
from worldmodel.tokenizer import frames_to_float, image_psnr
from worldmodel.tokens import TokenizedDataset
from worldmodel.world_model import Sampling, WorldModel


@dataclass
class DynamicsBenchConfig:
    horizons: tuple[int, ...] = (1, 4, 16, 64)
    episodes: int = 16
    """Held-out episodes to roll out open loop (all of them if fewer)."""
    sampling: Sampling = field(default_factory=Sampling)
    """How the open-loop dreams draw their tokens (greedy by default); the faithfulness probe has its own."""
    batch_size: int = 64
    faithfulness: ProbeConfig = field(default_factory=ProbeConfig)


def frame_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB of (N, H, W, C) uint8 frames."""
    return image_psnr(frames_to_float(torch.from_numpy(a)), frames_to_float(torch.from_numpy(b))).numpy()


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def training_windows(lengths: Sequence[int], window: int) -> list[tuple[int, int]]:
    """(episode, first step) of back-to-back windows of `window` steps (`window` + 1 frames) inside each episode;
    an episode shorter than one window has none (a crash on highway can end one within a few steps)."""
    return [(e, s) for e, length in enumerate(lengths) for s in range(0, int(length) - window + 1, window)]


@torch.no_grad()
def teacher_forced(world: WorldModel, held_out: TokenizedDataset, batch_size: int) -> dict[str, Any]:
    """Token accuracy and cross-entropy, reward MAE, termination precision/recall over every held-out window."""
    window = world.dynamics.config.context_frames
    starts = training_windows(held_out.lengths, window)
    if not starts:
        raise DatasetError(f"no held-out episode has the {window} steps of one training window")
    correct = total = 0
    ce_sum = reward_error = 0.0
    steps = tp = fp = fn = 0
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        frame0 = np.array([held_out.frame_offsets[e] + s for e, s in chunk])
        step0 = np.array([held_out.step_offsets[e] + s for e, s in chunk])
        tokens = torch.as_tensor(held_out.tokens[frame0[:, None] + np.arange(window + 1)].astype(np.int64))
        tokens = tokens.flatten(2).to(world.device)
        actions = world.action_tensor(held_out.actions[step0[:, None] + np.arange(window)])
        rewards = torch.as_tensor(held_out.rewards[step0[:, None] + np.arange(window)]).to(world.device)
        terminated = torch.as_tensor(held_out.terminated[step0[:, None] + np.arange(window)]).to(world.device)
        out = world.dynamics(tokens[:, :-1], actions)
        logits, target = out.logits.float(), tokens[:, 1:]
        correct += int((logits.argmax(-1) == target).sum())
        total += target.numel()
        ce_sum += float(F.cross_entropy(rearrange(logits, "b t k v -> (b t k) v"), target.reshape(-1), reduction="sum"))
        reward = world.dynamics.step_reward(out, tokens[:, :-1], tokens[:, 1:])
        reward_error += float((reward.float() - rewards).abs().sum())
        steps += rewards.numel()
        predicted = out.termination_logit > 0
        tp += int((predicted & terminated).sum())
        fp += int((predicted & ~terminated).sum())
        fn += int((~predicted & terminated).sum())
    return {
        "token_accuracy": correct / total,
        "token_cross_entropy": ce_sum / total,
        "reward_mae": reward_error / steps,
        "termination_precision": _ratio(tp, tp + fp),
        "termination_recall": _ratio(tp, tp + fn),
        "terminations": tp + fn,
        "windows": len(starts),
    }


@torch.no_grad()
def open_loop(
    world: WorldModel, dataset: Dataset, held_out: TokenizedDataset, config: DynamicsBenchConfig
) -> dict[str, Any]:
    """PSNR and token agreement against the real frames at each horizon: model, copy-last and tokenizer."""
    context = world.dynamics.config.context_frames - 1
    longest = max(config.horizons)
    rows = []  # (episode position in held_out, last context frame index)
    for e, length in enumerate(held_out.lengths[: config.episodes]):
        if int(length) >= context:
            rows.append((e, int(max(context - 1, min(int(length) - longest, int(length) // 2)))))
    if not rows:
        raise DatasetError(f"no held-out episode has the {context} steps of dream context")

    def by_horizon(*names: str) -> dict[str, dict[int, list[float]]]:
        return {name: {h: [] for h in config.horizons} for name in names}

    scores = by_horizon("model", "copy_last", "copy_last_decoded", "tokenizer")
    agreement = by_horizon("model", "copy_last")
    generator = torch.Generator(world.device).manual_seed(0)
    for first in range(0, len(rows), config.batch_size):
        chunk = rows[first : first + config.batch_size]
        n = len(chunk)
        lengths = np.array([int(held_out.lengths[e]) for e, _ in chunk])
        last = np.array([s for _, s in chunk])
        frame0 = np.array([held_out.frame_offsets[e] for e, _ in chunk])
        step0 = np.array([held_out.step_offsets[e] for e, _ in chunk])
        ctx = frame0[:, None] + last[:, None] + np.arange(1 - context, 1)
        tokens = torch.as_tensor(held_out.tokens[ctx].astype(np.int64)).to(world.device)
        ctx_actions = world.action_tensor(held_out.actions[step0[:, None] + last[:, None] + np.arange(1 - context, 0)])
        cache = world.dynamics.new_cache(n)
        world.burn_in(cache, tokens, ctx_actions, torch.arange(n, device=world.device))
        episodes = [dataset.load(int(held_out.episode_ids[e])) for e, _ in chunk]
        current = tokens[:, -1]
        steps = min(longest, int((lengths - last).max()))
        for h in range(1, steps + 1):
            step_index = np.minimum(last + h - 1, lengths - 1)  # rows whose episode ended repeat its last action
            actions = world.action_tensor(held_out.actions[step0 + step_index])
            current = world.imagine(cache, current, actions, sampling=config.sampling, generator=generator).tokens
            if h not in scores["model"]:
                continue
            alive = [i for i in range(n) if last[i] + h <= lengths[i]]
            if not alive:
                continue
            real = np.stack([np.asarray(episodes[i].frames[last[i] + h]) for i in alive])
            start = np.stack([np.asarray(episodes[i].frames[last[i]]) for i in alive])
            real_tokens = torch.as_tensor(held_out.tokens[frame0[alive] + last[alive] + h].astype(np.int64))
            dream = world.tokenizer.tokens_to_frames(current[alive]).cpu().numpy()
            recon = world.tokenizer.tokens_to_frames(real_tokens.to(world.device)).cpu().numpy()
            scores["model"][h] += frame_psnr(dream, real).tolist()
            scores["copy_last"][h] += frame_psnr(start, real).tolist()
            scores["tokenizer"][h] += frame_psnr(recon, real).tolist()
            agreement["model"][h] += (current[alive].cpu() == real_tokens).flatten(1).float().mean(1).tolist()
            start_tokens = torch.as_tensor(held_out.tokens[frame0[alive] + last[alive]].astype(np.int64))
            start_recon = world.tokenizer.tokens_to_frames(start_tokens.to(world.device)).cpu().numpy()
            scores["copy_last_decoded"][h] += frame_psnr(start_recon, real).tolist()
            agreement["copy_last"][h] += (start_tokens == real_tokens).flatten(1).float().mean(1).tolist()

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {
        "psnr_by_horizon": {k: {str(h): mean(v) for h, v in by_h.items()} for k, by_h in scores.items()},
        "token_agreement_by_horizon": {k: {str(h): mean(v) for h, v in by_h.items()} for k, by_h in agreement.items()},
        "rollouts_by_horizon": {str(h): len(v) for h, v in scores["model"].items()},
    }


def plot_psnr(figures: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for name, by_h in figures["psnr_by_horizon"].items():
        points = [(int(h), v) for h, v in by_h.items() if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name.replace("_", "-"))
    ax.set_xscale("log", base=2)
    horizons = sorted({int(h) for by_h in figures["psnr_by_horizon"].values() for h in by_h})
    ax.set_xticks(horizons, [str(h) for h in horizons])
    ax.set_xlabel("horizon (steps, real actions)")
    ax.set_ylabel("PSNR vs real frame (dB)")
    ax.set_title("open-loop dream on held-out episodes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)


def bench_dynamics(
    run_dir: str | Path,
    dataset_dir: str | Path | None = None,
    config: DynamicsBenchConfig | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
) -> dict[str, Any]:
    """All figures of the module docstring for the run in `run_dir`, optionally written as JSON and a PNG plot."""
    config = config or DynamicsBenchConfig()
    run_dir = Path(run_dir)
    dataset_dir = Path(dataset_dir) if dataset_dir else RunDir(run_dir).dataset
    if (run_dir / EXPORT_MANIFEST).is_file():
        raise DatasetError(
            f"{run_dir} is an exported model ({EXPORT_MANIFEST}): it keeps a few episodes to start dreams from, not"
            " the held-out episodes its run measured on; bench the run folder it was exported from"
        )
    world = WorldModel.load(run_dir, with_contexts=False)
    world.check_sampling(config.sampling)
    world.check_sampling(config.faithfulness.sampling)
    world.dynamics.eval()
    world.tokenizer.eval()
    tokens = TokenizedDataset.load(RunDir(run_dir).tokens)
    held_out_ids = world.meta.get("val_episodes") or []
    if not held_out_ids:
        sidecar = RunDir(run_dir).dynamics.with_suffix(".json")
        raise DatasetError(f"{sidecar} records no held-out episodes to measure on")
    held_out = tokens.select(held_out_ids)
    dataset = Dataset.open(dataset_dir)
    figures: dict[str, Any] = {
        "run": str(run_dir),
        "held_out_episodes": len(held_out.episode_ids),
        "config": dataclasses.asdict(config),
        **teacher_forced(world, held_out, config.batch_size),
        **open_loop(world, dataset, held_out, config),
    }
    try:
        figures["action_faithfulness"] = action_faithfulness(run_dir, dataset_dir, config.faithfulness, world)
    except ProbeUnavailable as err:
        figures["action_faithfulness"] = {"skipped": str(err)}
    if json_path:
        write_json_atomic(json_path, figures)
    if plot_path:
        plot_psnr(figures, Path(plot_path))
    return figures
