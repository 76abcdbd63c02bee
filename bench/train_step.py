"""`worldmodel bench train-step`: what one training step of each preset's tokenizer and dynamics model costs.

Each preset's models (`configs/<name>.yaml`, untrained, CarRacing's 3-channel frames at the preset's frame size and
its 3-d continuous action) take optimizer steps on random batches of the preset's own batch size, through the
trainer's own step (`worldmodel.trainer.training_step`: forward, backward, clipping) and AdamW, in float32 and
under bf16 autocast. The data is random because the cost of a step does not depend on it; loading real batches is
not timed. Figures: steps/s, ms per step, frames/s (tokenizer) or frames of context/s (dynamics), the step's
model FLOPs (matmuls and convolutions, forward and backward, `FlopCounterMode`) and their rate, and the peak
memory on CUDA. These say how long a preset's step budget takes on a machine, and what bf16 buys there."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from agents.config import PipelineConfig, load_pipeline_config
from bench.imagination import timed_rate
from worldmodel.config import ConfigError, read_yaml_mapping
from worldmodel.dynamics import DynamicsModel
from worldmodel.run_dir import RunDir
from worldmodel.tokenizer import Tokenizer
from worldmodel.train import fitted_dynamics_config, resolve_device
from worldmodel.trainer import training_step

ACTION_DIM = 3
"""CarRacing's continuous action (steer, gas, brake): the default source's."""


@dataclass(frozen=True)
class TrainStepBenchConfig:
    presets: tuple[str, ...] = ("tiny", "small", "base")
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    """float32, or bfloat16: the forward under bf16 autocast (what the trainer does on CUDA)."""
    seconds: float = 3.0
    """Timed seconds per measurement, after 3 untimed steps; at least one step is timed."""
    device: str = "auto"
    seed: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(preset: str, device: torch.device) -> dict[str, tuple[torch.nn.Module, Callable[[], dict], int]]:
    """(model, batch maker, frames per batch) of the preset's tokenizer and dynamics model."""
    config = load_pipeline_config(preset)
    size = config.collect.source.frame_size
    tokenizer_config = dataclasses.replace(config.tokenizer.model, image_size=size, image_width=None, channels=3)
    tokenizer_config.validate()
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
    dynamics_config = fitted_dynamics_config(config.dynamics.model, tokenizer_config, action_space)
    frames_batch = config.tokenizer.train.batch_size
    windows, window = config.dynamics.train.batch_size, dynamics_config.context_frames

    def frames() -> dict[str, torch.Tensor]:
        return {"frames": torch.randint(0, 256, (frames_batch, size, size, 3), dtype=torch.uint8, device=device)}

    def windows_batch() -> dict[str, torch.Tensor]:
        tokens = (windows, window + 1, dynamics_config.tokens_per_frame)
        return {
            "tokens": torch.randint(0, dynamics_config.vocab_size, tokens, device=device),
            "actions": torch.rand(windows, window, ACTION_DIM, device=device) * 2 - 1,
            "rewards": torch.randn(windows, window, device=device),
            "terminated": torch.zeros(windows, window, device=device),
        }

    return {
        "tokenizer": (Tokenizer(tokenizer_config).to(device), frames, frames_batch),
        "dynamics": (DynamicsModel(dynamics_config).to(device), windows_batch, windows * window),
    }


def _step_flops(step: Callable[[], None]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def measure(
    model: torch.nn.Module, batch: Callable[[], dict], bf16: bool, seconds: float, device: torch.device
) -> dict[str, float]:
    """Steps per second of `model`'s training step on fixed random batches, and its FLOPs per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [batch() for _ in range(2)]  # made before the clock starts

    def step(index: int = 0) -> None:
        training_step(model, model.forward_batch, optimizer, batches[index % 2], grad_clip=1.0, bf16=bf16)
        optimizer.step()

    model.train()
    for index in range(3):
        step(index)
    flops = _step_flops(step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    counter = itertools.count()

    def synced_step() -> None:
        step(next(counter))
        _sync(device)

    steps_per_s = timed_rate(synced_step, seconds)
    figures = {"steps_per_s": steps_per_s, "ms_per_step": 1000 / steps_per_s, "flops_per_step": flops}
    figures["tflops"] = flops * figures["steps_per_s"] / 1e12
    if device.type == "cuda":
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return figures


def machine_time_scale(
    preset: str, reference: tuple[float, float], seconds: float = 3.0, device: str = "cpu"
) -> dict[str, Any]:
    """How many times slower than the machine of `reference` (the tokenizer's and the dynamics model's training
    steps/s) this one trains `preset`'s own models: the mean of the two ratios, each step timed `seconds` in float32
    as `bench train-step` times it. What `run.time_scale: auto` multiplies the minute budgets by."""
    torch_device = resolve_device(device)
    torch.manual_seed(0)
    models = _models(preset, torch_device)
    rates = [
        measure(*models[component][:2], bf16=False, seconds=seconds, device=torch_device)["steps_per_s"]
        for component in ("tokenizer", "dynamics")
    ]
    scale = float(np.mean([wanted / measured for wanted, measured in zip(reference, rates, strict=True)]))
    return {"scale": float(f"{scale:.3g}"), "rates": [round(rate, 2) for rate in rates], "reference": list(reference)}


def recorded_time_scale(run_dir: Path) -> float | None:
    """The factor a run folder's config.yaml says its minute budgets were scaled by (`run.scaled_by`), or None where
    the run has not started; a config.yaml from before runs recorded it is refused."""
    recorded = RunDir(run_dir).config
    if not recorded.is_file():
        return None
    scale = (read_yaml_mapping(recorded, "run config").get("run") or {}).get("scaled_by")
    if scale is None:
        raise ConfigError(
            f"run.time_scale=auto: {recorded} does not say what its minute budgets were scaled by (a run started "
            "before runs recorded it); resume it with the run.time_scale it started with"
        )
    return float(scale)


def auto_time_scale(config: PipelineConfig, preset: str) -> float:
    """What `run.time_scale: auto` stands for in `config`'s run: the factor its folder's config.yaml recorded when it
    started (a resumed run keeps its minutes), else how many times slower than the preset's `run.reference_rates`
    this machine trains (`machine_time_scale`), never below 1 (the loop's minutes also drive the simulator, which a
    GPU does not speed up). The whole factor against the reference machine, whatever `config.run.scaled_by` is."""
    scale = recorded_time_scale(config.run_dir)
    if scale is not None:
        print(f"run.time_scale=auto: {config.run_dir} started with its minute budgets x{scale:g}, and goes on so")
        return scale
    reference = config.run.reference_rates
    if reference is None:
        raise ConfigError(
            "run.time_scale=auto: the preset has no run.reference_rates (the tokenizer's and the dynamics "
            "model's training steps/s where its minutes were set) to compare this machine with; give a number"
        )
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    measured = machine_time_scale(preset, reference, device=config.run.device)
    scale = max(1.0, measured["scale"])
    (tokenizer, dynamics), (tokenizer_then, dynamics_then) = measured["rates"], reference
    print(
        f"run.time_scale=auto: this machine trains the tokenizer at {tokenizer:.2f} and the dynamics model at "
        f"{dynamics:.2f} steps/s, the preset's minutes were set at {tokenizer_then:g} and {dynamics_then:g}: "
        f"every minute budget x{scale:g}" + (" (never below 1)" if measured["scale"] < 1 else "")
    )
    return scale


def bench_train_step(config: TrainStepBenchConfig) -> dict[str, Any]:
    device = resolve_device(config.device)  # the pipeline's own rule for "auto"
    unknown = [d for d in config.dtypes if d not in ("float32", "bfloat16")]
    if unknown:
        raise ConfigError(f"dtypes are float32 or bfloat16, got {unknown}")
    models = {}
    for preset in config.presets:  # every preset is read before any timing, so a bad name fails at once
        torch.manual_seed(config.seed)
        models[preset] = _models(preset, device)
    rows = []
    cells = [(p, c, d) for p in config.presets for c in ("tokenizer", "dynamics") for d in config.dtypes]
    for preset, component, dtype in tqdm(cells, desc="bench train-step", dynamic_ncols=True):
        model, batch, frames = models[preset][component]
        figures = measure(model, batch, dtype == "bfloat16", config.seconds, device)
        figures["frames_per_s"] = frames * figures["steps_per_s"]
        parameters = sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "preset": preset,
                "component": component,
                "dtype": dtype,
                "parameters": parameters,
                "frames_per_step": frames,
                **figures,
            }
        )
        tqdm.write(f"{preset} {component} {dtype}: {figures['steps_per_s']:.2f} steps/s")
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": config.seconds,
        "rows": rows,
    }


def format_table(figures: dict[str, Any]) -> str:
    lines = [
        f"training steps on {figures['device_name']} (torch {figures['torch']}, random batches of each preset's size)",
        "",
        "| preset | component | parameters | dtype | frames/step | steps/s | ms/step | frames/s | TFLOP/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in figures["rows"]:
        memory = f"{row['peak_memory_gib']:.2f}" if "peak_memory_gib" in row else "-"
        lines.append(
            f"| {row['preset']} | {row['component']} | {row['parameters'] / 1e6:.1f} M | {row['dtype']} |"
            f" {row['frames_per_step']} | {row['steps_per_s']:.2f} | {row['ms_per_step']:.1f} |"
            f" {row['frames_per_s']:,.0f} | {row['tflops']:.2f} | {memory} |"
        )
    return "\n".join(lines)
