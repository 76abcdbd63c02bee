"""The baseline a user would pick instead of a world model: the same PPO and policy network trained directly in the
real simulator, for a wall-clock budget.

The policy sees what the dream-trained policy sees: each real frame through the run's tokenizer, as a token grid.
The simulators run in a `gymnasium.vector.AsyncVectorEnv` (one process each, SAME_STEP autoreset, full episodes);
the frames are tokenized and the policy acts in this process, batched. A snapshot of the policy is kept every
`snapshot_minutes` with the wall time and real steps it had used, so that its held-out return can be measured
against both afterwards (`bench baseline`), outside the timed training.

A training that is killed resumes at its last snapshot when it is started again with the same settings: the policy
and its Adam moments are kept there (`policy_last`), its real steps and wall time go on from the snapshot's, and the
simulators start new episodes. What was done after that snapshot is lost and not counted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from agents.policy import ActorCritic, PolicyConfig
from agents.ppo import POLICY, PPOConfig, optimise, ppo_optimizer
from envs.sources import SourceConfig, make_source_env
from worldmodel.checkpoint import fingerprint, load_module, resumable, save_checkpoint, write_meta
from worldmodel.config import ConfigError
from worldmodel.files import json_safe, read_json, write_json_atomic
from worldmodel.logger import RunLogger
from worldmodel.run_dir import RunDir
from worldmodel.train import load_tokenizer
from worldmodel.trainer import optimizer_state, restore_optimizer
from worldmodel.world_model import token_grid_space

REAL_PPO = "real_ppo"
"""The baseline's folder inside a run folder."""
SNAPSHOTS = "snapshots.json"
"""The list of a training's snapshots, in its folder: there, an earlier training that is not overwritten."""
RESUME_SEED_STRIDE = 1000
"""A resumed training's simulators and sampling are seeded `ppo.seed` plus this for each time it was resumed, so
that it does not drive its first tracks again."""


@dataclass
class RealPPOConfig:
    minutes: float = 17.0
    """Wall-clock budget of the training (the simulators' start-up included)."""
    num_envs: int = 8
    """Real simulators, one process each."""
    snapshot_minutes: float = 2.0
    """A snapshot of the policy every this many minutes of training (and one at the end)."""
    max_steps: int | None = None
    """Real environment steps at most, besides the minutes (None: the minutes alone): the training ends at whichever
    comes first, after a whole update (at least one, so the cap is rounded down to whole updates)."""
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
    (default `<run>/real_ppo`), or resumes the killed training there, or gives back the figures of the finished one
    made with the same settings. Returns the real steps taken in all, their rate over the wall time counted, the
    sampled episodes' mean return at the end, the snapshots and, where it was resumed, where (`resumed`)."""
    run_dir = Path(run_dir)
    out = out or RunDir(run_dir).real_ppo
    if (
        not config.minutes > 0
        or not config.snapshot_minutes > 0
        or config.num_envs < 1
        or (config.rollout_steps is not None and config.rollout_steps < 1)
        or (config.max_steps is not None and config.max_steps < 1)
    ):
        raise ConfigError(
            "the real-simulator PPO needs positive minutes, snapshot minutes, simulators, rollout steps and max steps,"
            f" got {config.minutes}, {config.snapshot_minutes}, {config.num_envs}, {config.rollout_steps} and"
            f" {config.max_steps}"
        )
    tokenizer, _ = load_tokenizer(RunDir(run_dir).tokenizer)  # a run without one stops before any folder is made
    settings = _settings(source, ppo, config, fingerprint(tokenizer))
    state = _earlier(out, settings)
    rollout_steps = config.steps_per_env(ppo) if state is None else state["rollout_steps"]
    cap = step_cap(config, config.num_envs * rollout_steps)
    if state is not None and (state["finished"] or budget_spent(state["snapshots"][-1], config, cap)):
        tqdm.write(f"the real-simulator PPO in {out} has finished; its figures stand")
        return _finish(out, state)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {"settings": settings, "snapshots": [], "resumed": [], "finished": False}
        state["rollout_steps"] = rollout_steps
    else:
        state["resumed"].append({k: state["snapshots"][-1][k] for k in ("real_steps", "wall_s")})
        tqdm.write(f"resuming the real-simulator PPO in {out} at its last snapshot, {state['resumed'][-1]}")
    snapshots = state["snapshots"]
    done_steps, done_s = (snapshots[-1]["real_steps"], snapshots[-1]["wall_s"]) if snapshots else (0, 0.0)
    seed = ppo.seed + RESUME_SEED_STRIDE * len(state["resumed"])
    torch.manual_seed(seed)
    full_episodes = dataclasses.replace(source, max_steps=None)
    began = time.monotonic() - done_s  # the wall time goes on from the last snapshot's
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
        optimizer = ppo_optimizer(policy, ppo)
        if snapshots:
            _restore(out, snapshots[-1], policy, optimizer)

        @torch.no_grad()
        def observe(frames: np.ndarray) -> torch.Tensor:
            return tokenizer.encode(torch.from_numpy(np.ascontiguousarray(frames))).tokens

        def snapshot(steps: int, figures: dict[str, float], final: bool = False) -> None:
            steps += done_steps
            elapsed = time.monotonic() - began
            due = (len(snapshots) + 1) * 60 * config.snapshot_minutes
            if not final and elapsed < due:
                return
            if not (final and snapshots and snapshots[-1]["real_steps"] == steps):  # else the last update's is final
                name = f"{POLICY}-{len(snapshots):03d}"
                meta = {"real_steps": steps, "wall_s": round(elapsed, 1)}
                save_checkpoint(out / name, policy, POLICY, meta)
                snapshots.append({"checkpoint": name, **meta})
            state.update(finished=final, episode_return=json_safe(figures["episode_return"]))  # None: none ended
            # the moments name their snapshot: a kill between this checkpoint's two files is told apart on resume
            moments = {**optimizer_state(optimizer), "real_steps": torch.tensor(steps)}
            save_checkpoint(_last(out), policy, POLICY, state, moments)
            write_json_atomic(out / SNAPSHOTS, snapshots)

        budget = dataclasses.replace(
            ppo,
            seed=seed,
            rollout_steps=state["rollout_steps"],
            total_steps=10**12 if cap is None else cap - done_steps,
            max_minutes=config.minutes - (time.monotonic() - began) / 60,
        )
        figures = optimise(
            envs,
            policy,
            budget,
            logger,
            observe=observe,
            step_offset=done_steps,
            after_update=snapshot,
            log_prefix="real_ppo/train",
            optimizer=optimizer,
        )
        snapshot(int(figures["steps"]), figures, final=True)
    finally:
        envs.close()
    return _finish(out, state)


def _last(out: Path) -> Path:
    """Where a training keeps its newest snapshot's policy with its Adam moments, and its bookkeeping (`state`):
    what a killed training resumes from, and a finished one's figures."""
    return resumable(out / POLICY)


def step_cap(config: RealPPOConfig, batch: int) -> int | None:
    """The real steps `config.max_steps` lets a training take in updates of `batch` steps: whole updates, at least
    one. None: no cap."""
    return None if config.max_steps is None else max(batch, config.max_steps // batch * batch)


def budget_spent(last: dict[str, Any], config: RealPPOConfig, cap: int | None) -> bool:
    """Whether a training whose last snapshot is `last` has used its budget: its minutes, or its `step_cap`."""
    return (cap is not None and last["real_steps"] >= cap) or last["wall_s"] >= 60 * config.minutes


def _settings(
    source: SourceConfig, ppo: PPOConfig, config: RealPPOConfig, tokenizer: str
) -> dict[str, dict[str, object]]:
    """What a training is made with, as its JSON reads back: a resumed training must be made with the same."""
    parts = {"source": source, "ppo": ppo, "real": config}
    made = {name: dataclasses.asdict(part) for name, part in parts.items()}
    return json.loads(json.dumps({**made, "tokenizer": {"fingerprint": tokenizer}}))


def _earlier(out: Path, settings: dict[str, dict[str, object]]) -> dict | None:
    """The bookkeeping of the training in `out` made with `settings`, finished or killed; None where `out` holds
    none. One made with other settings, or from before trainings kept their bookkeeping, is refused: never
    overwritten, never mixed with this one."""
    last = _last(out).with_suffix(".json")
    if not last.is_file():
        if (out / SNAPSHOTS).exists():
            raise ConfigError(
                f"{out} holds an earlier real-simulator training ({SNAPSHOTS}); move it away to train again, or "
                "score it with `worldmodel bench baseline`"
            )
        return None  # nothing, or a training killed before its first snapshot
    state = read_json(last)
    differ = sorted(
        f"{part}.{key}" for part, values in settings.items() for key in values if _made(state, part, key) != values[key]
    )
    if differ:
        raise ConfigError(
            f"{out} holds a real-simulator training made with other {', '.join(differ)}; give the same settings to "
            "resume or score it, or move it away to train again"
        )
    return state


def _made(state: dict, part: str, key: str) -> object:
    return state.get("settings", {}).get(part, {}).get(key)


def _restore(out: Path, last: dict[str, object], policy: ActorCritic, optimizer: torch.optim.Optimizer) -> None:
    """The policy of the snapshot `last`, and its Adam moments where `policy_last` holds that snapshot's (a kill
    between that checkpoint's two files can leave the next snapshot's there: then Adam starts afresh)."""
    kept, _, _ = load_module(out / str(last["checkpoint"]), POLICY, ActorCritic, PolicyConfig)
    policy.load_state_dict(kept.state_dict())
    _, _, moments = load_module(_last(out), POLICY, ActorCritic, PolicyConfig)
    if int(moments.pop("real_steps", torch.tensor(-1))) == last["real_steps"]:
        restore_optimizer(optimizer, moments)
    else:
        tqdm.write(f"{_last(out)} is not of the last snapshot's step: Adam's moments start afresh")


def _finish(out: Path, state: dict) -> dict[str, object]:
    """The figures of a training whose bookkeeping is `state`, marked finished, with `snapshots.json` written."""
    if not state["finished"]:  # resumed past its budget: nothing left to train
        state["finished"] = True
        write_meta(_last(out), state)  # read from there: its sidecar whole
    write_json_atomic(out / SNAPSHOTS, state["snapshots"])
    last = state["snapshots"][-1]
    return {
        "rollout_steps": state["rollout_steps"],
        "real_steps": last["real_steps"],
        "steps_per_second": last["real_steps"] / max(last["wall_s"], 1e-9),
        "episode_return": state["episode_return"],
        "snapshots": state["snapshots"],
        **({"resumed": state["resumed"]} if state["resumed"] else {}),
    }
