"""One run's settings: every stage's section (`collect` from envs, `tokenizer` and `dynamics` from worldmodel, `ppo`,
`loop` and `eval` from here) in one dataclass, read from a preset, its per-source overlay and the overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agents.evaluate import EvalConfig
from agents.loop import LoopConfig
from agents.ppo import PPOConfig
from envs.collect import CollectConfig
from worldmodel.checkpoint import CheckpointError
from worldmodel.config import RunConfig, apply_override, from_dict, load_preset
from worldmodel.rollout import RolloutConfig
from worldmodel.train import DynamicsStage, TokenizerStage


@dataclass
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    dynamics: DynamicsStage = field(default_factory=DynamicsStage)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
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


def read_run_config(run_dir: str | Path) -> PipelineConfig:
    """The settings a run folder was made with (its `config.yaml`, written by `worldmodel run`)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; expected a run folder written by `worldmodel run`")
    return from_dict(PipelineConfig, yaml.safe_load(path.read_text()), where=str(path))
