"""A branch of a finished run: a copy of its folder cut back to just before one loop round's PPO, with other loop
settings, to run on from there. Two branches of the same run (say `loop.continue_from=best` and `=last`) share its
data, tokenizer, world models and policies up to that round, so what differs after is the setting and chance: a
paired test of a loop option for the price of one round, instead of two whole pipelines per seed."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from agents.config import MINUTE_BUDGETS, PipelineConfig, read_run_config
from agents.loop import PLAYOFF
from worldmodel.config import ConfigError, apply_override, check_run_name, from_dict
from worldmodel.dataset import Dataset
from worldmodel.files import write_text_atomic
from worldmodel.run_dir import Results, RunDir

FINAL_STAGES = (PLAYOFF, "loop/select", "loop/stop", "evaluate", "rollout")


def _dropped(stage: str, iteration: int) -> bool:
    """Whether `stage` comes after loop round `iteration`'s dynamics (its PPO and everything later)."""
    if stage in FINAL_STAGES:
        return True
    if not stage.startswith("loop/"):
        return False
    _, number, step = stage.split("/")
    return int(number) > iteration or (int(number) == iteration and step == "policy")


def apply_scaled_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    """Apply `overrides` to a run's resolved config, a minute budget among them times the run's `run.scaled_by`, as
    `run.time_scale` scaled the run's own (a branch of a run on a slow machine gets the minutes the user means)."""
    scale = raw.get("run", {}).get("scaled_by", 1.0)
    for item in overrides:
        apply_override(raw, item)
        key = item.split("=", 1)[0].strip()
        *path, name = key.split(".")
        section = functools.reduce(lambda node, part: node[part], path, raw)
        value = section.get(name)
        if key in MINUTE_BUDGETS and isinstance(value, int | float) and not isinstance(value, bool):
            section[name] = value * scale


def branch_run(run_dir: str | Path, out_dir: str | Path, iteration: int, overrides: list[str]) -> PipelineConfig:
    """Copy `run_dir` to `out_dir` cut back to just before loop round `iteration`'s PPO, with the `loop.*`
    `overrides` (minute budgets scaled as the run's were: `apply_scaled_overrides`); returns the branch's config,
    which `pipeline.run.run_pipeline` runs on from there.

    Kept: every stage before the loop, rounds 1 .. iteration - 1, round `iteration`'s collection and dynamics (the
    run's world model is set back to it). Dropped: that round's PPO, later rounds and their episodes, the final
    collection, the choice of policy, the evaluation and the video. A round the run shortened to fit
    `loop.max_minutes` (`round_share` in its collection's figures) keeps its share of `loop.ppo_minutes`: the share
    is not recomputed for another `loop.max_minutes`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not RunDir(run_dir).config.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml); give one `worldmodel run` made")
    check_run_name(out_dir.name, "the branch's name")
    results = Results(run_dir).data
    if f"loop/{iteration:02d}/dynamics" not in results:
        raise ConfigError(f"{run_dir}: loop round {iteration} has not trained its dynamics; nothing to branch from")
    if out_dir.exists():
        raise ConfigError(f"{out_dir} exists; a branch goes to a new folder")
    outside = [item for item in overrides if not item.startswith("loop.")]
    if outside:
        raise ConfigError(
            f"a branch changes only loop.* settings (the stages it keeps were made with the rest): {outside}"
        )
    raw: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(read_run_config(run_dir))))
    apply_scaled_overrides(raw, overrides)
    raw["run"].update(name=out_dir.name, runs_dir=str(out_dir.parent))
    config = from_dict(PipelineConfig, raw)  # refuses a setting that does not exist before anything is copied

    shutil.copytree(run_dir, out_dir)
    out = RunDir(out_dir)
    kept = {name: figures for name, figures in results.items() if name != "timings" and not _dropped(name, iteration)}
    kept["timings"] = {name: s for name, s in results.get("timings", {}).items() if not _dropped(name, iteration)}
    branched = Results(out_dir)
    branched.data = kept
    branched.save()
    for later in out.root.glob("loop/*"):
        if later.is_dir() and int(later.name) > iteration:
            shutil.rmtree(later)
    round_dir = out.loop_round(iteration)
    for path in round_dir.policy.parent.glob(f"{round_dir.policy.name}*"):
        path.unlink()
    for stem in (round_dir.dynamics, round_dir.dynamics.with_name(round_dir.dynamics.name + "_last")):
        for suffix in (".json", ".safetensors"):
            shutil.copy(stem.with_suffix(suffix), out.root / (stem.name + suffix))
    dataset = Dataset.open(out.dataset)
    dropped = [i for i, episode in enumerate(dataset.episodes) if (episode.iteration or 0) > iteration]
    for index in dropped:
        shutil.rmtree(dataset.episode_dir(index), ignore_errors=True)
    dataset.manifest.episodes = [e for e in dataset.episodes if (e.iteration or 0) <= iteration]
    dataset.save_manifest()
    stale_files = (
        out.summary,
        out.report,
        out.stage_clock,
        out.policy.with_suffix(".json"),
        out.policy.with_suffix(".safetensors"),
    )
    for stale in stale_files:
        stale.unlink(missing_ok=True)
    write_text_atomic(out.config, yaml.safe_dump(raw, sort_keys=False))  # what `worldmodel run` checks it against
    return config
