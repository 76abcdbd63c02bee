"""The baseline a user would pick instead of a world model: the same PPO and policy network trained directly in the
real simulator, for a wall-clock budget.

The policy sees what the dream-trained policy sees: each real frame through the run's tokenizer, as a token grid.
The simulators run in a `gymnasium.vector.AsyncVectorEnv` (one process each, SAME_STEP autoreset, full episodes);
the frames are tokenized and the policy acts in this process, batched. A snapshot of the policy is kept every
`snapshot_minutes` with the wall time and real steps it had used, so that its held-out return can be measured
against both afterwards (`bench baseline`), outside the timed training.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from agents.policy import ActorCritic
from agents.ppo import POLICY, PPOConfig, optimise
from envs.sources import SourceConfig, make_source_env
from worldmodel.checkpoint import save_checkpoint
from worldmodel.config import ConfigError
from worldmodel.files import write_json_atomic
from worldmodel.logger import RunLogger
from worldmodel.run_dir import RunDir
from worldmodel.train import load_tokenizer
from worldmodel.world_model import token_grid_space

REAL_PPO = "real_ppo"
"""The baseline's folder inside a run folder."""
SNAPSHOTS = "snapshots.json"
"""The list of a training's snapshots, in its folder: there, an earlier training that is not overwritten."""


@dataclass
class RealPPOConfig:
    minutes: float = 17.0
    """Wall-clock budget of the training (the simulators' start-up included)."""
    num_envs: int = 8
    """Real simulators, one process each."""
    snapshot_minutes: float = 2.0
    """A snapshot of the policy every this many minutes of training (and one at the end)."""
    rollout_steps: int | None = None
    """Steps each simulator takes between PPO updates. None: as many steps an update as the dream's PPO takes
    (`ppo.num_envs` times `ppo.rollout_steps`, shared over the simulators), so that the same learning rate, clip
    range and epochs see batches and minibatches as large as in the dream. The dream's 32 steps per simulator on 8
    simulators made updates 8 times smaller: in 2 hours on `small` they fell from 567 to 41 (seed 0) and to -47 by 40
    minutes (seed 1) on held-out tracks; with the dream's batch they reached 854 and 739 (docs/loop.md)."""

    def steps_per_env(self, ppo: PPOConfig) -> int:
        """The steps each simulator takes between updates (`rollout_steps`, or the dream's batch over them)."""
        if self.rollout_steps is not None:
            return self.rollout_steps
        return max(1, round(ppo.num_envs * ppo.rollout_steps / self.num_envs))


def train_real_ppo(
    run_dir: str | Path,
    source: SourceConfig,
    ppo: PPOConfig,
    config: RealPPOConfig,
    logger: RunLogger,
    out: Path | None = None,
) -> dict[str, object]:
    """Train PPO in the real simulator on the run's tokens; writes snapshots and `snapshots.json` to `out`
    (default `<run>/real_ppo`). Returns the steps taken, their rate and the snapshots."""
    run_dir = Path(run_dir)
    out = out or RunDir(run_dir).real_ppo
    if (
        not config.minutes > 0
        or not config.snapshot_minutes > 0
        or config.num_envs < 1
        or (config.rollout_steps is not None and config.rollout_steps < 1)
    ):
        raise ConfigError(
            "the real-simulator PPO needs positive minutes, snapshot minutes, simulators and rollout steps, got "
            f"{config.minutes}, {config.snapshot_minutes}, {config.num_envs} and {config.rollout_steps}"
        )
    if (out / SNAPSHOTS).exists():
        raise ConfigError(
            f"{out} holds an earlier real-simulator training ({SNAPSHOTS}); move it away to train again, or score it "
            "with `worldmodel bench baseline`"
        )
    tokenizer, _ = load_tokenizer(RunDir(run_dir).tokenizer)  # a run without one stops before any folder is made
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(ppo.seed)
    full_episodes = dataclasses.replace(source, max_steps=None)
    began = time.monotonic()
    envs = gym.vector.AsyncVectorEnv(
        [partial(make_source_env, full_episodes) for _ in range(config.num_envs)],
        context="spawn",
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    try:
        policy = ActorCritic.for_spaces(
            token_grid_space(tokenizer.config.grid_size, tokenizer.config.codebook_size),
            envs.single_action_space,
            tokenizer.config.levels,
            hidden=ppo.hidden,
            init_log_std=ppo.init_log_std,
            frames=ppo.policy_frames,
        )

        @torch.no_grad()
        def observe(frames: np.ndarray) -> torch.Tensor:
            return tokenizer.encode(torch.from_numpy(np.ascontiguousarray(frames))).tokens

        snapshots: list[dict[str, float | str]] = []

        def snapshot(steps: int, final: bool = False) -> None:
            elapsed = time.monotonic() - began
            due = (len(snapshots) + 1) * 60 * config.snapshot_minutes
            if not final and elapsed < due:
                return
            if final and snapshots and snapshots[-1]["real_steps"] == steps:
                return  # the last update's own snapshot is the final one
            name = f"{POLICY}-{len(snapshots):03d}"
            meta = {"real_steps": steps, "wall_s": round(elapsed, 1)}
            save_checkpoint(out / name, policy, POLICY, meta)
            snapshots.append({"checkpoint": name, **meta})
            write_json_atomic(out / SNAPSHOTS, snapshots)

        budget = dataclasses.replace(
            ppo,
            rollout_steps=config.steps_per_env(ppo),
            total_steps=10**12,
            max_minutes=config.minutes - (time.monotonic() - began) / 60,
        )
        figures = optimise(
            envs, policy, budget, logger, observe=observe, after_update=snapshot, log_prefix="real_ppo/train"
        )
        snapshot(int(figures["steps"]), final=True)
    finally:
        envs.close()
    return {
        "rollout_steps": budget.rollout_steps,
        "real_steps": figures["steps"],
        "steps_per_second": figures["steps_per_second"],
        "episode_return": figures["episode_return"],
        "snapshots": snapshots,
    }
