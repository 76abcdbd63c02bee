"""`worldmodel bench baseline`: the dream pipeline against PPO trained directly in the real simulator.

For a finished run, PPO with the run's own settings and policy network trains in the real simulator for a wall-clock
budget (`agents.real_ppo`, the run's tokenizer giving it the same observations; that tokenizer's training is not
counted in its time). Its snapshots, and the dream pipeline's policies (the one trained before the loop and each
loop round's), are scored on the run's held-out evaluation tracks. The table and plot give the held-out return
against wall time and against real environment steps (recorded steps, each 4 simulator frames on CarRacing; on
highway the table counts crashes too), and `time_ratio`: the wall time the real-simulator PPO needed to reach the
dream pipeline's held-out score over the dream pipeline's wall time to its kept policy (a lower bound when none of
its snapshots did in its budget). The kept policy is scored on the tracks every other row is: the run's own
evaluation where `--episodes` is left as the run's, else anew. Everything is resumable: a trained baseline and every
scored policy are kept in `<run>/real_ppo/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from agents.config import read_run_config
from agents.loop import driven_seeds
from agents.real_ppo import REAL_PPO, RealPPOConfig, train_real_ppo
from bench.scores import HeldOutScores
from envs.sources import SOURCES
from worldmodel.checkpoint import CheckpointError
from worldmodel.config import ConfigError
from worldmodel.files import read_json, save_figure_atomic, write_json_atomic, write_text_atomic
from worldmodel.logger import RunLogger
from worldmodel.run_dir import RunDir


@dataclass
class BaselineConfig:
    real: RealPPOConfig
    episodes: int | None = None
    """Held-out episodes per scored policy (default: the run's `eval.episodes`)."""
    checked: tuple[str, ...] = ("minutes", "max_steps", "num_envs", "rollout_steps")
    """The settings of `real` an earlier training in RUN/real_ppo must have been made with to be scored instead of
    trained again (the command line checks the flags it was given)."""


def bench_baseline(run_dir: str | Path, config: BaselineConfig, out: Path | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    pipeline = read_run_config(run_dir)
    summary_path = RunDir(run_dir).summary
    if not summary_path.is_file():
        raise CheckpointError(f"{summary_path} not found; finish the run (`worldmodel run`) before its baseline")
    summary = read_json(summary_path)
    used = driven_seeds(run_dir, RunDir(run_dir).dataset)  # before training: a run without its dataset stops here
    folder = RunDir(run_dir).real_ppo
    trained = folder / "training.json"
    if trained.is_file():
        training = read_json(trained)
        training.setdefault("rollout_steps", pipeline.ppo.rollout_steps)  # trained before the flag: the dream's
        training.setdefault("max_steps", None)  # trained before the flag: the minutes alone
        wanted = {
            "minutes": config.real.minutes,
            "max_steps": config.real.max_steps,
            "num_envs": config.real.num_envs,
            "rollout_steps": config.real.steps_per_env(pipeline.ppo),
        }
        differ = [key for key in config.checked if wanted[key] != training[key]]
        if differ:
            was = ", ".join(f"{key} {training[key]}" for key in differ)
            asked = ", ".join(f"{key} {wanted[key]}" for key in differ)
            raise ConfigError(
                f"{folder} holds a training with {was}, not {asked}: leave those flags out to score it, or move the "
                "folder away to train again"
            )
    else:
        logger = RunLogger(folder)
        figures = train_real_ppo(run_dir, pipeline.collect.source, pipeline.ppo, config.real, logger, folder)
        logger.close()
        real = config.real
        training = {"minutes": real.minutes, "max_steps": real.max_steps, "num_envs": real.num_envs, **figures}
        write_json_atomic(trained, training)

    eval_config = pipeline.eval
    evaluated = eval_config.episodes  # the run's own evaluation, in its summary
    if config.episodes is not None:
        eval_config.episodes = config.episodes
    score = HeldOutScores(folder / "scores.json", run_dir, pipeline.collect.source, eval_config, used)

    baseline_curve = []
    for snap in tqdm(training["snapshots"], desc="score real-simulator PPO snapshots"):
        held_out = score(f"{REAL_PPO}/{snap['checkpoint']}", folder / snap["checkpoint"])
        baseline_curve.append({"wall_s": snap["wall_s"], "real_steps": snap["real_steps"], **held_out})

    # the dream pipeline: each loop policy when it was ready, then the kept policy at the end of the loop
    timings = summary["timings_s"]
    stages_before_eval = [name for name in timings if name not in ("evaluate", "rollout")]
    pipeline_wall = sum(timings[name] for name in stages_before_eval)
    initial_steps = summary["dataset"]["steps"]
    dream_curve = []
    loop = summary.get("loop")
    if loop:
        for row in tqdm(loop["curve"], desc="score the loop's policies"):
            held_out = score(f"loop/{row['policy']:02d}", RunDir(run_dir).loop_round(row["policy"]).policy)
            dream_curve.append(
                {"policy": row["policy"], "wall_s": row["wall_s"], "real_steps": row["real_steps"], **held_out}
            )
        last = loop["curve"][-1]
        # the last policy's scoring round, and the playoff's episodes: real driving too, in the pipeline's time
        final_steps = last["real_steps"] + last["round_steps"] + loop.get("playoff", {}).get("steps", 0)
    else:
        final_steps = initial_steps
    if eval_config.episodes == evaluated:
        evaluation = summary["policy"]
        kept = {
            "mean": evaluation["real_return_mean"],
            "std": evaluation["real_return_std"],
            "returns": None,
            "crashes": evaluation.get("crashes"),
        }
    else:  # the score to reach, on the tracks every other row is scored on
        kept = score("kept", RunDir(run_dir).policy)
    dream_score = kept["mean"]
    dream_curve.append({"policy": "kept", "wall_s": round(pipeline_wall, 1), "real_steps": final_steps, **kept})
    # what it trained: its minutes, or less where its steps ended it first
    trained_s = min(60 * training["minutes"], training["snapshots"][-1]["wall_s"])
    ratio = time_ratio(baseline_curve, dream_score, pipeline_wall, trained_s)
    results = {
        "run": str(run_dir),
        "source": pipeline.collect.source.name,
        "dream_pipeline": {"score": dream_score, "wall_s": round(pipeline_wall, 1), "curve": dream_curve},
        "real_ppo": {
            "minutes": training["minutes"],
            "max_steps": training["max_steps"],
            "num_envs": training["num_envs"],
            "rollout_steps": training["rollout_steps"],
            "real_steps": training["real_steps"],
            "steps_per_second": training["steps_per_second"],
            "curve": baseline_curve,
            "best": max((row["mean"] for row in baseline_curve), default=None),
        },
        "time_ratio": ratio,
        "eval_episodes": eval_config.episodes,
    }
    out = out or folder
    write_json_atomic(out / "baseline.json", results)
    write_text_atomic(out / "baseline.md", format_markdown(results) + "\n")
    plot_baseline(results, out / "baseline.png")
    return results


def time_ratio(curve: list[dict[str, Any]], score: float, wall_s: float, trained_s: float) -> dict[str, Any]:
    """The wall time of the first snapshot in `curve` whose held-out mean reaches `score`, over `wall_s`, an upper
    bound (`bound` "<="): the baseline got there at that snapshot or between it and the one before; when none does,
    the time the baseline trained (its budget, or less where its step cap ended it) over `wall_s`, as a lower bound
    (`bound` ">")."""
    reached = [row for row in curve if row["mean"] >= score]
    if reached:
        return {"value": reached[0]["wall_s"] / wall_s, "bound": "<="}
    return {"value": trained_s / wall_s, "bound": ">"}


def format_markdown(results: dict[str, Any]) -> str:
    dream, real = results["dream_pipeline"], results["real_ppo"]
    crashes = SOURCES[results["source"]].crashes
    lines = [
        f"Held-out return over {results['eval_episodes']} episodes (run `{results['run']}`).",
        "",
        "| what | wall time | real steps | held-out return |" + (" crashes |" if crashes else ""),
        "|---|---|---|---|" + ("---|" if crashes else ""),
    ]
    rows = [
        ("dream pipeline, kept policy" if row["policy"] == "kept" else f"dream pipeline, policy {row['policy']}", row)
        for row in dream["curve"]
    ] + [("real-simulator PPO", row) for row in real["curve"]]
    for label, row in rows:
        held_out = f"{row['mean']:.1f} +- {row['std']:.1f}"
        line = f"| {label} | {row['wall_s'] / 60:.1f} min | {row['real_steps']:,} | {held_out} |"
        if crashes:  # scores kept from before crashes were recorded have none
            line += f" {'?' if row.get('crashes') is None else row['crashes']} |"
        lines.append(line)
    ratio = results["time_ratio"]
    rollout = real.get("rollout_steps")  # None in a baseline.json from before it was recorded
    each = f", {rollout} steps each between updates" if rollout else ""
    trained_min = real["curve"][-1]["wall_s"] / 60 if real["curve"] else real["minutes"]
    cap = f", at most {real['max_steps']:,} steps" if real.get("max_steps") else ""
    lines += [
        "",
        f"Real-simulator PPO: {real['real_steps']:,.0f} steps in {trained_min:.1f} minutes (budget "
        f"{real['minutes']:g}{cap}; {real['steps_per_second']:.0f}/s over {real['num_envs']} simulators{each}), "
        f"best held-out {real['best']:.1f}. "
        f"Time it needs to reach the dream pipeline's {dream['score']:.1f}, over the dream pipeline's "
        f"{dream['wall_s'] / 60:.1f} minutes: {ratio['bound']} {ratio['value']:.2f}.",
    ]
    return "\n".join(lines)


def plot_baseline(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label in ((axes[0], "wall_s", "wall time (min)"), (axes[1], "real_steps", "real steps")):
        for name, curve, style in (
            ("dream pipeline", results["dream_pipeline"]["curve"], "o-"),
            ("real-simulator PPO", results["real_ppo"]["curve"], "s-"),
        ):
            xs = np.array([row[key] for row in curve], dtype=float) / (60 if key == "wall_s" else 1)
            axis.plot(xs, [row["mean"] for row in curve], style, label=name)
        axis.set_xlabel(label)
        axis.set_ylabel("held-out return")
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
