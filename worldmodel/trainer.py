"""One trainer for every component: a module with `forward_batch(batch) -> (loss, logs)` and a batch sampler."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from worldmodel import distributed
from worldmodel.checkpoint import (
    CheckpointError,
    checkpoint_exists,
    config_matches,
    load_module,
    resumable,
    save_checkpoint,
    write_meta,
)
from worldmodel.logger import RunLogger


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: Literal["constant", "cosine"] = "constant"
    """After the linear warm-up: the constant `lr`, or a cosine decay from it to `min_lr_ratio * lr` at `steps` or,
    under `max_minutes`, at the end of the budget, whichever comes first: a run the clock stops ends at the floor
    too, on a slow machine as on a fast one."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 25
    eval_every: int = 250
    checkpoint_every: int = 100
    max_minutes: float | None = None
    """Wall-clock budget: training stops at `steps` or after this many minutes, whichever comes first. A resumed run
    gets what its earlier runs left of the budget."""
    seed: int = 0


def lr_factor(step: int, config: TrainConfig, seconds: float = 0.0) -> float:
    """The multiple of `config.lr` used at `step` (0-based) after `seconds` of training: a linear warm-up to 1, then
    the schedule, whose progress is the further of the steps' and the budget's."""
    warmup = max(config.warmup_steps, 1)
    if step < warmup or config.schedule == "constant":
        return min(1.0, (step + 1) / warmup)
    progress = (step - warmup + 1) / max(config.steps - warmup, 1)
    if config.max_minutes:
        progress = max(progress, seconds / (60 * config.max_minutes))
    progress = min(1.0, progress)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's moments as flat tensors, for `save_checkpoint`'s `state` (`restore_optimizer` reads them)."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    return tensors


def progress_state(step: int, seconds: float) -> dict[str, torch.Tensor]:
    """The step and training seconds a `_last` checkpoint was written at, kept with its weights as well as in its
    `.json`: the weights are written first, so a kill between the two files leaves newer weights beside an older
    sidecar, and these say which step the weights are of (`resumed_progress`)."""
    return {
        "progress.step": torch.tensor(step, dtype=torch.int64),
        "progress.seconds": torch.tensor(seconds, dtype=torch.float64),
    }


def resumed_progress(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(step, seconds) to resume a training from: the sidecar's, unless the weights were saved at another step (a
    kill between the checkpoint's two files), then theirs. A checkpoint from before the weights kept them: the
    sidecar's."""
    if "progress.step" in state and int(state["progress.step"]) != int(meta["step"]):
        return int(state["progress.step"]), float(state["progress.seconds"])
    return int(meta["step"]), float(meta.get("seconds", 0.0))


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Put the moments `optimizer_state` kept back into `optimizer`, made for the same parameters."""
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def training_step(
    model: nn.Module,
    forward_batch: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    grad_clip: float,
    bf16: bool | None = None,
) -> dict[str, float]:
    """One step's forward, backward and gradient clipping (the optimizer's `step` is the caller's): the loss's
    logs plus `grad_norm`. The forward runs under bf16 autocast when `bf16`, by default on CUDA only: on a CPU
    without bf16 instructions autocast makes training several times slower."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if bf16 is None else bf16):
        loss, logs = forward_batch(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    return logs


def train(
    model: nn.Module,
    sample_batch: Callable[[int], dict[str, torch.Tensor]],
    config: TrainConfig,
    checkpoint_path: Path,
    kind: str,
    logger: RunLogger,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    extra_meta: dict | None = None,
    description: str = "train",
    init: Path | None = None,
    step_offset: int = 0,
) -> dict[str, float]:
    """Train `model` and write `<checkpoint_path>.safetensors`; resumes from `<checkpoint_path>_last` if present.

    Without a `_last` to resume, `init` (a checkpoint of the same kind and config, such as an earlier stage's
    `_last`) gives the starting weights and optimizer moments: training goes on from where that one stopped.
    `step_offset` is added to the steps metrics are logged at, so that continued training logs after the earlier.

    `sample_batch(step)` returns a dict of tensors for `model.forward_batch`; metrics are logged as
    `<kind>/train/<name>` and, from `evaluate`, `<kind>/val/<name>`. Returns the last validation metrics and
    `steps`, the steps trained in all (fewer than `config.steps` where `max_minutes` stopped it).
    Under torchrun this is data-parallel (see `worldmodel.distributed`): every rank resumes from the same
    checkpoint and steps in lockstep; `sample_batch` should give each rank its own batches; rank 0 alone
    evaluates, logs and writes checkpoints, and every rank returns its validation metrics.
    """
    device = next(model.parameters()).device
    with distributed.process_group(device):
        main = distributed.is_main()
        torch.manual_seed(config.seed + distributed.rank())
        last = resumable(checkpoint_path)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        start, seconds = 0, 0.0
        if checkpoint_exists(last):
            restored, meta, state = load_module(last, kind, type(model), type(model.config))
            stale = {k: v for k, v in (extra_meta or {}).items() if k.endswith("fingerprint") and meta.get(k) != v}
            if stale or not config_matches(meta["config"], model.config):
                raise CheckpointError(
                    f"{last} was trained on other inputs or another config ({sorted(stale) or 'config'});"
                    f" delete it to start this stage afresh"
                )
            model.load_state_dict(restored.state_dict())
            restore_optimizer(optimizer, state)
            start, seconds = resumed_progress(meta, state)
            if main and start != int(meta["step"]):
                # mend the sidecar now: a kill at the last step leaves nothing to train, so no save would
                tqdm.write(
                    f"{last}: its weights are of step {start}, its .json of step {meta['step']} (a kill between"
                    " the two files): resuming from the weights' step"
                )
                write_meta(last, {**meta, "step": start, "seconds": seconds})
            if main:
                tqdm.write(f"resuming {kind} training from step {start} ({last})")
        elif init is not None:
            restored, meta, state = load_module(init, kind, type(model), type(model.config))
            if not config_matches(meta["config"], model.config):
                raise CheckpointError(f"{init} has another config than this {kind} training; it cannot continue it")
            model.load_state_dict(restored.state_dict())
            if state:
                restore_optimizer(optimizer, state)
        forward_batch = distributed.loss_function(model)
        began = time.monotonic() - seconds  # the budget counts the earlier runs' training time
        val_logs: dict[str, float] = {}
        step = start
        progress = tqdm(
            range(start, config.steps),
            desc=description,
            initial=start,
            total=config.steps,
            dynamic_ncols=True,
            disable=not main,
        )
        for step in progress:
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, config, seconds)
            logs = training_step(model, forward_batch, optimizer, sample_batch(step), config.grad_clip)
            if step % config.log_every == 0:
                logs = distributed.mean_over_ranks(logs, device)
                if main:
                    logger.log({f"{kind}/train/{k}": v for k, v in logs.items()}, step_offset + step)
                progress.set_postfix({k: f"{logs[k]:.3g}" for k in list(logs)[:4]})
            optimizer.step()
            done = step + 1
            if config.max_minutes is not None:  # rank 0's clock: every rank must stop, and decay, alike
                seconds = distributed.main_value(time.monotonic() - began, device)
            out_of_time = config.max_minutes is not None and seconds > 60 * config.max_minutes
            if main and evaluate is not None and (done % config.eval_every == 0 or done == config.steps or out_of_time):
                model.eval()
                val_logs = evaluate(model)
                logger.log({f"{kind}/val/{k}": v for k, v in val_logs.items()}, step_offset + done)
                tqdm.write(f"{kind} step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in val_logs.items()))
            if main and (done % config.checkpoint_every == 0 or done == config.steps or out_of_time):
                meta = {"step": done, "seconds": seconds, **(extra_meta or {})}
                save_checkpoint(
                    last, model, kind, meta, {**optimizer_state(optimizer), **progress_state(done, seconds)}
                )
            if out_of_time:
                if main:
                    tqdm.write(f"{kind}: stopping at step {done} after the {config.max_minutes:g}-minute budget")
                break
        progress.close()
        final_step = step + 1 if config.steps > start else start
        if main:
            if evaluate is not None and not val_logs:
                model.eval()
                val_logs = evaluate(model)
            save_checkpoint(checkpoint_path, model, kind, {"step": final_step, "val": val_logs, **(extra_meta or {})})
        del forward_batch  # a DistributedDataParallel wrapper goes before the process group it holds
        # the other ranks wait here until rank 0 has evaluated and written the final checkpoint
        return distributed.from_main({**val_logs, "steps": final_step})
