"""`worldmodel bench imagination`: how many steps per second the dream takes, beside the real simulator.

All figures are measured in one process on the machine it runs on:

- The run's own real simulator (its `collect.source`: `CarRacing-v3` or `highway-fast-v0`) in a
  `gymnasium.vector.AsyncVectorEnv` with one process per CPU core and random actions, timed after the reset and
  the intro (CarRacing's zoom-in; `real_steps_per_s`), and the project's recorded step (`make_source_env`: for
  CarRacing each action held for 4 simulator steps, only the last frame drawn and shrunk to 64x64), which is
  what one dream step stands for (`real_recorded_steps_per_s`).
- The dream: `DreamVectorEnv` stepped with random actions, as PPO steps it (the run's horizon, burn-in,
  start fraction and temperature; dreams that end restart from real context inside `step`), with token-grid
  and with decoded-pixel observations, at each batch size. Steps per second count environment steps.
- What the dream costs: the FLOPs of one imagined step per environment (the dynamics model's cached
  single-frame step and its reward head, plus the decoder for pixels), counted by `FlopCounterMode`, and the
  peak of a large square matmul, to say how much of the machine the dream uses.
- Rounds: the real simulator and the trained dream are measured `rounds` times, one after the other; each rate
  is the median of its rounds, and each speedup the median of the rounds' own ratios (the rounds are in the
  JSON too). The machine's speed drifts between windows of a few seconds, and a ratio of two single windows
  drifts with it.
- Optionally, untrained dynamics models with the shapes of other presets (`configs/<name>.yaml`) on the
  run's tokenizer, since speed does not depend on the weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm.auto import tqdm

from agents.config import load_pipeline_config
from agents.ppo import PPOConfig
from envs.dream import DreamSettings, DreamVectorEnv
from envs.sources import SourceConfig, make_source_env
from worldmodel.config import ConfigError, from_dict, read_yaml_mapping
from worldmodel.dynamics import DynamicsModel
from worldmodel.files import write_json_atomic
from worldmodel.run_dir import RunDir
from worldmodel.train import resolve_device
from worldmodel.world_model import Sampling, WorldModel

OBS_MODES = {"latent": "tokens", "pixels": "pixels"}  # figure name -> DreamVectorEnv obs_mode


@dataclass
class ImaginationBenchConfig:
    batch_sizes: tuple[int, ...] = (1, 16, 256)
    seconds: float = 3.0
    """Timed seconds per measurement; at least one step is timed, however long it takes."""
    rounds: int = 3
    """The real simulator and the trained dream are measured this many times, round by round (simulator, then
    dream, then simulator again); rates are the medians of their rounds, speedups the medians of the rounds'
    ratios. On the shared 2-core machine one 3-second window of the simulator ran anywhere from 174 to 248
    steps/s within a minute."""
    real_envs: int | None = None
    """Real simulators in the vector env (None: one per CPU core; 0: skip the real simulator)."""
    preset_shapes: tuple[str, ...] = ()
    """Presets whose dynamics shape is also timed, untrained, on the run's tokenizer."""
    matmul_size: int = 2048
    device: str = "auto"
    dtype: str = "float32"
    """The dream's precision: float32 (the plain path) or bfloat16 (see `WorldModel.with_dtype`)."""
    temperature: float | None = None
    """The dream's sampling temperature (None: the run's `ppo.temperature`, greedy by default)."""
    top_k: int | None = None
    """Sample among the `top_k` likeliest tokens (with a temperature above 0; None: all of them)."""
    refine_steps: int | None = None
    """MaskGIT-style refinement rounds per imagined frame (None: the run's `ppo.refine_steps`, 0 by default)."""
    seed: int = 0


def _run_yaml(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A run's `config.yaml` as written (older runs may lack settings added since), or {} without one."""
    path = RunDir(run_dir).config
    return path, read_yaml_mapping(path, "run config") if path.is_file() else {}


def run_dream_settings(run_dir: Path) -> tuple[DreamSettings, str]:
    """The dream as the run's PPO stepped it (the `ppo` section of `<run>/config.yaml`, PPOConfig's defaults for
    what it does not say), in the model's own precision (the bench's `dtype` decides that), and where it came from."""
    path, raw = _run_yaml(run_dir)
    ppo = raw.get("ppo") or {}
    dream_keys = {f.name for f in dataclasses.fields(DreamSettings)}
    config = from_dict(PPOConfig, {key: value for key, value in ppo.items() if key in dream_keys}, f"{path}: ppo")
    origin = str(path) if ppo else "PPOConfig defaults (no ppo section in the run's config.yaml)"
    return dataclasses.replace(config.dream(), dtype=None), origin


class Progress:
    """One tqdm bar over all measurements; `measure` runs one and shows its result."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, desc="bench imagination", unit="measurement", dynamic_ncols=True)

    def measure(self, label: str, fn: Callable[[], float], unit: str) -> float:
        self.bar.set_description(label)
        value = fn()
        self.bar.update()
        self.bar.set_postfix_str(f"{label}: {value:,.1f} {unit}")
        return value

    def close(self) -> None:
        self.bar.close()


def timed_rate(step: Callable[[], Any], seconds: float) -> float:
    """Calls of `step` per second over at least `seconds` (at least one call)."""
    calls, start = 0, time.perf_counter()
    while True:
        step()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls / elapsed


def run_source(run_dir: Path) -> SourceConfig:
    """The simulator a run was recorded from (`collect.source` of its `config.yaml`; CarRacing if it says none)."""
    path, raw = _run_yaml(run_dir)
    return from_dict(SourceConfig, (raw.get("collect") or {}).get("source"), where=f"{path}: collect.source")


def real_steps_per_s(source: SourceConfig, recorded: bool, num_envs: int, seconds: float, seed: int = 0) -> float:
    """Environment steps per second of the source's simulator in an AsyncVectorEnv, random actions, after the intro.

    `recorded`: the project's recorded step (`make_source_env`), whose reset already skips the intro.
    """
    if recorded:
        make_env, intro_steps = partial(make_source_env, source), 0
    else:
        make_env = partial(source.source.make_simulator, source.frame_size, None, source.view)
        intro_steps = source.source.intro_steps
    envs = gym.vector.AsyncVectorEnv([make_env] * num_envs)
    try:
        envs.reset(seed=seed)
        idle = np.zeros(envs.action_space.shape, envs.action_space.dtype)
        for _ in range(intro_steps):  # the zoom-in: steps of the full cost that no recording keeps
            envs.step(idle)
        envs.action_space.seed(seed)
        actions = itertools.cycle([envs.action_space.sample() for _ in range(64)])
        return num_envs * timed_rate(lambda: envs.step(next(actions)), seconds)
    finally:
        envs.close()


def dream_steps_per_s(
    world: WorldModel, obs_mode: str, batch_size: int, seconds: float, settings: DreamSettings, seed: int = 0
) -> float:
    """Environment steps per second of a `DreamVectorEnv` of `batch_size` dreams, random actions."""
    context = world.dynamics.config.context_frames  # an untrained preset shape may see fewer frames
    burn_in = None if settings.burn_in is None else min(settings.burn_in, context)
    envs = DreamVectorEnv(
        world, batch_size, obs_mode, dataclasses.replace(settings, burn_in=burn_in), autoreset_mode="SameStep"
    )
    envs.reset(seed=seed)
    envs.action_space.seed(seed)
    actions = itertools.cycle([envs.action_space.sample() for _ in range(16)])
    envs.step(next(actions))  # first-call costs: kernel choices, allocations
    return batch_size * timed_rate(lambda: envs.step(next(actions)), seconds)


def matmul_gflops(dtype: torch.dtype, size: int, seconds: float, device: torch.device) -> float:
    """Achieved GFLOP/s of a square matmul in `dtype`, (size x size) @ (size x size), or smaller where one product
    of that size would take long: sizes double from 256 and stop at the first whose product takes over a tenth of
    a second. On a CPU without bf16 instructions (AVX2 only) bf16 ran 0.9 GFLOP/s, 19 s per 2048 product."""
    side = min(256, size)
    while True:
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        out = torch.empty(side, side, device=device, dtype=dtype)

        def step(a=a, b=b, out=out) -> None:
            torch.mm(a, b, out=out)
            if device.type == "cuda":
                torch.cuda.synchronize()

        began = time.perf_counter()
        step()
        if side >= size or time.perf_counter() - began > 0.1:
            break
        side *= 2
    return timed_rate(step, seconds) * 2 * side**3 / 1e9


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls and convolutions `fn` runs (a multiply-add counts 2).

    FlopCounterMode knows the CUDA attention kernels but not the one SDPA takes on the CPU (the refiner's
    attention takes it; the cached step attends with batched matmuls on the CPU): it is added here.
    """
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def step_flops(world: WorldModel, refine_steps: int = 0) -> dict[str, int]:
    """FLOPs of one imagined step of one environment with a full context: the dynamics model's cached step
    (`dynamics`), the whole `imagine` with its reward head (`latent`), plus decoding the frame (`pixels`)."""
    grid, device = world.grid_size, world.device
    tokens = torch.zeros(1, grid, grid, dtype=torch.long, device=device)  # (B, h, w)
    action = world.action_tensor(np.asarray(world.action_space.sample())[None])  # (B, ...)
    # a cached step attends to every slot of the ring, valid or not, so the count needs no burn-in
    dynamics = count_flops(
        lambda: world.dynamics(tokens.flatten(1)[:, None], action[:, None], world.dynamics.new_cache(1))
    )
    sampling = Sampling(refine_steps=refine_steps)
    latent = count_flops(lambda: world.imagine(world.dynamics.new_cache(1), tokens, action, sampling=sampling))
    world.frames(tokens)  # derives the decoder's inference kernels (`UpsampledConv`) once, as every step after
    decoder = count_flops(lambda: world.frames(tokens))
    return {"latent": latent, "pixels": latent + decoder, "dynamics": dynamics, "decoder": decoder}


def untrained_world(world: WorldModel, preset: str, seed: int = 0) -> WorldModel:
    """The run's tokenizer and contexts with an untrained dynamics model of `preset`'s shape."""
    trained = world.dynamics.config
    config = dataclasses.replace(
        load_pipeline_config(preset).dynamics.model,
        vocab_size=trained.vocab_size,
        tokens_per_frame=trained.tokens_per_frame,
        action_dim=trained.action_dim,
        discrete_actions=trained.discrete_actions,
        refine_layers=trained.refine_layers,  # the dream refines as the run's does
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            dynamics = DynamicsModel(config).to(world.device, next(world.dynamics.parameters()).dtype).eval()
        except ValueError as err:
            raise ConfigError(
                f"preset {preset!r}: its dynamics shape does not fit this run's tokenizer: {err}"
            ) from err
    with torch.no_grad():
        # random weights end nearly every dream at every step; trained CarRacing dreams hardly ever terminate,
        # so these end at the horizon too, and the timing is not a timing of restarts
        dynamics.termination_head[-1].bias.fill_(-20.0)
    return WorldModel(world.tokenizer, dynamics, world.action_space, world.contexts, world.meta, world.decode_dtype)


def dream_rates(
    world: WorldModel, config: ImaginationBenchConfig, settings: DreamSettings, progress: Progress, name: str
) -> dict[str, dict[str, float]]:
    """Steps per second by observation mode and batch size (keys "latent"/"pixels", then str(batch))."""
    rates: dict[str, dict[str, float]] = {mode: {} for mode in OBS_MODES}
    for mode, obs_mode in OBS_MODES.items():
        for batch in config.batch_sizes:
            rates[mode][str(batch)] = progress.measure(
                f"{name} {mode} b{batch}",
                partial(dream_steps_per_s, world, obs_mode, batch, config.seconds, settings, config.seed),
                "steps/s",
            )
    return rates


def dream_figures(
    world: WorldModel,
    rates: dict[str, dict[str, float]],
    config: ImaginationBenchConfig,
    settings: DreamSettings,
    peak_gflops: dict[str, float],
) -> dict[str, Any]:
    """The rates beside the FLOPs per step, the GFLOP/s at the largest batch and their share of the peak."""
    dtype = next(world.dynamics.parameters()).dtype
    flops = step_flops(world, settings.refine_steps)
    largest = str(max(config.batch_sizes))
    peak = peak_gflops.get({torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, ""))
    gflops = {mode: flops[mode] * rates[mode][largest] / 1e9 for mode in OBS_MODES}
    return {
        "dynamics_config": dataclasses.asdict(world.dynamics.config),
        "dynamics_parameters": sum(p.numel() for p in world.dynamics.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "dream_steps_per_s": rates,
        "dream_flops_per_step": flops,
        "gflops_at_batch": int(largest),
        "dream_gflops": gflops,
        "fraction_of_peak": {mode: value / peak if peak else None for mode, value in gflops.items()},
    }


def speedups(rates: dict[str, dict[str, float]], real: float | None, recorded: float | None) -> dict[str, float | None]:
    """Dream steps per second at the largest batch over the real simulator's (raw and recorded steps)."""
    out = {}
    for mode, by_batch in rates.items():
        largest = str(max(int(batch) for batch in by_batch))
        out[f"speedup_{mode}_b{largest}"] = by_batch[largest] / real if real else None
        out[f"speedup_{mode}_b{largest}_vs_recorded"] = by_batch[largest] / recorded if recorded else None
    return out


def bench_imagination(
    run_dir: str | Path, config: ImaginationBenchConfig | None = None, json_path: str | Path | None = None
) -> dict[str, Any]:
    """All figures of the module docstring for the run in `run_dir`, optionally written as JSON."""
    config = config or ImaginationBenchConfig()
    if not config.batch_sizes or min(config.batch_sizes) < 1:
        raise ConfigError(f"batch sizes must be positive integers, got {list(config.batch_sizes)}")
    if config.rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {config.rounds}")
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    world = WorldModel.load(run_dir, device).with_dtype(config.dtype)
    settings, settings_origin = run_dream_settings(run_dir)
    source = run_source(run_dir)
    asked = {"temperature": config.temperature, "top_k": config.top_k, "refine_steps": config.refine_steps}
    settings = dataclasses.replace(settings, **{name: value for name, value in asked.items() if value is not None})
    world.check_sampling(settings.sampling)  # refused now, not after the real simulator's minutes
    presets = {name: untrained_world(world, name, config.seed) for name in config.preset_shapes}
    real_envs = (os.cpu_count() or 1) if config.real_envs is None else config.real_envs
    per_round = (2 if real_envs else 0) + 2 * len(config.batch_sizes)
    progress = Progress(config.rounds * per_round + 2 + 2 * len(config.batch_sizes) * len(presets))
    try:
        rounds = []
        for index in range(config.rounds):
            tag = f"round {index + 1}/{config.rounds}:"
            real = recorded = None
            if real_envs:
                real = progress.measure(
                    f"{tag} real {source.source.simulator}",
                    partial(real_steps_per_s, source, False, real_envs, config.seconds, config.seed),
                    "steps/s",
                )
                recorded = progress.measure(
                    f"{tag} real recorded step",
                    partial(real_steps_per_s, source, True, real_envs, config.seconds, config.seed),
                    "steps/s",
                )
            rates = dream_rates(world, config, settings, progress, f"{tag} dream")
            measured = {"real_steps_per_s": real, "real_recorded_steps_per_s": recorded, "dream_steps_per_s": rates}
            rounds.append({**measured, **speedups(rates, real, recorded)})
        # every figure the median of its rounds; a speedup the median of the rounds' own ratios, each round having
        # timed the simulator and the dream back to back
        medians = _medians(rounds)
        real, recorded, rates = (
            medians[key] for key in ("real_steps_per_s", "real_recorded_steps_per_s", "dream_steps_per_s")
        )
        peak = {
            name: progress.measure(
                f"matmul {name}", partial(matmul_gflops, dtype, config.matmul_size, config.seconds, device), "GFLOP/s"
            )
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }
        trained = dream_figures(world, rates, config, settings, peak)
        by_preset = {}
        for name, untrained in presets.items():
            preset_rates = dream_rates(untrained, config, settings, progress, name)
            by_preset[name] = dream_figures(untrained, preset_rates, config, settings, peak)
            by_preset[name].update(speedups(preset_rates, real, recorded))
    finally:
        progress.close()
    figures: dict[str, Any] = {
        "run": str(run_dir),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": dataclasses.asdict(config),
        "dream_settings": {
            **dataclasses.asdict(settings),
            "dtype": config.dtype,  # the bench's own, applied to the model it loads
            "autoreset_mode": "SameStep",
            "source": settings_origin,
        },
        "real_envs": real_envs,
        "real_simulator": source.source.simulator,
        "real_action_repeat": source.repeat,
        "real_steps_per_s": real,
        "real_recorded_steps_per_s": recorded,
        **trained,
        **{key: value for key, value in medians.items() if key.startswith("speedup_")},
        "matmul_peak_gflops": peak,
        "rounds": rounds,
    }
    if by_preset:
        figures["by_preset"] = by_preset
    if json_path:
        write_json_atomic(json_path, figures)
    return figures


def _medians(rounds: list[Any]) -> Any:
    """The rounds' median, key by key through nested dicts; None where nothing was measured (no simulator)."""
    first = rounds[0]
    if isinstance(first, dict):
        return {key: _medians([measured[key] for measured in rounds]) for key in first}
    return None if first is None else float(np.median(rounds))


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(figures: dict[str, Any]) -> str:
    """The figures as a few plain-text lines for the console."""
    lines = [
        f"imagination throughput: {figures['run']} on {figures['device']}, {figures['threads']} torch threads, "
        f"{figures['cpu_count']} CPUs, torch {figures['torch']}",
    ]
    if figures["real_steps_per_s"] is not None:
        lines.append(
            f"real {figures.get('real_simulator', 'CarRacing-v3')}, {figures['real_envs']} processes: "
            f"{_number(figures['real_steps_per_s'])} simulator steps/s; "
            f"{_number(figures['real_recorded_steps_per_s'])} recorded steps/s "
            f"({figures['real_action_repeat']} simulator step(s) each)"
        )
    dream = figures["dream_settings"]
    sampling = "greedy" if dream["temperature"] == 0 else f"temperature {dream['temperature']}, top-k {dream['top_k']}"
    lines.append(
        f"dream stepped as PPO steps it: horizon {dream['horizon']}, burn-in {dream['burn_in'] or 'up to 4'}, "
        f"start fraction {dream['start_fraction']}, {sampling}, {dream['refine_steps']} refinement rounds"
    )
    peak = figures["matmul_peak_gflops"]
    lines.append(
        f"matmul peak (up to {figures['config']['matmul_size']}^2): "
        f"fp32 {peak['fp32']:,.1f}, bf16 {peak['bf16']:,.1f} GFLOP/s"
    )
    rows = [("dream (trained run)", figures)] + [
        (f"{name} shape, untrained", by) for name, by in figures.get("by_preset", {}).items()
    ]
    batches = list(figures["dream_steps_per_s"]["latent"])
    largest = str(figures["gflops_at_batch"])
    header = f"{'dream steps/s':<30}" + "".join(f"{'b' + b:>12}" for b in batches)
    header += f"{'x real':>9}{'x recorded':>12}{'MFLOP/step':>12}{'GFLOP/s':>9}{'of peak':>9}"
    lines += ["", header]
    for title, by in rows:
        config = by["dynamics_config"]
        lines.append(
            f"{title}: d_model {config['d_model']}, {config['layers']} layers, patch {config['patch']}, "
            f"{config['context_frames']} frames, {by['dynamics_parameters'] / 1e6:.2f} M parameters"
        )
        for mode in OBS_MODES:
            fraction = by["fraction_of_peak"][mode]
            line = f"  {mode:<28}" + "".join(f"{_number(by['dream_steps_per_s'][mode][b]):>12}" for b in batches)
            line += f"{_number(by.get(f'speedup_{mode}_b{largest}'), 1):>9}"
            line += f"{_number(by.get(f'speedup_{mode}_b{largest}_vs_recorded'), 1):>12}"
            line += f"{by['dream_flops_per_step'][mode] / 1e6:>12.2f}{by['dream_gflops'][mode]:>9.1f}"
            line += f"{'-' if fraction is None else f'{100 * fraction:.1f}%':>9}"
            lines.append(line)
    lines.append(f"(at batch {largest}: x real over simulator steps/s, x recorded over recorded steps/s; GFLOP/s)")
    rounds = figures["rounds"]
    if len(rounds) > 1:
        lines.append(f"trained dream and real simulator: medians of {len(rounds)} rounds; each round's x real:")
        for index, measured in enumerate(rounds, 1):
            times = ", ".join(f"{mode} {_number(measured.get(f'speedup_{mode}_b{largest}'), 1)}" for mode in OBS_MODES)
            lines.append(f"  round {index}: real {_number(measured['real_steps_per_s'])} steps/s; {times}")
    return "\n".join(lines)
