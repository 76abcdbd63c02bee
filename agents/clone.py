"""Behaviour cloning: the dream policy's network fitted to the scripted driver's decisions in a run's data.

The baseline a user would try before a world model: imitate the recorded driving. Beside each executed action the
collection records what the scripted driver would have done there (`Episode.expert_actions`: DART's labels where the
collection's noise drove, DAgger's where the loop's policies did), so a clone learns the driver's decisions, not the
noise. It is the dream policy's own network on the same observations (the run's token grids, as many frames as the
policy sees), fitted by the likelihood that network gives the labels (`ActorCritic.act`, the clipped Gaussian's on a
Box), and the weights of the best likelihood on held-out episodes are kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.policy import ActorCritic, action_bounds, stack_history
from agents.ppo import POLICY, load_policy
from worldmodel.checkpoint import save_checkpoint
from worldmodel.config import ConfigError
from worldmodel.dataset import Dataset, DatasetError
from worldmodel.run_dir import RunDir
from worldmodel.tokens import TokenizedDataset


@dataclass
class CloneConfig:
    minutes: float = 3.0
    """Wall-clock budget of the fit."""
    max_steps: int | None = None
    """Updates at most, besides the minutes (None: the minutes alone): the fit ends at whichever comes first."""
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.05
    val_fraction: float = 0.1
    """Share of the labelled episodes held out to pick the weights by."""
    eval_every: int = 200
    """Updates between two scores on the held-out episodes."""
    seed: int = 0


@dataclass
class Labelled:
    """What a policy of `frames` frames saw at each labelled step (N, frames, h, w) and the driver's decision there."""

    grids: torch.Tensor
    labels: torch.Tensor


def labelled_steps(run_dir: Path, dataset: Dataset, frames: int, discrete: bool) -> tuple[dict[int, Labelled], int]:
    """Per episode of the run's `dataset` that carries `expert_actions` and is in the run's token cache, its steps;
    and how many tokenized episodes carry none (your own data, or a dataset recorded before the labels were)."""
    run = RunDir(run_dir)
    tokens = TokenizedDataset.load(run.tokens)
    found, unlabelled = {}, 0
    for position, index in enumerate(tokens.episode_ids.tolist()):
        labels = dataset.load(int(index)).expert_actions
        if labels is None:
            unlabelled += 1
            continue
        grids = torch.as_tensor(tokens.episode(position)["tokens"].astype(np.int64))
        target = torch.as_tensor(np.array(labels))
        found[int(index)] = Labelled(stack_history(grids, frames)[:-1], target.long() if discrete else target.float())
    if len(found) < 2:
        raise DatasetError(
            f"{dataset.root} holds {len(found)} tokenized episode(s) with expert_actions; a clone needs at least 2 "
            "(datasets recorded before the scripted driver's decisions were kept have none: collect again)"
        )
    return found, unlabelled


def _joined(parts: list[Labelled]) -> Labelled:
    return Labelled(torch.cat([p.grids for p in parts]), torch.cat([p.labels for p in parts]))


@torch.no_grad()
def held_out_figures(policy: ActorCritic, data: Labelled, bounds, chunk: int = 4096) -> dict[str, float | list[float]]:
    """Mean negative log-likelihood of the labels, and the deterministic action's accuracy (discrete) or squared
    error per action dimension (continuous), on `data`."""
    nll, hits, errors = 0.0, 0.0, 0.0
    for start in range(0, len(data.labels), chunk):
        grids, labels = data.grids[start : start + chunk], data.labels[start : start + chunk]
        _, log_prob, _, _ = policy.act(grids, labels, bounds=bounds)
        action, *_ = policy.act(grids, deterministic=True, bounds=bounds)
        nll -= float(log_prob.sum())
        if policy.config.discrete_actions:
            hits += float((action == labels).sum())
        else:
            errors = errors + ((action - labels) ** 2).sum(0)
    count = len(data.labels)
    figures: dict[str, float | list[float]] = {"val_nll": nll / count}
    if policy.config.discrete_actions:
        figures["val_accuracy"] = hits / count
    else:
        figures["val_squared_error"] = (errors / count).tolist()
    return figures


def train_clone(run_dir: str | Path, config: CloneConfig, out: Path) -> dict[str, Any]:
    """Fit a fresh copy of the run's policy network to the labels of its dataset for `config.minutes` (or
    `config.max_steps` updates, whichever comes first); writes the checkpoint `out` (a policy, as `evaluate` scores
    it) and returns its figures."""
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"the clone's max_steps: expected at least 1 update, or None, got {config.max_steps}")
    run_dir = Path(run_dir)
    reference = load_policy(RunDir(run_dir).policy)
    discrete = reference.config.discrete_actions
    dataset = Dataset.open(RunDir(run_dir).dataset)
    episodes, unlabelled = labelled_steps(run_dir, dataset, reference.config.frames, discrete)
    order = np.random.default_rng(config.seed).permutation(sorted(episodes))
    held = max(1, round(config.val_fraction * len(order)))
    val = _joined([episodes[int(i)] for i in order[:held]])
    train = _joined([episodes[int(i)] for i in order[held:]])
    bounds = action_bounds(dataset.action_space)

    torch.manual_seed(config.seed)
    policy = ActorCritic(reference.config)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best = {"val_nll": float("inf")}
    best_state = None
    step, began = 0, time.monotonic()
    progress = tqdm(total=round(60 * config.minutes), unit="s", desc="clone", dynamic_ncols=True)
    while True:
        batch = torch.randint(len(train.labels), (config.batch_size,))
        _, log_prob, _, _ = policy.act(train.grids[batch], train.labels[batch], bounds=bounds)
        loss = -log_prob.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        elapsed = time.monotonic() - began
        done = elapsed > 60 * config.minutes or (config.max_steps is not None and step >= config.max_steps)
        if step % config.eval_every == 0 or done:
            figures = held_out_figures(policy, val, bounds)
            if figures["val_nll"] < best["val_nll"]:
                best = {**figures, "step": step}
                best_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
            progress.set_postfix(step=step, val_nll=f"{figures['val_nll']:.3f}")
            progress.update(min(round(elapsed), progress.total) - progress.n)
        if done:
            break
    progress.close()
    if best_state is None:
        raise RuntimeError(f"the clone's held-out likelihood was never finite (last: {figures['val_nll']})")
    policy.load_state_dict(best_state)
    figures = {
        **best,
        "steps": step,
        "labelled_episodes": len(episodes),
        "unlabelled_episodes": unlabelled,
        "train_steps": len(train.labels),
        "val_steps": len(val.labels),
        "budget": {"minutes": config.minutes, "max_steps": config.max_steps},
    }
    save_checkpoint(out, policy, POLICY, {"clone": figures})
    return figures
