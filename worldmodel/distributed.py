"""Data-parallel training under `torchrun`: one process per device, gradients averaged by DistributedDataParallel.

Launch any `worldmodel train` command with torchrun instead of python, e.g. two processes on one machine:

    torchrun --standalone --nproc_per_node 2 -m pipeline train tokenizer --preset tiny
    torchrun --standalone --nproc_per_node 8 -m pipeline train tokenizer --preset base run.device=cuda

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; each process then trains on its own stream of batches (the seed
offset by its rank) with `batch_size` frames per step, so the effective batch is `batch_size * WORLD_SIZE`. On CPU
the processes talk over gloo, on CUDA over nccl with one GPU each (`cuda:LOCAL_RANK`). Only rank 0 writes
checkpoints, metrics and progress bars. Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op
and training runs in one process as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
LossFunction = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def world_size() -> int:
    """Number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index among all of them (0 without torchrun)."""
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and prints."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA means this process's own GPU, `cuda:LOCAL_RANK`; other devices are kept as given."""
    if world_size() > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def active() -> bool:
    """Whether a process group is up, i.e. collectives must be called on every rank."""
    return dist.is_available() and dist.is_initialized()


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the duration (nccl for CUDA, gloo otherwise); a no-op in one process.

    On the way out every rank first waits for the others, so that none tears its connections down while another
    still talks over them (a gloo rank that did aborted at exit, once in a CI run). After an error the group is
    left as it is: the other ranks may be inside a collective, where a barrier or teardown would hang, and
    torchrun stops them when this process dies."""
    owner = world_size() > 1 and not active()
    if owner:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    yield
    if owner:
        dist.barrier()
        dist.destroy_process_group()


class _ForwardBatch(nn.Module):
    """A component's `forward_batch` as `forward`: DistributedDataParallel only hooks the gradient all-reduce
    into calls of the module itself, so calling `forward_batch` on the wrapped model would bypass it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.forward_batch(batch)


def loss_function(model: nn.Module) -> LossFunction:
    """`model.forward_batch`; inside a process group, the same call through DistributedDataParallel, so that
    `loss.backward()` averages the gradients over the ranks. Parameters stay `model`'s own (save and load it)."""
    if not active():
        return model.forward_batch
    device = next(model.parameters()).device
    return DistributedDataParallel(_ForwardBatch(model), device_ids=[device] if device.type == "cuda" else None)


def from_main(value: T) -> T:
    """Rank 0's `value` (any picklable object) on every rank; blocks until rank 0 gets here."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_value(value: float, device: torch.device) -> float:
    """Rank 0's `value` on every rank: what decides stopping early, or the learning rate, must agree, or ranks wait on
    each other forever, or their weights drift apart."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (every rank must pass the same keys in the same order)."""
    if not active():
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / dist.get_world_size()).tolist(), strict=True))
