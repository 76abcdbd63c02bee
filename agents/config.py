"""One run's settings: every stage's section (`collect` from envs, `tokenizer` and `dynamics` from worldmodel, `ppo`,
`loop` and `eval` from here) in one dataclass, read from a preset, its per-source overlay and the overrides."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from agents.evaluate import EvalConfig
from agents.loop import LoopConfig
from agents.ppo import PPOConfig
from envs.collect import CollectConfig
from worldmodel.checkpoint import CheckpointError
from worldmodel.config import ConfigError, RunConfig, apply_override, from_dict, load_preset, read_yaml_mapping, whole
from worldmodel.rollout import RolloutConfig
from worldmodel.run_dir import RunDir
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
        return RunDir(self.run_dir).dataset


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
        if item.split("=", 1)[0].strip() == "run.scaled_by":
            raise ConfigError(f"{item}: run.scaled_by records what a run's minutes were scaled by; set run.time_scale")
        apply_override(raw, item)
    config = from_dict(PipelineConfig, raw)
    check_pipeline_config(config)
    return scale_minutes(config)


MINUTE_BUDGETS = (
    "tokenizer.train.max_minutes",
    "dynamics.train.max_minutes",
    "ppo.max_minutes",
    "loop.max_minutes",
    "loop.dynamics_minutes",
    "loop.ppo_minutes",
)
"""The settings `run.time_scale` multiplies."""


def scale_minutes(config: PipelineConfig) -> PipelineConfig:
    """`config` with every minute budget (`MINUTE_BUDGETS`, those not null) times `run.time_scale`, which becomes 1.0
    and multiplies `run.scaled_by`: the result says what will run, and loading it again scales nothing twice. `auto`
    stays as it is, for `worldmodel run` (or `bench reliability`, once for its seeds) to measure
    (`bench.train_step.auto_time_scale`)."""
    scale = config.run.time_scale
    if scale == 1 or scale == "auto":
        return config
    for key in MINUTE_BUDGETS:
        *path, name = key.split(".")
        section = functools.reduce(getattr, path, config)
        if getattr(section, name) is not None:
            setattr(section, name, getattr(section, name) * scale)
    config.run.time_scale = 1.0
    config.run.scaled_by *= scale
    return config


def read_run_config(run_dir: str | Path) -> PipelineConfig:
    """The settings a run folder was made with (its `config.yaml`, written by `worldmodel run`)."""
    path = RunDir(run_dir).config
    if not path.is_file():
        raise CheckpointError(f"{path} not found; expected a run folder written by `worldmodel run`")
    return from_dict(PipelineConfig, read_yaml_mapping(path, "run config"), where=str(path))


def _number(value: Any) -> bool:
    """A finite int or float (YAML's `true` is no count, `.inf` no rate)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _number(value) and value >= 0


def _fraction(value: Any) -> bool:
    return 0 <= value <= 1


def _optional_positive(value: Any) -> bool:
    return value is None or _positive(value)


def _levels(value: Any) -> bool:
    return len(value) >= 1 and all(whole(level, 2) for level in value)


def _device(value: Any) -> bool:
    if value == "auto":
        return True
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        return False
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())


# (keys, the test a value must pass, what the error says was expected)
RULES: list[tuple[tuple[str, ...], Any, str]] = [
    (
        (
            "collect.episodes",
            "collect.source.frame_size",
            "tokenizer.val_frames",
            "dynamics.val_batches",
            "dynamics.model.context_frames",
            "dynamics.model.d_model",
            "dynamics.model.layers",
            "dynamics.model.heads",
            "dynamics.model.patch",
            "ppo.num_envs",
            "ppo.rollout_steps",
            "ppo.total_steps",
            "ppo.horizon",
            "ppo.epochs",
            "ppo.minibatches",
            "ppo.hidden",
            "ppo.policy_frames",
            "loop.episodes",
            "loop.dynamics_steps",
            "loop.ppo_steps",
            "eval.episodes",
            "rollout.steps",
            "rollout.scale",
            "rollout.fps",
            *(
                f"{stage}.train.{key}"
                for stage in ("tokenizer", "dynamics")
                for key in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every")
            ),
        ),
        _positive,
        "a number > 0",
    ),
    (
        ("tokenizer.train.lr", "dynamics.train.lr", "ppo.lr", "ppo.clip", "ppo.reward_scale", "run.scaled_by"),
        _positive,
        "a number > 0",
    ),
    (("run.time_scale",), lambda v: v == "auto" or _positive(v), "a number > 0 or 'auto'"),
    (
        ("run.reference_rates",),
        lambda v: v is None or (len(v) == 2 and all(_positive(rate) for rate in v)),
        "null or [tokenizer, dynamics] training steps/s, both > 0",
    ),
    (
        (
            "loop.iterations",
            "loop.real_epochs",
            "collect.workers",  # 0 or 1: in this process
            "loop.workers",
            "eval.workers",
            "tokenizer.train.warmup_steps",
            "dynamics.train.warmup_steps",
            "ppo.refine_steps",
            "ppo.temperature",
            "ppo.ent_coef",
            "ppo.vf_coef",
            "collect.seed",
            "eval.seed",
        ),
        _non_negative,
        "a number >= 0",
    ),
    (
        (
            *MINUTE_BUDGETS,
            "collect.source.frame_width",
            "collect.source.action_repeat",
            "collect.source.max_steps",
            "loop.max_steps",
            "eval.max_steps",
            "ppo.top_k",
            "run.threads",
        ),
        _optional_positive,
        "null or a number > 0",
    ),
    (
        (
            "collect.random_fraction",
            "collect.action_noise",
            "collect.perturb_prob",
            "collect.start_perturb_prob",
            "ppo.start_fraction",
            "ppo.gae_lambda",
            "loop.explore",
            "loop.recent_share",
            "loop.recent_starts",
            "tokenizer.train.min_lr_ratio",
            "dynamics.train.min_lr_ratio",
        ),
        _fraction,
        "a fraction in [0, 1]",
    ),
    (("run.val_fraction",), lambda v: 0 < v < 1, "a fraction strictly between 0 and 1"),
    (("run.device",), _device, "'cpu', 'auto' or, on a machine with CUDA, 'cuda' (or 'cuda:N')"),
    (("tokenizer.model.levels",), _levels, "a list of integers >= 2 (FSQ levels)"),
    (("ppo.gamma",), lambda v: 0 < v <= 1, "a discount in (0, 1]"),
    (("dynamics.reward_smoothing",), lambda v: v >= 1 and v % 2 == 1, "an odd number of steps >= 1 (centred)"),
    (("dynamics.termination_lookahead",), lambda v: v >= 1, "a number of steps >= 1"),
    (("ppo.dtype",), lambda v: v in (None, "float32", "bfloat16"), "'float32', 'bfloat16' or null (the model's)"),
    (("collect.perturb_steps",), lambda v: len(v) == 2 and 1 <= v[0] <= v[1], "[shortest, longest] with 1 <= both"),
]


def _value(config: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        config = getattr(config, key)
    return config


def check_pipeline_config(config: PipelineConfig) -> None:
    """Refuse a setting no stage could run with, naming its key, before any work starts: values out of range, a
    burn-in longer than the dynamics model's context, and evaluation seeds that collection (first episodes and
    every loop round) would also drive."""
    for keys, test, expected in RULES:
        for key in keys:
            value = _value(config, key)
            try:
                ok = bool(test(value))
            except TypeError:
                ok = False
            if not ok:
                raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    height, width = config.collect.source.frame_shape
    tokenizer = replace(config.tokenizer.model, image_size=height, image_width=None if width == height else width)
    try:
        tokenizer.validate()  # as its stage will, once the episodes are collected
    except ValueError as err:
        raise ConfigError(f"tokenizer.model, for collect.source's {height}x{width} frames: {err}") from None
    ppo = config.ppo
    if ppo.minibatches > ppo.num_envs * ppo.rollout_steps:
        raise ConfigError(
            f"ppo.minibatches: expected at most a rollout's ppo.num_envs x ppo.rollout_steps ="
            f" {ppo.num_envs * ppo.rollout_steps} steps, got {ppo.minibatches}"
        )
    model = config.dynamics.model
    if model.d_model % model.heads or (model.d_model // model.heads) % 2:
        raise ConfigError(
            f"dynamics.model.heads: expected a number of heads that splits d_model ({model.d_model}) into heads of "
            f"even width, got {model.heads}"
        )
    context = config.dynamics.model.context_frames
    for key in ("ppo.burn_in", "rollout.burn_in"):
        if _value(config, key) is not None and not 1 <= _value(config, key) <= context:
            raise ConfigError(
                f"{key}: expected 1 to dynamics.model.context_frames ({context}), got {_value(config, key)}"
            )
    # dataset episode i is driven on seed collect.seed + i; the loop appends (iterations + 1) rounds of episodes,
    # and its playoff drives the seeds after them
    loop = config.loop
    collected = config.collect.episodes + ((loop.iterations + 1) * loop.episodes + loop.playoff_episodes) * (
        loop.iterations > 0
    )
    first, last = config.collect.seed, config.collect.seed + collected - 1
    eval_first, eval_last = config.eval.seed, config.eval.seed + config.eval.episodes - 1
    if eval_first <= last and first <= eval_last:
        raise ConfigError(
            f"eval.seed: expected evaluation seeds apart from the collection's {first}..{last} (collect.seed + each"
            f" dataset episode, loop rounds and playoff included), got {eval_first}..{eval_last}"
        )
