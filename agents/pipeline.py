"""The whole path on one preset: collect -> tokenizer -> dynamics -> PPO in imagination -> real-simulator
evaluation -> rollout video, each stage skipped when its output exists, so a crashed run resumes."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from agents.evaluate import EvalConfig, evaluate
from agents.ppo import POLICY, PPOConfig, train_ppo
from envs.collect import CollectConfig, collect
from worldmodel.config import ConfigError, RunConfig, apply_override, from_dict, load_preset
from worldmodel.dataset import Dataset, write_json_atomic
from worldmodel.logger import RunLogger
from worldmodel.rollout import RolloutConfig, write_rollout
from worldmodel.train import DYNAMICS, TOKENIZER, DynamicsStage, TokenizerStage, train_dynamics, train_tokenizer

# the config that decides each stage's output: changing it after the stage finished is refused
STAGE_SECTIONS = {
    "collect": ("collect",),
    "tokenizer": ("tokenizer", "run.val_fraction"),
    "dynamics": ("dynamics", "run.val_fraction"),
    "policy": ("ppo",),
    "evaluate": ("eval",),
    "rollout": ("rollout",),
}


@dataclass
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    dynamics: DynamicsStage = field(default_factory=DynamicsStage)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.runs_dir) / self.run.name

    @property
    def dataset_dir(self) -> Path:
        return self.run_dir / "dataset"


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def load_pipeline_config(
    preset: str, overrides: list[str] | tuple[str, ...] = (), source: str | None = None
) -> PipelineConfig:
    """A preset, its per-source overlay (`sources.<name>` in the YAML) for `source`, then the overrides."""
    raw = load_preset(preset)
    overlays = raw.pop("sources", {}) or {}
    if source is not None:
        raw = _merge(raw, {"collect": {"source": {"name": source}}})
    chosen = raw.get("collect", {}).get("source", {}).get("name", "carracing")
    if chosen in overlays:
        raw = _merge(raw, overlays[chosen])
    for item in overrides:
        apply_override(raw, item)
    return from_dict(PipelineConfig, raw)


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree


class Results:
    """`<run>/results.json`: each finished stage's figures, rewritten atomically after every stage."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "results.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, stage: str) -> bool:
        return stage in self.data

    def record(self, stage: str, figures: dict[str, Any]) -> None:
        self.data[stage] = figures
        write_json_atomic(self.path, self.data)


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run every stage that has not finished yet; write and return `<run>/summary.json`."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    run_dir, data_dir = config.run_dir, config.dataset_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = json.loads(json.dumps(dataclasses.asdict(config)))
    results = Results(run_dir)
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        previous = yaml.safe_load(config_path.read_text()) or {}
        for stage_name, keys in STAGE_SECTIONS.items():
            for key in keys:
                if results.done(stage_name) and _lookup(previous, key) != _lookup(resolved, key):
                    raise ConfigError(
                        f"{run_dir}: stage {stage_name!r} finished with other `{key}` settings than "
                        f"now (see {config_path}); choose a new run.name, or delete the run folder"
                    )
    config_path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    logger = RunLogger(run_dir, config.run.wandb, dataclasses.asdict(config))
    timings: dict[str, float] = dict(results.data.get("timings", {}))

    def stage(name: str, work) -> None:
        if results.done(name):
            print(f"[{name}] already done, skipping (delete {results.path} entries to redo)")
            return
        began = time.monotonic()
        print(f"[{name}] ...")
        figures = work()
        timings[name] = round(time.monotonic() - began, 1)
        results.record(name, figures)
        results.record("timings", timings)

    def do_collect() -> dict[str, Any]:
        dataset = collect(config.collect, data_dir)
        returns = [e.ret for e in dataset.episodes]
        return {
            "episodes": len(dataset),
            "steps": sum(e.length for e in dataset.episodes),
            "mean_return": sum(returns) / len(returns),
            "seeds": [e.seed for e in dataset.episodes],
        }

    device, val = config.run.device, config.run.val_fraction
    stage("collect", do_collect)
    stage("tokenizer", lambda: train_tokenizer(data_dir, run_dir, config.tokenizer, logger, val, device))
    stage("dynamics", lambda: train_dynamics(data_dir, run_dir, config.dynamics, logger, val, device))
    stage("policy", lambda: train_ppo(run_dir, config.ppo, logger, device))
    used_seeds = [e.seed for e in Dataset.open(data_dir).episodes if e.seed is not None]
    stage("evaluate", lambda: evaluate(run_dir, config.collect.source, config.eval, used_seeds))
    stage("rollout", lambda: write_rollout(run_dir, data_dir, config.rollout))
    logger.close()
    summary = make_summary(config, results.data)
    write_json_atomic(run_dir / "summary.json", summary)
    print(format_summary(summary))
    return summary


def make_summary(config: PipelineConfig, results: dict[str, Any]) -> dict[str, Any]:
    evaluation = results["evaluate"]
    return {
        "run": str(config.run_dir),
        "source": config.collect.source.name,
        "dataset": {k: v for k, v in results["collect"].items() if k != "seeds"},
        "tokenizer": results["tokenizer"],
        "dynamics": results["dynamics"],
        "ppo": results["policy"],
        "policy": {"real_return_mean": evaluation["policy"]["mean"], "real_return_std": evaluation["policy"]["std"]},
        "random": {"real_return_mean": evaluation["random"]["mean"], "real_return_std": evaluation["random"]["std"]},
        "expert": {"real_return_mean": evaluation["expert"]["mean"], "real_return_std": evaluation["expert"]["std"]},
        "episodes_evaluated": len(evaluation["policy"]["returns"]),
        "eval_seeds": evaluation["policy"]["seeds"],
        "rollout": results["rollout"],
        "rollout_video": results["rollout"]["video"],
        "timings_s": results.get("timings", {}),
        "checkpoints": {name: str(config.run_dir / f"{name}.safetensors") for name in (TOKENIZER, DYNAMICS, POLICY)},
    }


def format_summary(summary: dict[str, Any]) -> str:
    tok, dyn = summary["tokenizer"], summary["dynamics"]
    rows = [
        ("source", summary["source"]),
        ("dataset", f"{summary['dataset']['episodes']} episodes, {summary['dataset']['steps']} steps"),
        (
            "tokenizer",
            f"{tok['tokens_per_frame']} tokens/frame, {tok['bytes_per_frame']:.1f} bytes/frame, "
            f"val PSNR {tok['val_psnr']:.2f} dB, SSIM {tok['val_ssim']:.3f}",
        ),
        (
            "dynamics",
            f"val next-frame token accuracy {dyn['val_token_accuracy']:.3f} "
            f"(copy-last {dyn['val_copy_last_accuracy']:.3f}), reward MAE {dyn['val_reward_mae']:.3f}",
        ),
        (
            "ppo (dream)",
            f"{summary['ppo']['imagined_steps']:.0f} imagined steps at "
            f"{summary['ppo']['steps_per_second']:.0f}/s, dream return {summary['ppo']['dream_return']:.1f}",
        ),
    ]
    n = summary["episodes_evaluated"]
    for name in ("policy", "random", "expert"):
        figures = summary[name]
        rows.append(
            (
                f"{name} (real)",
                f"{figures['real_return_mean']:.1f} +- {figures['real_return_std']:.1f} over {n} held-out episodes",
            )
        )
    rows.append(("rollout video", summary["rollout_video"]))
    rows.append(("time (s)", ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items())))
    width = max(len(r[0]) for r in rows)
    return "\n".join(["", "summary", "-" * 7] + [f"{k.ljust(width)}  {v}" for k, v in rows])
