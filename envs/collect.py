"""Record episodes from a real simulator with a scripted expert plus exploration, in parallel processes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from envs.sources import SourceConfig, make_expert, make_source_env
from worldmodel.config import from_dict
from worldmodel.dataset import Dataset, DatasetError, Episode, EpisodeRecord, write_episode
from worldmodel.parallel import imap_unordered


@dataclass
class CollectConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    episodes: int = 40
    workers: int = 2
    seed: int = 0
    """Episode i is driven on track/scenario seed `seed + i`."""
    random_fraction: float = 0.1
    """Fraction of episodes driven by uniformly random actions."""
    action_noise: float = 0.1
    """Gaussian noise std on the expert's continuous actions; for discrete actions, the chance of a random one."""
    perturb_prob: float = 0.03
    """Per-step chance that a perturbation starts: a random action held for a few steps (spins, leaving the road)."""
    perturb_steps: tuple[int, int] = (3, 12)
    start_perturb_prob: float = 0.0
    """Chance that an expert episode opens with a perturbation, so the data also shows the car at a standstill
    under other actions than the expert's first ones (idling, braking, steering in place)."""


def episode_name(index: int) -> str:
    return f"{index:06d}"


class _Driver:
    """Expert actions with noise, random perturbation segments, or fully random actions, from one seed."""

    def __init__(self, config: CollectConfig, env: gym.Env, seed: int):
        self.config = config
        self.env = env
        self.rng = np.random.default_rng(seed)
        self.space = env.action_space
        self.space.seed(int(self.rng.integers(2**31)))
        self.expert = make_expert(config.source)
        self.expert.reset()
        self.kind = "random" if self.rng.random() < config.random_fraction else "expert"
        self.held: np.ndarray | int | None = None
        self.held_dims: np.ndarray | None = None
        self.hold_left = 0
        self.decision: np.ndarray | int | None = None
        if self.kind == "expert" and self.rng.random() < config.start_perturb_prob:
            self._perturb()

    def _perturb(self) -> None:
        self.held = self.space.sample()
        self.hold_left = int(self.rng.integers(*self.config.perturb_steps, endpoint=True))
        if isinstance(self.space, gym.spaces.Box):
            # randomise a random subset of the action's parts (throttle alone, steering alone, ...), so the
            # data shows each part's effect apart from the state the expert chose it in
            self.held_dims = self.rng.random(self.space.shape) < 0.5
            self.held_dims[self.rng.integers(self.space.shape[0])] = True

    def act(self) -> np.ndarray | int:
        # the expert decides on every step, whatever drives: its decision, as the simulator would take it, is the
        # step's label (`decision`), and asking it each step keeps its internal state in step with the simulator
        action = self.expert.act(self.env)
        self.decision = executed(action, self.space, self.config.source.pedals)
        if self.kind == "random":
            return self.space.sample()
        if self.hold_left == 0 and self.rng.random() < self.config.perturb_prob:
            self._perturb()
        if self.hold_left > 0:
            self.hold_left -= 1
            if isinstance(self.space, gym.spaces.Box):
                return one_pedal(np.where(self.held_dims, self.held, action), self.config.source.pedals)
            return self.held
        if isinstance(self.space, gym.spaces.Discrete):
            return self.space.sample() if self.rng.random() < self.config.action_noise else int(action)
        noisy = action + self.rng.normal(0, self.config.action_noise, size=action.shape)
        return one_pedal(np.clip(noisy, self.space.low, self.space.high), self.config.source.pedals)


def one_pedal(action: np.ndarray, pedals: tuple[int, int] | None) -> np.ndarray:
    """Gas and brake pressed together become their difference on one pedal.

    Noise on the expert's zero brake would otherwise press it half the time, and a uniformly random action
    presses both pedals at once nearly always: in such data the car is almost never seen rolling with no
    pedal pressed, and a model trained on it is free to imagine a car that drives off without gas. The
    difference of two uniform pedals is often near zero, so perturbations now show idling and coasting too.
    Fully random episodes keep raw uniform actions, so both pedals together are still in the data."""
    if pedals is None:
        return action.astype(np.float32)
    gas, brake = pedals
    net = action[gas] - action[brake]
    action = action.copy()
    action[gas], action[brake] = max(net, 0.0), max(-net, 0.0)
    return action.astype(np.float32)


def executed(action: np.ndarray | int, space: gym.Space, pedals: tuple[int, int] | None) -> np.ndarray | int:
    """A scripted driver's action as the collection executes it when it adds no noise: an int for a Discrete
    space; clipped to the Box and on one pedal (`one_pedal`) for a Box."""
    if isinstance(space, gym.spaces.Discrete):
        return int(action)
    return one_pedal(np.clip(action, space.low, space.high), pedals)


class ExpertLabels:
    """`record_episode`'s `label` for an episode something else drives (a policy): the source's scripted driver's
    decision in each step's state, as it would have executed it."""

    def __init__(self, source: SourceConfig, env: gym.Env):
        self.expert = make_expert(source)
        self.expert.reset()
        self.env = env
        self.pedals = source.pedals

    def __call__(self) -> np.ndarray | int:
        return executed(self.expert.act(self.env), self.env.action_space, self.pedals)


_worker_envs: dict[SourceConfig, gym.Env] = {}


def record_episode(
    env: gym.Env,
    act: Callable[[np.ndarray], np.ndarray | int],
    seed: int,
    label: Callable[[], np.ndarray | int] | None = None,
) -> tuple[Episode, float]:
    """Drive one episode on `seed` with `act(observation) -> action`; returns it and the reward of the steps the
    source skipped at reset (CarRacing's zoom-in; see `DrivingFrames`), so that the two add up to the return.
    `label()`, called after each `act` in the same state, gives the step's `expert_actions`."""
    obs, info = env.reset(seed=seed)
    frames, actions, rewards, terminated, truncated, labels = [obs], [], [], [], [], []
    while True:
        action = act(obs)
        if label is not None:
            labels.append(label())
        obs, reward, term, trunc, _ = env.step(action)
        frames.append(obs)
        actions.append(action)
        rewards.append(reward)
        terminated.append(term)
        truncated.append(trunc)
        if term or trunc:
            break
    dtype = np.int64 if isinstance(env.action_space, gym.spaces.Discrete) else np.float32
    episode = Episode(
        frames=np.stack(frames),
        actions=np.array(actions, dtype=dtype),
        rewards=np.array(rewards, dtype=np.float32),
        terminated=np.array(terminated, dtype=bool),
        truncated=np.array(truncated, dtype=bool),
        expert_actions=None if label is None else np.array(labels, dtype=dtype),
    )
    return episode, float(info.get("intro_reward", 0.0))


def worker_env(source: SourceConfig) -> gym.Env:
    """One simulator per source config and process, reused across the episodes the process records."""
    env = _worker_envs.get(source)
    if env is None:
        env = _worker_envs[source] = make_source_env(source)
    return env


def _record(config: CollectConfig, root: str, index: int) -> EpisodeRecord:
    env = worker_env(config.source)
    seed = config.seed + index
    driver = _Driver(config, env, seed)
    episode, intro = record_episode(env, lambda obs: driver.act(), seed, label=lambda: driver.decision)
    write_episode(root, episode_name(index), episode)
    ret = float(episode.rewards.sum())
    return EpisodeRecord(episode_name(index), len(episode), seed, ret, driver.kind, intro_reward=intro)


def _record_star(args: tuple[CollectConfig, str, int]) -> EpisodeRecord:
    return _record(*args)


def _drawn_alike(source: SourceConfig) -> SourceConfig:
    """The settings that decide how a recorded step looks: all but the episode length (`max_steps`), which the
    dream-to-real loop changes for the episodes it appends."""
    return dataclasses.replace(source, max_steps=None)


def collect(config: CollectConfig, root: str | Path) -> Dataset:
    """Record `config.episodes` episodes into the dataset at `root`, resuming where an earlier run stopped."""
    probe = make_source_env(config.source)
    dataset = Dataset.create(
        root,
        config.source.name,
        probe.observation_space.shape,
        probe.action_space,
        meta={"collect": dataclasses.asdict(config)},
    )
    probe.close()
    recorded = dataset.manifest.meta.get("collect", {}).get("source")
    if recorded is not None and _drawn_alike(from_dict(SourceConfig, recorded)) != _drawn_alike(config.source):
        raise DatasetError(
            f"{root} holds frames recorded with source settings {recorded}, not {dataclasses.asdict(config.source)};"
            " frames drawn otherwise would mix in one dataset: use another folder"
        )
    done = {record.name for record in dataset.episodes}
    todo = [i for i in range(config.episodes) if episode_name(i) not in done]
    if todo:
        _record_all(dataset, config, root, todo)
    names = [record.name for record in dataset.episodes]
    if names != sorted(names):  # in episode order, also where a kill came between the last episode and this sort
        dataset.manifest.episodes.sort(key=lambda r: r.name)
        dataset.save_manifest()
    return dataset


def _record_all(dataset: Dataset, config: CollectConfig, root: str | Path, todo: list[int]) -> None:
    """Record episodes `todo` into `dataset`, each added to its manifest as soon as it ends."""
    tasks = [(config, str(root), i) for i in todo]
    progress = tqdm(
        total=config.episodes,
        initial=config.episodes - len(todo),
        desc=f"collect {config.source.name}",
        unit="episode",
        dynamic_ncols=True,
    )
    try:
        for record in imap_unordered(_record_star, tasks, config.workers):
            dataset.add(record)
            progress.update()
            progress.set_postfix(ret=f"{record.ret:.0f}", kind=record.kind)
    finally:
        progress.close()
