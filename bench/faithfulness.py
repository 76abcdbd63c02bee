"""Action faithfulness: does the dream respond to an action the way the real simulator does?

From recorded states of held-out episodes, each probe action (steer left, straight, steer right; gas, brake)
is held for a few steps twice: in the real simulator, restored to the recorded state by replaying the
episode's seed and actions (both sources are deterministic, and the restored frame is checked against the
recorded one), and in the dream, given the same real context frames. Two figures per group of probes:

- `match_accuracy`: how often the dream's final frame under action a is closer (pixel MSE) to the
  simulator's final frame under a than under any other probe of the group. A model that ignores its
  actions imagines the same frame for every probe, so it scores chance, 1 / (probes in the group).
- `response_ratio`: how far apart the dream's final frames under different probes are, over how far apart
  the simulator's are (mean absolute pixel difference over pairs). 1 responds as strongly as the
  simulator; 0 ignores the actions. With a sampling temperature above 0 the dream's frames also differ by
  chance, so only `match_accuracy` stays a clean figure there.
- `returns` and `ends`, per probe: the return earned while it was held, and the share of states from which the
  episode terminated (a crash; the simulator's time limit does not count) before the probe had been held
  `horizon` steps, in the simulator and in the dream. On highway a dream can tell FASTER from SLOWER and still
  not foresee the crash that holding FASTER leads to. Both stop a probe where its episode ends, and keep its
  last frame.

The standing start (`standing_start`, CarRacing only): every real episode, and a `ppo.start_fraction` of PPO's
dreams (half in the tiny preset), begin at an episode's first frame with the car at rest. The throttle probes
are held for `start_horizon` steps from the first frame of held-out episodes, with that one frame as the
dream's context, and scored as above, with the return each probe earned in the simulator and in the dream
(`returns`), and `return_gap_ratio`: the dream's gas-minus-brake return over the simulator's (1 when the dream
pays for the throttle as the simulator does, 0 when it pays nothing for it). It catches what the probes
mid-episode can miss: the dream of one fresh-clone run scored 0.64 and 0.75 on the groups above, its car
barely pulled away from rest under gas (gas 8.0 against brake 4.5 over 16 steps; the simulator +30.1 and -6.4)
and its policy braked to a stop. It does not predict a policy in general (docs/bench_dynamics.md).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from envs.sources import SourceConfig, make_source_env
from worldmodel.config import from_dict
from worldmodel.dataset import Dataset, DatasetError
from worldmodel.world_model import Sampling, WorldModel


class ProbeUnavailable(DatasetError):
    """The dataset records no simulator to restore its states in (user-written or synthetic data)."""


RESTORE_TOLERANCE = 1.0  # mean absolute pixel difference allowed between a restored and a recorded frame


@dataclass
class ProbeConfig:
    states: int = 12
    """Recorded start states, drawn from held-out episodes."""
    horizon: int = 8
    """Steps each probe action is held."""
    start_episodes: int = 12
    """Held-out episodes probed from their first frame, the car at rest (0: no standing-start probe)."""
    start_horizon: int = 16
    """Steps each probe is held from a standing start (16 recorded steps: 64 simulator steps)."""
    sampling: Sampling = field(default_factory=Sampling)
    """How the dream draws its tokens (greedy by default)."""
    seed: int = 0


@dataclass
class _Start:
    episode: int
    seed: int
    step: int  # the recorded frame the probes start from


def _starts(dataset: Dataset, episodes: list[int], context: int, config: ProbeConfig) -> list[_Start]:
    rng = np.random.default_rng(config.seed)
    candidates = [i for i in episodes if dataset.episodes[i].seed is not None]
    candidates = [i for i in candidates if dataset.episodes[i].length >= context + config.horizon]
    if not candidates:
        raise DatasetError(
            f"no held-out episode of {dataset.root} has a seed and at least {context + config.horizon} steps "
            "to probe from"
        )
    starts = []
    for _ in range(config.states):
        index = int(rng.choice(candidates))
        step = int(rng.integers(context - 1, dataset.episodes[index].length - config.horizon + 1))
        starts.append(_Start(index, int(dataset.episodes[index].seed), step))
    return starts


def _standing_starts(dataset: Dataset, episodes: list[int], count: int) -> list[_Start]:
    """The first frames of up to `count` of `episodes` that record their seed, in order."""
    seeded = [i for i in episodes if dataset.episodes[i].seed is not None][:count]  # `_starts` found some
    return [_Start(i, int(dataset.episodes[i].seed), 0) for i in seeded]


def _real_rollouts(
    dataset: Dataset, source: SourceConfig, starts: list[_Start], probes: list[Any], horizon: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The simulator's frame after holding each probe for `horizon` steps or until its episode ended, (S, P, H, W,
    C) uint8, the return it earned meanwhile, (S, P), and whether the episode terminated (a crash, not the time
    limit, which a dream does not know), (S, P) bool."""
    env = make_source_env(dataclasses.replace(source, max_steps=None))
    finals, returns, ends = [], [], []
    try:
        for start in tqdm(starts, desc="probe simulator", unit="state", dynamic_ncols=True):
            episode = dataset.load(start.episode)
            recorded = episode.actions[: start.step]
            row, earned, ended = [], [], []
            for probe in probes:
                action = np.array(probe, dtype=np.float32) if isinstance(probe, list) else probe
                frame = env.replay(start.seed, recorded)
                error = np.abs(frame.astype(np.float32) - episode.frames[start.step]).mean()
                if error > RESTORE_TOLERANCE:
                    raise RuntimeError(
                        f"replaying episode {dataset.episodes[start.episode].name} (seed {start.seed}) to step "
                        f"{start.step} gave a frame {error:.1f} levels off the recorded one; counterfactual "
                        "probes need the simulator and collection settings that recorded the dataset"
                    )
                total, terminated = 0.0, False
                for _ in range(horizon):
                    frame, reward, terminated, truncated, _ = env.step(action)
                    total += float(reward)
                    if terminated or truncated:
                        break
                row.append(frame)
                earned.append(total)
                ended.append(bool(terminated))
            finals.append(np.stack(row))
            returns.append(earned)
            ends.append(ended)
    finally:
        env.close()
    return np.stack(finals), np.array(returns), np.array(ends)


@torch.no_grad()
def _dream_rollouts(
    world: WorldModel,
    dataset: Dataset,
    starts: list[_Start],
    probes: list[Any],
    config: ProbeConfig,
    horizon: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dream's frame after holding each probe for `horizon` steps from the same real context or until it ended
    the episode, (S, P, H, W, C) uint8, the return it imagined meanwhile, (S, P), and whether it ended the episode,
    (S, P) bool. The context is the frames up to each start, as many as the model takes and the earliest start has
    (one from an episode's first frame)."""
    context = min(min(start.step for start in starts) + 1, world.dynamics.config.context_frames - 1)
    tokens, actions = [], []
    for start in starts:
        episode = dataset.load(start.episode)
        first = start.step - context + 1
        frames = torch.from_numpy(np.array(episode.frames[first : start.step + 1])).to(world.device)
        tokens.append(world.tokenizer.encode(frames).tokens)
        actions.append(np.array(episode.actions[first : start.step]))
    n_probes = len(probes)
    batch = len(starts) * n_probes
    context_tokens = torch.stack(tokens).repeat_interleave(n_probes, 0)  # (S * P, C, h, w)
    context_actions = world.action_tensor(np.stack(actions)).repeat_interleave(n_probes, 0)
    probe_actions = world.action_tensor(np.array(probes * len(starts)))  # row s * P + p holds probe p
    cache = world.dynamics.new_cache(batch)
    world.burn_in(cache, context_tokens, context_actions, torch.arange(batch, device=world.device))
    current = context_tokens[:, -1]
    generator = torch.Generator(world.device).manual_seed(config.seed)
    returns = torch.zeros(batch, device=world.device)
    alive = torch.ones(batch, dtype=torch.bool, device=world.device)
    for _ in range(horizon):
        step = world.imagine(cache, current, probe_actions, sampling=config.sampling, generator=generator)
        current = torch.where(alive[:, None, None], step.tokens, current)  # an ended dream keeps its last frame
        returns += step.reward * alive
        alive &= ~step.terminated
    frames = world.tokenizer.tokens_to_frames(current).cpu().numpy()
    shape = (len(starts), n_probes)
    return (
        frames.reshape(*shape, *frames.shape[1:]),
        returns.cpu().numpy().reshape(shape),
        (~alive).cpu().numpy().reshape(shape),
    )


def _group_figures(real: np.ndarray, dream: np.ndarray) -> dict[str, float]:
    """real, dream: (S, P, H, W, C) final frames of one group's probes."""
    real, dream = real.astype(np.float32) / 255, dream.astype(np.float32) / 255
    # distance[s, a, b]: dream under probe a against the simulator under probe b
    distance = ((dream[:, :, None] - real[:, None, :]) ** 2).mean(axis=(3, 4, 5))
    n = real.shape[1]
    # a dream that imagines one frame whatever the probe is closest to one simulator frame: it matches 1 in n
    match = (distance.argmin(axis=2) == np.arange(n)[None, :]).mean()
    pairs = list(itertools.combinations(range(n), 2))
    real_spread = np.mean([np.abs(real[:, a] - real[:, b]).mean() for a, b in pairs])
    dream_spread = np.mean([np.abs(dream[:, a] - dream[:, b]).mean() for a, b in pairs])
    return {
        "match_accuracy": float(match),
        "chance": 1.0 / n,
        "response_ratio": float(dream_spread / max(real_spread, 1e-8)),
        "real_spread": float(real_spread),
        "dream_spread": float(dream_spread),
    }


def _per_probe(group: dict[str, Any], real: np.ndarray, dream: np.ndarray) -> dict[str, dict[str, float]]:
    """real, dream: (S, P) figures of one group's probes -> their means by probe name, in the simulator and the
    dream."""
    return {
        "real": {name: float(v) for name, v in zip(group, real.mean(axis=0), strict=True)},
        "dream": {name: float(v) for name, v in zip(group, dream.mean(axis=0), strict=True)},
    }


def action_faithfulness(
    run_dir: str | Path,
    dataset_dir: str | Path,
    config: ProbeConfig | None = None,
    world: WorldModel | None = None,
) -> dict[str, Any]:
    """Probe the run's dream against the real simulator; returns figures per probe group (see module doc)."""
    config = config or ProbeConfig()
    world = world or WorldModel.load(run_dir, with_contexts=False)
    dataset = Dataset.open(dataset_dir)
    collect_meta = dataset.manifest.meta.get("collect", {})
    if "source" not in collect_meta:
        raise ProbeUnavailable(f"{dataset.root}/manifest.json records no collection source; cannot restore its states")
    source = from_dict(SourceConfig, collect_meta["source"])
    groups = source.source.probes
    held_out = world.meta.get("val_episodes") or list(range(len(dataset)))
    starts = _starts(dataset, held_out, world.dynamics.config.context_frames - 1, config)
    names = [name for group in groups.values() for name in group]
    probes = [action for group in groups.values() for action in group.values()]
    real, real_returns, real_ends = _real_rollouts(dataset, source, starts, probes, config.horizon)
    dream, dream_returns, dream_ends = _dream_rollouts(world, dataset, starts, probes, config, config.horizon)
    figures: dict[str, Any] = {"states": len(starts), "horizon": config.horizon}
    for group_name, group in groups.items():
        index = [names.index(name) for name in group]
        figures[group_name] = {
            **_group_figures(real[:, index], dream[:, index]),
            "returns": _per_probe(group, real_returns[:, index], dream_returns[:, index]),
            "ends": _per_probe(group, real_ends[:, index], dream_ends[:, index]),
        }
    standing = source.source.standing_start_group
    if standing and config.start_episodes > 0:
        figures["standing_start"] = _standing_start(world, dataset, source, held_out, groups[standing], config)
    return figures


def _standing_start(
    world: WorldModel,
    dataset: Dataset,
    source: SourceConfig,
    episodes: list[int],
    group: dict[str, Any],
    config: ProbeConfig,
) -> dict[str, Any]:
    """The group's probes held from the first frame of held-out episodes, in the simulator and the dream."""
    starts = _standing_starts(dataset, episodes, config.start_episodes)
    probes = list(group.values())
    real, real_returns, _ = _real_rollouts(dataset, source, starts, probes, config.start_horizon)
    dream, dream_returns, _ = _dream_rollouts(world, dataset, starts, probes, config, config.start_horizon)
    returns = _per_probe(group, real_returns, dream_returns)
    (real_gas, *_, real_brake), (dream_gas, *_, dream_brake) = returns["real"].values(), returns["dream"].values()
    real_gap = real_gas - real_brake
    return {
        "episodes": len(starts),
        "horizon": config.start_horizon,
        **_group_figures(real, dream),
        "returns": returns,
        "return_gap_ratio": (dream_gas - dream_brake) / real_gap if real_gap else None,
    }
