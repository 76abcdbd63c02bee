"""Checkpoints as safetensors weights plus a JSON sidecar (config, kind, fingerprints): no pickle anywhere."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from worldmodel.config import from_dict
from worldmodel.files import atomic_path, write_json_atomic


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of the wrong kind, or incompatible with its partner model."""


def clean_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without torch.compile's `_orig_mod.` prefixes, contiguous and on the CPU."""
    module = getattr(module, "_orig_mod", module)
    return {k.replace("_orig_mod.", ""): v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights, used to tie a dynamics model to the tokenizer it was trained on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(clean_state_dict(module).items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def resumable(path: str | Path) -> Path:
    """The checkpoint a training stage keeps as it goes (`<stem>_last`), with its optimizer moments, to resume from
    or to continue training on."""
    path = Path(path)
    return path.with_name(path.name + "_last")


def checkpoint_exists(path: str | Path) -> bool:
    """Whether both files of the checkpoint at `path` are there. `save_checkpoint` and `copy_checkpoint` write the
    weights first: a kill between the two files of a first write leaves weights without their `.json`, which this
    counts as no checkpoint (to be written again), not as one that cannot be read."""
    path = Path(path)
    return path.with_suffix(".safetensors").is_file() and path.with_suffix(".json").is_file()


def save_checkpoint(
    path: str | Path,
    module: nn.Module,
    kind: str,
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `<path>.safetensors` and `<path>.json` atomically; `state` holds extra tensors (optimizer moments)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = clean_state_dict(module)
    for key, value in (state or {}).items():
        tensors[f"__state__.{key}"] = value.detach().contiguous().cpu()
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        save_file(tensors, tmp)
    config = getattr(module, "config", None)
    write_meta(
        path, {"kind": kind, "config": dataclasses.asdict(config) if config is not None else {}, **(extra or {})}
    )
    return path.with_suffix(".safetensors")


def write_meta(path: str | Path, meta: dict[str, Any]) -> None:
    """Write the `.json` sidecar of the checkpoint at `path` atomically (`save_checkpoint` writes it after the
    weights; a resume that finds it older than the weights writes it again)."""
    write_json_atomic(Path(path).with_suffix(".json"), meta)


def copy_checkpoint(source: str | Path, target: str | Path, kind: str) -> Path:
    """Copy the `kind` checkpoint `source` (`.safetensors` and `.json`) to `target`, each file written to a
    temporary name and renamed into place. A missing or corrupt source is refused before anything is written."""
    source, target = Path(source), Path(target)
    read_checkpoint(source, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        with atomic_path(target.with_suffix(suffix)) as tmp:
            shutil.copyfile(source.with_suffix(suffix), tmp)
    return target.with_suffix(".safetensors")


def read_checkpoint(path: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) of a checkpoint, checking that both files exist, parse, and are of `kind`."""
    path = Path(path)
    weights, sidecar = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for needed in (weights, sidecar):
        if not needed.is_file():
            raise CheckpointError(f"{needed} not found; a checkpoint is a .safetensors file with a .json beside it")
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{sidecar} is corrupt: not valid JSON ({err})") from err
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is a {meta.get('kind')!r} checkpoint, expected {kind!r}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is corrupt or truncated ({err})") from err
    return meta, tensors


def config_matches(saved: dict[str, Any] | None, config: Any) -> bool:
    """Whether a checkpoint's saved config dict describes `config` (a dataclass). Fields added to the project since
    the checkpoint was written count as their defaults, so an older checkpoint of the same model still matches."""
    if not isinstance(saved, dict):
        return False
    try:
        return from_dict(type(config), saved) == config
    except (TypeError, ValueError):  # a field this version no longer has, or a value it cannot take
        return False


def load_module(
    path: str | Path, kind: str, module_cls: type[nn.Module], config_cls: type, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """Rebuild a module from its checkpoint; returns (module, meta, extra state tensors)."""
    meta, tensors = read_checkpoint(path, kind)
    config = from_dict(config_cls, meta["config"], where=f"{path} config")
    module = module_cls(config)
    state = {k.removeprefix("__state__."): v for k, v in tensors.items() if k.startswith("__state__.")}
    weights = {k: v for k, v in tensors.items() if not k.startswith("__state__.")}
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not match a {module_cls.__name__} built from its own config: {err}"
        ) from err
    return module.to(device), meta, state
