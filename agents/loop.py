"""The dream-to-real loop's pieces: drive the real simulator with the current policy and add what it saw to the
dataset, and measure where the dream flatters the policy.

A world model trained once on scripted driving is wrong exactly where a policy trained in it goes: if the dream
lets a standing car earn reward, PPO learns to stand still. Each round of the loop (`pipeline.run`) collects
real episodes with the current policy, so the next world model is trained on the states that policy reaches and
the rewards it really gets there (IRIS, DIAMOND and DreamerV3 all alternate this way).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.evaluate import TokenPolicy
from agents.policy import ActorCritic, TokenHistory, action_bounds
from envs.collect import ExpertLabels, episode_name, record_episode, worker_env
from envs.dream import DreamSettings
from envs.sources import SourceConfig
from worldmodel.dataset import Dataset, DatasetError, Episode, EpisodeRecord, write_episode
from worldmodel.files import save_figure_atomic
from worldmodel.parallel import imap_unordered
from worldmodel.run_dir import Results
from worldmodel.world_model import WorldModel


@dataclass
class LoopConfig:
    iterations: int = 0
    """Rounds of (collect with the policy -> tokenize the new episodes -> continue the dynamics model -> continue
    PPO) after the first world model and policy; 0 runs no loop."""
    max_minutes: float | None = None
    """Wall-clock budget of the whole loop: no round starts that would, at the last round's pace, end past it
    (`next_round_share`)."""
    min_round_share: float = 0.5
    """A round that would not fit `max_minutes` whole still runs, its dynamics and PPO minutes shortened to fit, if
    at least this share of them does (a machine a few percent slower loses a few percent of a round, not all of it);
    1.0: a round runs whole or not at all, as does one whose stages stop at their steps, not their minutes."""
    episodes: int = 16
    """Real episodes each round collects with the current policy."""
    explore: float = 0.5
    """Fraction of those episodes in which the policy samples its actions; in the others it acts as it is scored
    (`TokenPolicy`, deterministic), and their returns are the real learning curve."""
    max_steps: int | None = None
    """Recorded steps per collected episode (None: the simulator's full episode, as evaluation runs)."""
    workers: int = 2
    """Processes that drive the real simulator, each with its own copy of the policy."""
    recent_share: float = 0.5
    """Share of each dynamics batch drawn from the newest round's episodes; the rest is uniform over the older ones."""
    recent_starts: float = 0.0
    """Share of PPO's dreams that start from the newest round's real states, where the current policy went (as
    MBPO branches its rollouts from the policy's own states); the rest start anywhere in the training episodes."""
    dynamics_steps: int = 500
    dynamics_minutes: float | None = None
    ppo_steps: int = 200_000
    ppo_minutes: float | None = None
    keep_best: bool = True
    """Keep the policy whose own collection episodes returned most (scored on collection seeds, never on the
    evaluation's), instead of the last one."""
    real_epochs: int = 0
    """Before each round's PPO in the dream, this many epochs of PPO's clipped updates on the round's real episodes
    in which the policy sampled its actions (Dyna's use of real experience: the loop pays for these steps anyway);
    0: the policy learns only in the dream. Applied when the round goes on from the policy that drove them."""
    continue_from: Literal["best", "last"] = "last"
    """Each round's PPO goes on from the last policy, or from the best so far by that same real score ("best": a
    round whose policy did worse in the real simulator is not built on)."""
    playoff_episodes: int = 0
    """After the last round, the `playoff_candidates` policies with the best collection returns each drive this many
    more deterministic episodes, all on the same new collection seeds, and the policy kept is the one with the best
    mean over all its deterministic episodes; 0: keep by the collection rounds alone (a few episodes each, on
    different tracks). Needs `keep_best`."""
    playoff_candidates: int = 3

    def __post_init__(self) -> None:
        if self.playoff_episodes < 0 or self.playoff_candidates < 1:
            raise ValueError(
                f"playoff_episodes must be at least 0 and playoff_candidates at least 1, got "
                f"{self.playoff_episodes} and {self.playoff_candidates}"
            )
        if self.playoff_episodes and not self.keep_best:
            raise ValueError("playoff_episodes chooses the policy to keep: it needs keep_best=true")
        if not 0 < self.min_round_share <= 1:
            raise ValueError(f"min_round_share: expected a share in (0, 1], got {self.min_round_share!r}")


def next_round_share(
    loop: LoopConfig,
    spent: float,
    collect: float,
    trained: tuple[float, float],
    timed: tuple[bool, bool],
    share: float,
) -> float:
    """The share of its training minutes (`dynamics_minutes` and `ppo_minutes`) the next round gets so that the loop
    still ends within `loop.max_minutes`, at the last round's pace: 1.0 where the whole round fits, 0.0 where not even
    `loop.min_round_share` of it does (no round).

    Seconds, as the run recorded them: `spent` by the loop so far, `collect` by the last round's collection (this
    round collects as many episodes, the policy it trains drives one more collection, and the playoff follows),
    `trained` by the last round's dynamics and PPO stages, which ran with `share` of their minutes, and `timed`
    whether each was stopped by its minutes (not its steps). A stage its minutes stopped is taken to need again what
    it took beyond them (loading, checkpoints, validation), plus its minutes at the new share; one its steps stopped,
    or without minutes, what it took. A round in which no stage was stopped by its minutes runs whole or not at all.
    After a kill the last round's times include what the killed attempt spent, so the rule errs towards a shorter
    round, not past the budget."""
    if loop.max_minutes is None:
        return 1.0
    playoff = collect * loop.playoff_candidates * loop.playoff_episodes / loop.episodes
    left = 60 * loop.max_minutes - spent - 2 * collect - playoff
    fixed = scalable = 0.0
    for seconds, clocked, minutes in zip(trained, timed, (loop.dynamics_minutes, loop.ppo_minutes), strict=True):
        budget = 60 * (minutes or 0.0)
        if budget > 0 and clocked:
            fixed, scalable = fixed + max(0.0, seconds - share * budget), scalable + budget
        else:
            fixed += seconds
    if not scalable:
        return 1.0 if left >= fixed else 0.0
    fitted = min(1.0, (left - fixed) / scalable)
    return fitted if fitted >= loop.min_round_share else 0.0


PLAYOFF = "loop/playoff"
"""The stage in `results.json` where the best loop policies played off (`LoopConfig.playoff_episodes`)."""


def driven_seeds(run_dir: Path, dataset_dir: Path) -> list[int]:
    """The seeds a run has driven the real simulator on outside evaluation: its dataset's episodes and its loop's
    playoff. Evaluation refuses them."""
    recorded = [e.seed for e in Dataset.open(dataset_dir).episodes if e.seed is not None]
    return recorded + Results(run_dir).data.get(PLAYOFF, {}).get("seeds", [])


def policy_label(run_dir: Path, policy: Path) -> str:
    """How the manifest names a policy: its checkpoint's path in the run folder."""
    return str(policy.relative_to(run_dir))


def _policy_episode(args: tuple[SourceConfig, str, str, str, bool, int, int, int, str]) -> EpisodeRecord:
    source, root, run_dir, policy, deterministic, seed, index, iteration, label = args
    torch.set_num_threads(1)
    torch.manual_seed(seed)  # a sampling policy draws the same actions on the same seed
    env = worker_env(source)
    actor = TokenPolicy(Path(run_dir), deterministic, Path(policy))
    episode, intro = record_episode(env, lambda obs: actor(obs, env.action_space), seed, ExpertLabels(source, env))
    name = episode_name(index)
    write_episode(root, name, episode)
    kind = "policy" if deterministic else "policy-sampled"
    return EpisodeRecord(name, len(episode), seed, float(episode.rewards.sum()), kind, iteration, label, intro)


def collect_with_policy(
    run_dir: Path,
    dataset_dir: Path,
    source: SourceConfig,
    config: LoopConfig,
    policy: Path,
    iteration: int,
    first_index: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Drive `config.episodes` real episodes with the `policy` checkpoint (episode j of this round is dataset
    episode `first_index + j`, on seed `seed + first_index + j`) and append them to the dataset, each recording
    `iteration` and the policy. Episodes already in the dataset are kept, so a crashed round resumes; returns, per
    episode in order, its record, whether the policy acted deterministically and the reward skipped at reset."""
    dataset = Dataset.open(dataset_dir)
    label = policy_label(run_dir, policy)
    collect_source = dataclasses.replace(source, max_steps=config.max_steps)
    sampled = round(config.explore * config.episodes)
    plan = [(first_index + j, j >= sampled) for j in range(config.episodes)]
    known = {record.name: record for record in dataset.episodes}
    for index, _ in plan:
        record = known.get(episode_name(index))
        if record is not None and (record.iteration != iteration or record.policy != label):
            raise DatasetError(
                f"{dataset_dir}: episode {record.name} was collected by {record.policy!r} in round "
                f"{record.iteration}, not by {label!r} in round {iteration}; this run's data no longer matches it"
            )
    tasks = [
        (collect_source, str(dataset_dir), str(run_dir), str(policy), det, seed + index, index, iteration, label)
        for index, det in plan
        if episode_name(index) not in known
    ]
    progress = tqdm(
        total=len(plan), initial=len(plan) - len(tasks), desc=f"collect with policy (round {iteration})", unit="episode"
    )
    for record in imap_unordered(_policy_episode, tasks, config.workers):
        dataset.add(record)
        progress.update()
        progress.set_postfix(ret=f"{record.ret:.0f}", kind=record.kind)
    progress.close()
    dataset.manifest.episodes.sort(key=lambda r: r.name)
    dataset.save_manifest()
    records = {record.name: record for record in dataset.episodes}
    return [{"record": records[episode_name(index)], "deterministic": det} for index, det in plan]


@dataclass
class ReplayWindows:
    """`replay_windows`' figures, one entry per window (W windows in all)."""

    episode: np.ndarray
    """(W,) the index of the window's episode."""
    start: np.ndarray
    """(W,) its first step in the episode."""
    steps: np.ndarray
    """(W,) the steps it covers: the horizon, or fewer at the episode's end."""
    dream: np.ndarray
    """(W,) the dream's predicted rewards, summed up to where its termination head fired."""
    real: np.ndarray
    """(W,) the recorded rewards of all its steps."""
    dream_end: np.ndarray
    """(W,) the step of the window (from 0) after which the dream ended it, -1 where it did not."""
    real_end: np.ndarray
    """(W,) the step of the window after which the real episode terminated (a crash, not the time limit), -1 where
    it did not."""
    end_probability: np.ndarray | None = None
    """(W, longest window) the termination head's probability at each step of the window, NaN past its end: read
    at every step, whether the dream had ended there or not."""


@torch.no_grad()
def replay_windows(
    world: WorldModel,
    episodes: list[Episode],
    horizon: int,
    burn_in: int,
    batch: int = 256,
    teacher_forced: bool = False,
) -> ReplayWindows:
    """The dream's verdict on real episodes along the road they really took, window by window.

    Each episode is cut into consecutive windows of `horizon` steps (the horizon the policy is trained on). A
    window's dream starts from the real frames just before it (up to `burn_in` of them, with the actions between,
    as the dream env starts its dreams), is driven by the recorded actions and pays its predicted rewards until
    its termination head fires or the window ends. One open-loop replay of a whole episode would say little: once
    its imagined track drifts from the real one, the recorded steering leaves the dream's road. Greedy tokens.
    `teacher_forced`: each step starts from the real frame instead of the one the dream drew (what the model makes
    of real frames, as in its training; the gap to the open loop is the drift)."""
    if horizon < 1 or burn_in < 1:
        raise ValueError(f"horizon and burn_in must be at least 1, got {horizon} and {burn_in}")
    windows = [(e, s) for e, episode in enumerate(episodes) for s in range(0, len(episode), horizon)]
    episode_of = np.array([e for e, _ in windows], dtype=np.int64)
    start = np.array([s for _, s in windows], dtype=np.int64)
    steps = np.minimum(horizon, np.array([len(episodes[e]) for e in episode_of], dtype=np.int64) - start)
    dream, real = np.zeros(len(windows)), np.zeros(len(windows))
    dream_end, real_end = np.full(len(windows), -1), np.full(len(windows), -1)
    end_probability = np.full((len(windows), int(steps.max(initial=0))), np.nan)
    for w, (e, s) in enumerate(windows):
        real[w] = float(np.sum(episodes[e].rewards[s : s + steps[w]], dtype=np.float64))
        ended = np.flatnonzero(np.asarray(episodes[e].terminated[s : s + steps[w]]))
        real_end[w] = ended[0] if len(ended) else -1
    contexts = np.minimum(burn_in, start + 1)
    for context in np.unique(contexts):  # one cache per context length
        group = np.flatnonzero(contexts == context)
        for first in range(0, len(group), batch):
            chunk = group[first : first + batch]
            rows, starts, lengths = episode_of[chunk], start[chunk], steps[chunk]
            pairs = list(zip(rows, starts, strict=True))
            frames = np.stack([np.asarray(episodes[e].frames[s - context + 1 : s + 1]) for e, s in pairs])
            tokens = world.tokenizer.encode(torch.from_numpy(frames).to(world.device).flatten(0, 1)).tokens
            tokens = tokens.view(len(chunk), int(context), *tokens.shape[1:])
            actions = np.stack([np.asarray(episodes[e].actions[s - context + 1 : s]) for e, s in pairs])
            cache = world.dynamics.new_cache(len(chunk))
            world.burn_in(cache, tokens, world.action_tensor(actions), torch.arange(len(chunk), device=world.device))
            current, alive = tokens[:, -1], np.ones(len(chunk), dtype=bool)
            earned, ended = np.zeros(len(chunk)), np.full(len(chunk), -1)
            for t in range(int(lengths.max())):
                inside = t < lengths  # the window still has a step t (its dream may have ended)
                alive &= inside
                taken = np.minimum(starts + t, starts + lengths - 1)
                step = np.stack([np.asarray(episodes[e].actions[i]) for e, i in zip(rows, taken, strict=True)])
                prediction = world.imagine(cache, current, world.action_tensor(step))
                earned += np.where(alive, prediction.reward.cpu().numpy(), 0.0)
                fired = alive & prediction.terminated.cpu().numpy()
                ended[fired] = t
                alive &= ~fired
                end_probability[chunk[inside], t] = prediction.end_probability.cpu().numpy()[inside]
                current = prediction.tokens
                if teacher_forced:
                    seen = np.stack([np.asarray(episodes[e].frames[i + 1]) for e, i in zip(rows, taken, strict=True)])
                    current = world.tokenizer.encode(torch.from_numpy(seen).to(world.device)).tokens
            dream[chunk], dream_end[chunk] = earned, ended
    return ReplayWindows(episode_of, start, steps, dream, real, dream_end, real_end, end_probability)


def dream_replay(
    world: WorldModel, episodes: list[Episode], horizon: int, burn_in: int, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(E,) dream and real returns of whole episodes: `replay_windows`' windows summed per episode, so both cover
    every recorded step."""
    windows = replay_windows(world, episodes, horizon, burn_in, batch)
    dream, real = np.zeros(len(episodes)), np.zeros(len(episodes))
    np.add.at(dream, windows.episode, windows.dream)
    np.add.at(real, windows.episode, windows.real)
    return dream, real


@torch.no_grad()
def dream_policy_returns(world: WorldModel, first_tokens: torch.Tensor, steps: int, policy: ActorCritic) -> np.ndarray:
    """What the dream pays `policy` over whole episodes: (E,) sums of predicted rewards.

    Each dream starts from its frame's tokens `first_tokens` (E, h, w) with no other context, as a real episode
    does, and runs `steps` steps or until its termination head fires, the policy acting as it is scored (closed
    loop: the dream's own return of the policy). Greedy tokens. The real episode's length is no limit: a dream
    that does not foresee the crash that ended it goes on paying, and that is the flattery this figure shows."""
    count, device = len(first_tokens), world.device
    space = world.action_space
    bounds = action_bounds(space, device)
    cache = world.dynamics.new_cache(count)
    rows = torch.arange(count, device=device)
    empty = np.zeros((count, 0, *space.shape), dtype=space.dtype)
    tokens = first_tokens.to(device)
    world.burn_in(cache, tokens[:, None], world.action_tensor(empty), rows)
    history = TokenHistory(policy.config.frames)
    seen = history.start(tokens)
    totals = np.zeros(count)
    alive = np.ones(count, dtype=bool)
    for step in range(steps):
        if not alive.any():
            break
        if step:
            seen = history.push(tokens)
        action = policy.act(seen, deterministic=True, bounds=bounds)[0]
        action = action.clamp(bounds[0], bounds[1]) if bounds is not None else action
        prediction = world.imagine(cache, tokens, action)
        totals += np.where(alive, prediction.reward.cpu().numpy(), 0.0)
        alive &= ~prediction.terminated.cpu().numpy()
        tokens = prediction.tokens
    return totals


def dream_gap(
    world: WorldModel,
    policy: ActorCritic,
    dataset: Dataset,
    collected: list[dict[str, Any]],
    settings: DreamSettings,
) -> dict[str, float]:
    """The dream (`world`, the one the policy was trained in) against what the policy really got.

    - `real_recorded_return`: the mean return of the collected episodes over their recorded steps;
    - `dream_replay_return`: the dream's return of the same episodes along their real road (`dream_replay`:
      windows of the `settings`' horizon from its burn-in's real frames, as PPO dreams, driven by the recorded
      actions); `dream_gap` is it minus the real return (positive: the dream pays for what did not pay);
    - `dream_policy_return` (and `real_policy_return`): from the first frames of the episodes in which the policy
      acted deterministically, the policy driving the dream until the dream ends it or for as many steps as the
      dataset's longest episode (the simulator's time limit, as far as the data shows it), against those
      episodes' real returns."""
    names = {record.name: i for i, record in enumerate(dataset.episodes)}
    episodes = [dataset.load(names[item["record"].name]) for item in collected]
    burn_in = settings.context_for(world.dynamics.config.context_frames)
    replay, real = dream_replay(world, episodes, settings.horizon, burn_in)
    figures = {
        "real_recorded_return": float(real.mean()),
        "dream_replay_return": float(replay.mean()),
        "dream_gap": float((replay - real).mean()),
    }
    chosen = np.array([item["deterministic"] for item in collected])
    if chosen.any():
        frames = np.stack([np.asarray(episodes[i].frames[0]) for i in np.flatnonzero(chosen)])
        first = world.tokenizer.encode(torch.from_numpy(frames).to(world.device)).tokens
        limit = max(record.length for record in dataset.episodes)
        figures["dream_policy_return"] = float(dream_policy_returns(world, first, limit, policy).mean())
        figures["real_policy_return"] = float(real[chosen].mean())
    return figures


def round_figures(collected: list[dict[str, Any]]) -> dict[str, Any]:
    """A round's real figures: the returns (with the reward skipped at reset, as evaluation counts them) of the
    episodes in which the policy acted as it is scored, and of those in which it sampled."""
    by_mode: dict[bool, list[float]] = {True: [], False: []}
    for item in collected:
        by_mode[item["deterministic"]].append(item["record"].ret + item["record"].intro_reward)
    figures: dict[str, Any] = {
        "episodes": len(collected),
        "steps": int(sum(item["record"].length for item in collected)),
        "seeds": [item["record"].seed for item in collected],
    }
    for deterministic, name in ((True, "real_return"), (False, "real_sampled_return")):
        returns = by_mode[deterministic]
        if returns:
            figures[f"{name}_mean"] = float(np.mean(returns))
            figures[f"{name}_std"] = float(np.std(returns))
            figures[f"{name}s"] = returns
    return figures


def plot_learning_curve(curve: list[dict[str, Any]], path: Path) -> None:
    """`<run>/loop.png`: each policy's real return on its collection round, and what the dream made of the same
    policy, against the real steps and the wall time the run had used when the policy was ready."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label in ((axes[0], "real_steps", "real steps"), (axes[1], "wall_s", "wall time (min)")):
        xs = np.array([row[key] for row in curve], dtype=float) / (60 if key == "wall_s" else 1)
        for name, style, legend in (
            ("real_return_mean", "o-", "real, policy acting as scored"),
            ("real_sampled_return_mean", "x:", "real, policy sampling"),
            ("dream_policy_return", "s--", "the dream's return of the same policy"),
        ):
            ys = np.array([np.nan if row.get(name) is None else row[name] for row in curve], dtype=float)
            axis.plot(xs, ys, style, label=legend)
        for row, x in zip(curve, xs, strict=True):
            axis.annotate(str(row["policy"]), (x, row.get("real_return_mean") or 0), fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel("return over the recorded episode")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
