"""`worldmodel bench verdict`: what a run's dream makes of real driving it did not see, driver by driver.

The reference drivers of evaluation (the run's policy, the random policy, the scripted expert and, where the
source has one, its steady action) each drive held-out episodes in the real simulator; the dream then replays
every episode window by window, from the window's real frames with its recorded actions, as PPO dreams
(`agents.loop.replay_windows`). Per driver it reports what the dream pays against what the simulator paid over the
recorded steps (CarRacing's zoom-in reward, which evaluation adds, is not one of them), and whether the dream ends
the windows the simulator ended:

- `caught`: the episode terminated in the window (a crash, not the time limit) and the dream ended it too, at the
  same step or before (`lead`: by how many steps);
- `missed`: the episode terminated in the window and the dream drove on to the window's last step;
- `false_ends`: the dream ended a window in which the episode did not terminate.

A dream in which PPO is to learn what the expert knows has to pay the expert's driving at least what it pays
braking, and to end the windows where real driving crashes: a policy is trained on exactly these two signals.

`foresight` asks whether the termination head would have seen the ends coming, step by step: over every driver's
windows, the ROC AUC of its probability against "the episode ends within the lookahead it was trained for" (1:
every end scored above every other step; 0.5: chance), by how far the step lies into its window, once with the
dream drawing its own frames (as PPO dreams) and once fed the real ones (as in training). The gap between the two
is what drift costs the head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.config import read_run_config
from agents.evaluate import make_driver, reference_kinds
from agents.loop import ReplayWindows, driven_seeds, replay_windows
from envs.collect import record_episode
from envs.sources import SourceConfig, make_source_env
from worldmodel.config import ConfigError
from worldmodel.dataset import Episode
from worldmodel.files import write_json_atomic
from worldmodel.parallel import imap_unordered
from worldmodel.run_dir import RunDir
from worldmodel.world_model import WorldModel


@dataclass
class VerdictConfig:
    episodes: int = 30
    """Held-out episodes each driver drives."""
    seed: int | None = None
    """Episode i runs on seed `seed + i` (None: the run's evaluation seeds, so the real returns are those of its
    evaluation)."""
    kinds: tuple[str, ...] | None = None
    """Drivers to judge (None: every kind evaluation scores on the run's source)."""
    workers: int = 2


def _record(args: tuple[str, str, SourceConfig, int]) -> tuple[str, int, Episode]:
    kind, run_dir, source, seed = args
    torch.set_num_threads(1)
    env = make_source_env(source)
    env.action_space.seed(seed)
    episode, _ = record_episode(env, make_driver(kind, env, Path(run_dir), source), seed)
    env.close()
    return kind, seed, episode


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """The probability that a labelled sample scores above an unlabelled one (ties count one half); NaN without both."""
    score, label = np.asarray(score, dtype=np.float64), np.asarray(label, dtype=bool)
    positives, negatives = int(label.sum()), int((~label).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based ranks, tied scores share their mean
    ranks = mean_rank[inverse]
    return float((ranks[label].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def end_labels(windows: ReplayWindows, episodes: list[Episode], lookahead: int) -> np.ndarray:
    """(W, longest window) True at the steps whose real episode terminates within `lookahead` steps (the step of the
    end included: the termination head's training target, `TokenizedDataset.foreseen_terminations`)."""
    width = 0 if windows.end_probability is None else windows.end_probability.shape[1]
    labels = np.zeros((len(windows.steps), width), dtype=bool)
    for w, (e, start) in enumerate(zip(windows.episode, windows.start, strict=True)):
        episode = episodes[e]
        if len(episode) and episode.terminated[-1]:
            index = start + np.arange(width)
            labels[w] = index >= len(episode) - lookahead
    return labels


def foresight_figures(
    replays: list[tuple[ReplayWindows, ReplayWindows, list[Episode]]], lookahead: int, horizon: int
) -> dict[str, Any]:
    """Termination-head ROC AUC, open loop against teacher-forced, by the step's place in its window, over the
    (open loop, teacher-forced, episodes) replays of every driver pooled."""
    scores: dict[str, list[np.ndarray]] = {"open_loop": [], "teacher_forced": []}
    labels, places = [], []
    for open_loop, forced, episodes in replays:
        valid = ~np.isnan(open_loop.end_probability)
        scores["open_loop"].append(open_loop.end_probability[valid])
        scores["teacher_forced"].append(forced.end_probability[valid])
        labels.append(end_labels(open_loop, episodes, lookahead)[valid])
        places.append(np.broadcast_to(np.arange(valid.shape[1]), valid.shape)[valid])
    label, place = np.concatenate(labels), np.concatenate(places)
    pooled = {mode: np.concatenate(parts) for mode, parts in scores.items()}
    edges = sorted({0, 1, 3, 8, horizon} & set(range(horizon + 1)))
    spans = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)] + [(0, horizon)]
    rows = []
    for lo, hi in spans:
        inside = (place >= lo) & (place < hi)
        rows.append(
            {
                "from": lo,
                "to": hi - 1,
                "steps": int(inside.sum()),
                "labelled": int(label[inside].sum()),
                **{mode: roc_auc(pooled[mode][inside], label[inside]) for mode in pooled},
            }
        )
    return {"lookahead": lookahead, "rows": rows}


def verdict_figures(windows: ReplayWindows, episodes: int) -> dict[str, Any]:
    """One driver's line from its episodes' replayed windows."""
    real_end, dream_end = windows.real_end >= 0, windows.dream_end >= 0
    caught = real_end & dream_end
    return {
        "episodes": episodes,
        "steps": int(windows.steps.sum()),
        "real_return": float(windows.real.sum() / episodes),
        "dream_return": float(windows.dream.sum() / episodes),
        "gap": float((windows.dream.sum() - windows.real.sum()) / episodes),
        "windows": len(windows.steps),
        "real_ends": int(real_end.sum()),
        "caught": int(caught.sum()),
        "lead": [int(x) for x in windows.real_end[caught] - windows.dream_end[caught]],
        "missed": int((real_end & ~dream_end).sum()),
        "false_ends": int((dream_end & ~real_end).sum()),
    }


def bench_verdict(run_dir: str | Path, config: VerdictConfig, json_path: str | Path | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if config.episodes < 1:
        raise ConfigError(f"episodes must be at least 1, got {config.episodes}")
    pipeline = read_run_config(run_dir)
    source = dataclasses.replace(pipeline.collect.source, max_steps=pipeline.eval.max_steps)  # as evaluation drives
    known = reference_kinds(source)
    kinds = known if config.kinds is None else tuple(config.kinds)
    unknown = sorted(set(kinds) - set(known))
    if not kinds or unknown:
        raise ConfigError(f"cannot judge drivers {unknown or 'none'} on {source.name}; expected some of {known}")
    first = pipeline.eval.seed if config.seed is None else config.seed
    seeds = list(range(first, first + config.episodes))
    seen = sorted(set(seeds) & set(driven_seeds(run_dir, RunDir(run_dir).dataset)))
    if seen:
        raise ConfigError(f"seeds {seen[:5]} were driven to make the run's data; choose --seed elsewhere")
    # before any simulator runs: a run without a world model stops here (dreams start from the episodes' frames)
    world = WorldModel.load(run_dir, "cpu", with_contexts=False)
    tasks = [(kind, str(run_dir), source, seed) for kind in kinds for seed in seeds]
    recorded: dict[str, dict[int, Episode]] = {kind: {} for kind in kinds}
    progress = tqdm(total=len(tasks), desc=f"drive real {source.name}", unit="episode", dynamic_ncols=True, leave=False)
    for kind, seed, episode in imap_unordered(_record, tasks, config.workers):
        recorded[kind][seed] = episode
        progress.update()
    progress.close()
    settings = pipeline.ppo.dream()
    horizon, burn_in = settings.horizon, settings.context_for(world.dynamics.config.context_frames)
    drivers, replays = {}, []
    for kind in kinds:
        episodes = [recorded[kind][s] for s in seeds]
        windows = replay_windows(world, episodes, horizon, burn_in)
        drivers[kind] = verdict_figures(windows, len(seeds))
        replays.append((windows, replay_windows(world, episodes, horizon, burn_in, teacher_forced=True), episodes))
    lookahead = pipeline.dynamics.termination_lookahead
    figures = {
        "run": str(run_dir),
        "source": source.name,
        "seeds": seeds,
        "horizon": horizon,
        "burn_in": burn_in,
        "config": dataclasses.asdict(config),
        "drivers": drivers,
        "foresight": foresight_figures(replays, lookahead, horizon),
    }
    if json_path is not None:
        write_json_atomic(json_path, figures)
    return figures


def format_markdown(figures: dict[str, Any]) -> str:
    lines = [
        f"The dream of `{figures['run']}` ({figures['source']}) replaying real episodes on seeds "
        f"{figures['seeds'][0]} to {figures['seeds'][-1]} in windows of {figures['horizon']} steps from "
        f"{figures['burn_in']} real frames:",
        "",
        "| driver | real return | dream return | gap | windows | real ends | caught (median lead) | missed "
        "| false ends |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, row in figures["drivers"].items():
        lead = f" ({np.median(row['lead']):.0f})" if row["lead"] else ""
        lines.append(
            f"| {kind} | {row['real_return']:.2f} | {row['dream_return']:.2f} | {row['gap']:+.2f} | {row['windows']} | "
            f"{row['real_ends']} | {row['caught']}{lead} | {row['missed']} | {row['false_ends']} |"
        )
    foresight = figures["foresight"]
    lines += [
        "",
        f'Does the termination head see the end coming? ROC AUC of its probability against "the episode ends within '
        f"{foresight['lookahead']} steps\", every driver's windows pooled (0.5: no better than chance):",
        "",
        "| steps into the window | steps | labelled | dream's own frames | real frames |",
        "|---|---|---|---|---|",
    ]
    for row in foresight["rows"]:
        span = (
            "all"
            if row is foresight["rows"][-1]
            else f"{row['from']}" + (f" to {row['to']}" if row["to"] > row["from"] else "")
        )
        auc = [f"{row[mode]:.3f}" if np.isfinite(row[mode]) else "n/a" for mode in ("open_loop", "teacher_forced")]
        lines.append(f"| {span} | {row['steps']} | {row['labelled']} | {auc[0]} | {auc[1]} |")
    return "\n".join(lines)
