"""`worldmodel bench reliability`: the whole pipeline on several seeds, to say how often it works, not once.

Seed s changes every random choice of a run: the collection's tracks and exploration (`collect.seed`, spaced
`SEED_STRIDE` apart so that no two seeds share a track and none reaches the evaluation's), the tokenizer's and the
dynamics model's initial weights and batches, and PPO's (`ppo.seed`; the loop's rounds derive theirs from these).
Every seed is scored on the same held-out evaluation tracks. Each seed runs as its own `worldmodel run` process
into `<runs>/<name>-seed<s>`, so a seed that finished is not run again and a killed bench resumes where it stopped.
With `run.time_scale=auto` the machine is measured once and every seed the bench starts gets that factor, so that
seeds differ in their random choices only.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.config import PipelineConfig, load_pipeline_config
from envs.sources import SOURCES
from worldmodel.config import ConfigError
from worldmodel.files import read_json, write_json_atomic, write_text_atomic
from worldmodel.run_dir import RunDir

SEED_STRIDE = 10_000
"""Collection seeds of bench seed s start at s * SEED_STRIDE (evaluation seeds start at 1,000,000)."""


@dataclass
class ReliabilityConfig:
    preset: str = "tiny"
    source: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    name: str | None = None
    """Run folders are `<runs_dir>/<name>-seed<s>` (default name: reliability-<preset>-<source>)."""
    runs_dir: str = "runs"
    overrides: list[str] = field(default_factory=list)

    @property
    def run_name(self) -> str:
        return self.name or f"reliability-{Path(self.preset).stem}-{self.source or 'carracing'}"


class SeedFailed(RuntimeError):
    """One seed's pipeline exited with an error: the bench stops there (what it finished is kept)."""


def seed_overrides(seed: int) -> list[str]:
    """The `section.key=value` overrides that make run `seed` differ from seed 0 (the preset itself) everywhere."""
    return [
        f"collect.seed={seed * SEED_STRIDE}",
        f"tokenizer.train.seed={seed}",
        f"dynamics.train.seed={seed}",
        f"ppo.seed={seed}",
    ]


def seed_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """One seed's line: held-out return, episodes that beat the random policy, crashes, the loop's choice."""
    loop = summary.get("loop") or {}
    return {
        "run": summary["run"],
        "policy_mean": summary["policy"]["real_return_mean"],
        "policy_std": summary["policy"]["real_return_std"],
        "beats_random": summary["policy_beats_random"],
        "episodes": summary["episodes_evaluated"],
        "random_mean": summary["random"]["real_return_mean"],
        "expert_mean": summary["expert"]["real_return_mean"],
        "policy_crashes": summary["policy"].get("crashes", 0),
        "expert_crashes": summary["expert"].get("crashes", 0),
        "steady": summary.get("steady"),  # the source's steady action held throughout, where it has one
        "loop_rounds": loop.get("rounds", 0),
        "loop_chosen": loop.get("chosen"),
        "loop_curve": [row["real_return_mean"] for row in loop.get("curve", [])],
        "stage_seconds": round(sum(summary["timings_s"].values()), 1),
        "scaled_by": summary.get("scaled_by", 1.0),  # the minute budgets' factor (run.time_scale)
    }


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    means = np.array([row["policy_mean"] for row in rows])
    return {
        "seeds": len(rows),
        "mean": float(means.mean()),
        "median": float(np.median(means)),
        "worst": float(means.min()),
        "best": float(means.max()),
        "worst_beats_random": int(min(row["beats_random"] for row in rows)),
        "seeds_beating_random_on_9_of_10": int(sum(row["beats_random"] >= 0.9 * row["episodes"] for row in rows)),
    }


def format_markdown(results: dict[str, Any]) -> str:
    rows = results["per_seed"]
    lines = [
        f"`{results['command']}`",
        "",
        "| seed | policy, held-out return | beats random | random | expert | loop: real return per policy (kept) |"
        " stage time |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, row in zip(results["seeds"], rows, strict=True):
        curve = ", ".join(f"{x:.0f}" if x is not None else "-" for x in row["loop_curve"]) or "-"
        kept = f" ({row['loop_chosen']})" if row["loop_chosen"] is not None else ""
        crashes = ""
        if SOURCES[results["source"]].crashes:
            crashes = f", {row['policy_crashes']} crashed (expert {row['expert_crashes']})"
        scale = row.get("scaled_by", 1.0)
        scaled = f" (budgets x{scale:g})" if scale != 1 else ""
        steady = row.get("steady")
        if steady:
            crashes += f"; always {steady['action']}: {steady['real_return_mean']:.1f}, {steady['crashes']} crashed"
        lines.append(
            f"| {seed} | {row['policy_mean']:.1f} +- {row['policy_std']:.1f}{crashes} | "
            f"{row['beats_random']} of {row['episodes']} | {row['random_mean']:.1f} | {row['expert_mean']:.1f} | "
            f"{curve}{kept} | {row['stage_seconds'] / 60:.1f} min{scaled} |"
        )
    total = results["over_seeds"]
    plural = "seed" if total["seeds"] == 1 else "seeds"
    lines += [
        "",
        f"Over {total['seeds']} {plural}: mean {total['mean']:.1f}, median {total['median']:.1f},"
        f" worst {total['worst']:.1f}, best {total['best']:.1f}; {total['seeds_beating_random_on_9_of_10']} of"
        f" {total['seeds']} {plural} beat the random policy on at least 9 in 10 held-out episodes"
        f" (worst: {total['worst_beats_random']}).",
    ]
    return "\n".join(lines)


def reliability_command(config: ReliabilityConfig) -> str:
    """The command line that reruns (or resumes) this bench; seeds that are not a run of integers are spelled out."""
    first, count = config.seeds[0], len(config.seeds)
    if config.seeds == tuple(range(first, first + count)):
        seeds = [f"--seeds {count}"] + ([f"--first-seed {first}"] if first else [])
    else:
        seeds = [f"(seeds {', '.join(map(str, config.seeds))})"]
    return " ".join(
        ["worldmodel bench reliability", f"--preset {config.preset}"]
        + ([f"--source {config.source}"] if config.source else [])
        + seeds
        + ([f"--name {config.name}"] if config.name else [])
        + ([f"--runs-dir {config.runs_dir}"] if str(config.runs_dir) != "runs" else [])
        + list(config.overrides)
    )


def _bench_time_scale(seed_configs: dict[int, PipelineConfig], preset: str) -> float:
    """`run.time_scale: auto` for the seeds the bench starts: the factor its first seed that started recorded (a
    resumed bench), else this machine measured once (`bench.train_step.auto_time_scale`)."""
    from bench.train_step import auto_time_scale, recorded_time_scale  # torch and the models only where needed

    for seed, seed_config in seed_configs.items():
        scale = recorded_time_scale(seed_config.run_dir)
        if scale is not None:
            print(f"[reliability] run.time_scale=auto: every seed to start now x{scale:g}, as seed {seed}'s run")
            return scale
    scale = auto_time_scale(next(iter(seed_configs.values())), preset)
    print(f"[reliability] run.time_scale=auto: every seed to start now x{scale:g}, measured once", flush=True)
    return scale


def bench_reliability(config: ReliabilityConfig, out: Path) -> dict[str, Any]:
    """Run (or resume) every seed's pipeline, then write `<out>/reliability.json` and `reliability.md`."""
    source, name = config.source or "carracing", config.run_name
    seeded = {item.split("=")[0] for item in seed_overrides(0)}
    given = {item.split("=")[0].strip() for item in config.overrides}
    taken = sorted(seeded & given)
    if taken:
        raise ConfigError(f"{', '.join(taken)}: the bench sets these for every seed (--first-seed picks the seeds)")
    named = sorted({"run", "run.runs_dir", "run.name"} & given)
    if named:  # the runs would go where the bench does not read their summaries from
        raise ConfigError(f"{', '.join(named)}: the bench names the seeds' runs; give --runs-dir and --name instead")
    where = [f"run.runs_dir={config.runs_dir}"]
    seed_configs = {  # every seed's settings checked before the first starts, not after its minutes
        seed: load_pipeline_config(
            config.preset,
            [*where, *config.overrides, *seed_overrides(seed), f"run.name={name}-seed{seed}"],
            config.source,
        )
        for seed in config.seeds
    }
    rows, scale = [], None
    for seed, seed_config in seed_configs.items():
        run = seed_config.run.name  # <name>-seed<s>, set when every seed was checked
        overrides = [*config.overrides, *seed_overrides(seed)]
        if seed_config.run.time_scale == "auto" and not RunDir(seed_config.run_dir).config.is_file():
            # one factor for every seed the bench starts, so that seeds differ in their random choices only (a
            # seed that started keeps its own, which `worldmodel run` reads back from its config.yaml)
            scale = scale or _bench_time_scale(seed_configs, config.preset)
            at = f"run.time_scale={scale / seed_config.run.scaled_by!r}"
            overrides = [at if item.split("=", 1)[0].strip() == "run.time_scale" else item for item in overrides]
        # -P: the working directory does not come first on the import path (a pipeline.py there would run instead)
        command = [sys.executable, "-P", "-m", "pipeline", "run", "--preset", config.preset, "--name", run]
        if config.source:
            command += ["--source", config.source]
        command += [*where, *overrides]
        print(f"[reliability] seed {seed}: {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command, check=False)
        if done.returncode != 0:
            raise SeedFailed(
                f"seed {seed}'s run {run} failed (exit {done.returncode}; its output above says why); once that is"
                " mended, the same command resumes every seed where it stopped"
            )
        summary = read_json(Path(config.runs_dir) / run / "summary.json")
        rows.append(seed_figures(summary))
    results = {
        "command": reliability_command(config),
        "preset": config.preset,
        "source": source,
        "seeds": list(config.seeds),
        "overrides": config.overrides,
        "per_seed": rows,
        "over_seeds": aggregate(rows),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "reliability.json", results)
    write_text_atomic(out / "reliability.md", format_markdown(results) + "\n")
    return results
