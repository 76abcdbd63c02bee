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
"""

from __future__ import annotations

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

# probe actions per source, in groups that are compared with each other
PROBES: dict[str, dict[str, dict[str, Any]]] = {
    "carracing": {
        "steering": {"left": [-1.0, 0.3, 0.0], "straight": [0.0, 0.3, 0.0], "right": [1.0, 0.3, 0.0]},
        "throttle": {"gas": [0.0, 1.0, 0.0], "brake": [0.0, 0.0, 0.8]},
    },
    "highway": {
        "steering": {"lane_left": 0, "idle": 1, "lane_right": 2},
        "throttle": {"faster": 3, "slower": 4},
    },
}


class ProbeUnavailable(DatasetError):
    """The dataset records no simulator to restore its states in (user-written or synthetic data)."""


RESTORE_TOLERANCE = 1.0  # mean absolute pixel difference allowed between a restored and a recorded frame


@dataclass
class ProbeConfig:
    states: int = 12
    """Recorded start states, drawn from held-out episodes."""
    horizon: int = 8
    """Steps each probe action is held."""
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


def _real_rollouts(
    dataset: Dataset, source: SourceConfig, starts: list[_Start], probes: list[Any], horizon: int
) -> np.ndarray:
    """(S, P, H, W, C) uint8: the simulator's frame after holding each probe for `horizon` steps."""
    env = make_source_env(SourceConfig(source.name, source.frame_size, source.action_repeat, max_steps=None))
    finals = []
    try:
        for start in tqdm(starts, desc="probe simulator", unit="state", dynamic_ncols=True):
            episode = dataset.load(start.episode)
            recorded = episode.actions[: start.step]
            row = []
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
                for _ in range(horizon):
                    frame, *_ = env.step(action)
                row.append(frame)
            finals.append(np.stack(row))
    finally:
        env.close()
    return np.stack(finals)


@torch.no_grad()
def _dream_rollouts(
    world: WorldModel, dataset: Dataset, starts: list[_Start], probes: list[Any], config: ProbeConfig
) -> np.ndarray:
    """(S, P, H, W, C) uint8: the dream's frame after holding each probe, from the same real context."""
    context = world.dynamics.config.context_frames - 1
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
    for _ in range(config.horizon):
        step = world.imagine(cache, current, probe_actions, sampling=config.sampling, generator=generator)
        current = step.tokens
    frames = world.tokenizer.tokens_to_frames(current).cpu().numpy()
    return frames.reshape(len(starts), n_probes, *frames.shape[1:])


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
    groups = PROBES[source.name]
    held_out = world.meta.get("val_episodes") or list(range(len(dataset)))
    starts = _starts(dataset, held_out, world.dynamics.config.context_frames - 1, config)
    names = [name for group in groups.values() for name in group]
    probes = [action for group in groups.values() for action in group.values()]
    real = _real_rollouts(dataset, source, starts, probes, config.horizon)
    dream = _dream_rollouts(world, dataset, starts, probes, config)
    figures: dict[str, Any] = {"states": len(starts), "horizon": config.horizon}
    for group_name, group in groups.items():
        index = [names.index(name) for name in group]
        figures[group_name] = _group_figures(real[:, index], dream[:, index])
    return figures
