"""`worldmodel bench clone`: the dream pipeline against a clone of the scripted driver's decisions in its own data.

For a finished run, the dream policy's network is fitted to the `expert_actions` its dataset records
(`agents.clone`), and the clone, the run's kept policy and the scripted driver itself are scored on the run's held-out
evaluation episodes. Resumable: the clone and every score are kept in `<run>/clone/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agents.clone import CloneConfig, train_clone
from agents.config import read_run_config
from agents.loop import driven_seeds
from bench.scores import HeldOutScores
from envs.sources import SOURCES
from worldmodel.checkpoint import read_checkpoint
from worldmodel.config import ConfigError
from worldmodel.files import write_json_atomic, write_text_atomic
from worldmodel.run_dir import RunDir

CLONE_POLICY = "policy"
"""The clone's checkpoint stem in the run's clone folder."""


def bench_clone(
    run_dir: str | Path, config: CloneConfig, episodes: int | None = None, out: Path | None = None
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    folder = run.clone
    checkpoint = folder / CLONE_POLICY
    fitted = checkpoint.with_suffix(".json")
    if fitted.is_file():
        _check_budget(json.loads(fitted.read_text())["clone"], config, folder)
    pipeline = read_run_config(run_dir)
    if not fitted.is_file():
        train_clone(run_dir, config, checkpoint)
    fit = json.loads(fitted.read_text())["clone"]
    read_checkpoint(checkpoint, "policy")  # refuse a clone whose weights are missing or damaged before scoring it

    eval_config = pipeline.eval
    if episodes is not None:
        eval_config.episodes = episodes
    used = driven_seeds(run_dir, run.dataset)
    score = HeldOutScores(folder / "scores.json", run_dir, pipeline.collect.source, eval_config, used)
    scores = {
        "clone": score("clone", checkpoint),
        "dream policy": score("dream policy", run.policy),
        "scripted driver": score("scripted driver", kind="expert"),
    }
    results = {
        "run": str(run_dir),
        "source": pipeline.collect.source.name,
        "eval_episodes": eval_config.episodes,
        "clone": fit,
        "scores": scores,
    }
    out = out or folder
    write_json_atomic(out / "clone.json", results)
    write_text_atomic(out / "clone.md", format_markdown(results) + "\n")
    return results


def _check_budget(fit: dict[str, Any], config: CloneConfig, folder: Path) -> None:
    """ConfigError where the clone kept in `folder` was fitted on another budget than the one asked for: it is scored
    as it is, or not at all, never silently in place of the one asked for (a clone fitted before budgets were
    recorded is taken as it is)."""
    budget = fit.get("budget")
    asked = {"minutes": config.minutes, "max_steps": config.max_steps}
    if budget is not None and budget != asked:
        raise ConfigError(
            f"{folder} holds a clone fitted with {_flags(budget)}, not {_flags(asked)} as asked: give its budget to"
            f" score it, or move {folder} away to fit a new clone"
        )


def _flags(budget: dict[str, Any]) -> str:
    """{"minutes": 3.0, "max_steps": None} -> "--minutes 3.0 and no --max-steps"."""
    steps = "no --max-steps" if budget["max_steps"] is None else f"--max-steps {budget['max_steps']}"
    return f"--minutes {budget['minutes']} and {steps}"


def format_markdown(results: dict[str, Any]) -> str:
    crashes = SOURCES[results["source"]].crashes
    fit = results["clone"]
    lines = [
        f"Held-out return over {results['eval_episodes']} episodes (run `{results['run']}`).",
        "",
        "| what | held-out return |" + (" crashes |" if crashes else ""),
        "|---|---|" + ("---|" if crashes else ""),
    ]
    for key, row in results["scores"].items():
        line = f"| {key} | {row['mean']:.1f} +- {row['std']:.1f} |"
        if crashes:
            line += f" {row['crashes']} |"
        lines.append(line)
    if "val_accuracy" in fit:
        quality = f"held-out accuracy {fit['val_accuracy']:.3f}"
    else:
        quality = "held-out squared error per action part " + ", ".join(f"{e:.3f}" for e in fit["val_squared_error"])
    lines += [
        "",
        f"Clone: the dream policy's network fitted to the scripted driver's decisions on {fit['train_steps']:,} steps "
        f"of {fit['labelled_episodes']:,} labelled episodes ({fit['unlabelled_episodes']:,} without labels), "
        f"{fit['steps']:,} updates, the best of them by held-out likelihood at update {fit['step']:,}: {quality}.",
    ]
    return "\n".join(lines)
