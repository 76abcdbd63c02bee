"""Score policies in the real simulator: the dream-trained policy (seeing real frames through the same
tokenizer), a uniformly random policy, the scripted expert and, where the source has one, its steady action held
throughout (`Source.steady_action`), on the same held-out tracks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from envs.sources import SourceConfig, make_expert, make_source_env
from worldmodel.checkpoint import CheckpointError, load_module
from worldmodel.config import ConfigError, whole
from worldmodel.parallel import imap_unordered
from worldmodel.run_dir import RunDir
from worldmodel.train import load_tokenizer

POLICIES = ("policy", "random", "expert")
STEADY = "steady"
"""The kind that holds the source's `steady_action` through every episode."""


def reference_kinds(source: SourceConfig) -> tuple[str, ...]:
    """What evaluation can score, and does by default: `POLICIES`, and the steady action where the source has one."""
    return POLICIES + ((STEADY,) if source.source.steady_action is not None else ())


@dataclass
class EvalConfig:
    episodes: int = 5
    seed: int = 1_000_000
    """Episode i runs on seed `seed + i`; these must not overlap the collection seeds."""
    workers: int = 2
    max_steps: int | None = None
    """Cap on recorded steps per episode (None: the simulator's full episode); only for quick tests."""
    deterministic: bool = True
    """Act with the most likely action (categorical) or the mean of the clipped Gaussian the policy was trained
    as (see `clipped_normal_mean`); False samples as in training."""


class TokenPolicy:
    """The trained actor-critic driving one real episode: each frame passes through the run's tokenizer, and the
    policy sees as many of the latest grids as it was trained on (`TokenHistory`). Make one for each episode."""

    def __init__(self, run_dir: Path, deterministic: bool, policy: Path | None = None):
        from agents.policy import ActorCritic, PolicyConfig, TokenHistory
        from agents.ppo import POLICY

        self.tokenizer, _ = load_tokenizer(RunDir(run_dir).tokenizer)
        self.policy, _, _ = load_module(policy or RunDir(run_dir).policy, POLICY, ActorCritic, PolicyConfig)
        self.policy.eval()
        self.deterministic = deterministic
        self.history = TokenHistory(self.policy.config.frames)

    @torch.no_grad()
    def __call__(self, frame: np.ndarray, space: gym.Space) -> np.ndarray | int:
        tokens = self.tokenizer.encode(torch.from_numpy(np.array(frame))[None]).tokens
        seen = self.history.start(tokens) if self.history.grids is None else self.history.push(tokens)
        return self.policy.action_for(seen[0], space, self.deterministic)


def check_policy_fits(run_dir: Path, source: SourceConfig, policy: Path | None = None) -> None:
    """Refuse, before any episode, a policy checkpoint that cannot drive `source` through the run's tokenizer: another
    action space (a CarRacing policy on highway), or another token grid."""
    from agents.policy import ActorCritic, PolicyConfig
    from agents.ppo import POLICY

    path = policy or RunDir(run_dir).policy
    actor, _, _ = load_module(path, POLICY, ActorCritic, PolicyConfig)
    tokenizer, _ = load_tokenizer(RunDir(run_dir).tokenizer)
    env = make_source_env(source)
    space = env.action_space
    env.close()
    config = actor.config
    fits = (config.discrete_actions and isinstance(space, gym.spaces.Discrete) and config.action_dim == space.n) or (
        not config.discrete_actions and isinstance(space, gym.spaces.Box) and (config.action_dim,) == space.shape
    )
    if not fits:
        kind = "discrete" if config.discrete_actions else "continuous"
        raise CheckpointError(f"{path} is a policy of {config.action_dim} {kind} actions; {source.name} takes {space}")
    grid = (tokenizer.config.grid_size, tuple(tokenizer.config.levels))
    if (config.grid_size, tuple(config.levels)) != grid:
        raise CheckpointError(
            f"{path} reads {config.grid_size}x{config.grid_size} token grids of levels {tuple(config.levels)}; the "
            f"run's tokenizer writes {grid[0]}x{grid[0]} of levels {grid[1]}"
        )


def make_driver(
    kind: str, env: gym.Env, run_dir: Path, source: SourceConfig, deterministic: bool = True, policy: Path | None = None
) -> Callable[[np.ndarray], np.ndarray | int]:
    """`act(frame) -> action` for one of `reference_kinds(source)` driving `env`: the run's policy on the frame
    (`policy`: another checkpoint of it), uniform random actions from `env`'s action space (seed it), the scripted
    expert reading `env`'s state, or the source's steady action. Call it afresh for each episode."""
    if kind == "policy":
        actor = TokenPolicy(run_dir, deterministic, policy)
        return lambda frame: actor(frame, env.action_space)
    if kind == "expert":
        expert = make_expert(source)
        expert.reset()
        return lambda frame: expert.act(env)
    if kind == STEADY:
        steady = source.source.steady_action
        if steady is None:
            raise ValueError(f"{source.name} has no steady action; expected a kind of {reference_kinds(source)}")
        return lambda frame: steady[1]
    if kind == "random":
        return lambda frame: env.action_space.sample()
    raise ValueError(f"unknown driver {kind!r}; expected one of {reference_kinds(source)}")


def _episode(args: tuple[str, str, SourceConfig, EvalConfig, int, str | None]) -> tuple[str, int, float, int, bool]:
    kind, run_dir, source, config, seed, policy = args
    torch.set_num_threads(1)
    env = make_source_env(dataclasses.replace(source, max_steps=config.max_steps))
    env.action_space.seed(seed)
    act = make_driver(kind, env, Path(run_dir), source, config.deterministic, policy and Path(policy))
    obs, info = env.reset(seed=seed)
    total, steps = info.get("intro_reward", 0.0), 0
    while True:
        obs, reward, terminated, truncated, info = env.step(act(obs))
        total += reward
        steps += 1
        if terminated or truncated:
            break
    env.close()
    return kind, seed, float(total), steps, bool(info.get("crashed", False))


def evaluate(
    run_dir: str | Path,
    source: SourceConfig,
    config: EvalConfig,
    used_seeds: list[int],
    kinds: tuple[str, ...] | None = None,
    policy: Path | None = None,
) -> dict[str, dict]:
    """Returns per policy: mean, std, per-episode returns and seeds, and `crashes`, the episodes that ended in a
    crash (highway-env's `info["crashed"]`; a source without crashes counts none), and the real `steps` driven. Refuses
    seeds used for collection. `kinds` defaults to `reference_kinds(source)`; `policy` is the policy checkpoint to
    score (default: the run's)."""
    known = reference_kinds(source)
    kinds = known if kinds is None else kinds
    if isinstance(kinds, str) or not kinds:
        raise ConfigError(f"kinds: expected a tuple of some of {known}, got {kinds!r}")
    for name, value in (("episodes", config.episodes), ("workers", config.workers)):
        if not whole(value, 1):
            raise ConfigError(f"eval.{name}: expected an integer of at least 1, got {value!r}")
    if set(kinds) - set(known):
        raise ConfigError(f"cannot score {sorted(set(kinds) - set(known))} on {source.name}; expected some of {known}")
    seeds = [config.seed + i for i in range(config.episodes)]
    overlap = sorted(set(seeds) & set(used_seeds))
    if overlap:
        raise ConfigError(
            f"evaluation seeds {overlap[:5]} were used to collect training data; choose eval.seed elsewhere"
        )
    if "policy" in kinds:
        check_policy_fits(Path(run_dir), source, policy)
    tasks = [(kind, str(run_dir), source, config, seed, policy and str(policy)) for kind in kinds for seed in seeds]
    results: dict[str, dict[int, float]] = {kind: {} for kind in kinds}
    crashed: dict[str, set[int]] = {kind: set() for kind in kinds}
    steps: dict[str, int] = {kind: 0 for kind in kinds}
    progress = tqdm(
        total=len(tasks), desc=f"evaluate in real {source.name}", unit="episode", dynamic_ncols=True, leave=False
    )
    for kind, seed, ret, length, crash in imap_unordered(_episode, tasks, config.workers):
        results[kind][seed] = ret
        steps[kind] += length
        if crash:
            crashed[kind].add(seed)
        progress.update()
    progress.close()
    summary = {}
    for kind in kinds:
        returns = [results[kind][s] for s in seeds]
        summary[kind] = {
            "mean": float(np.mean(returns)),
            "std": float(np.std(returns)),
            "returns": returns,
            "seeds": seeds,
            "crashes": len(crashed[kind]),
            "steps": steps[kind],
        }
    return summary
