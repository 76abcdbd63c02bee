"""A trained run cut down to what a dream needs, to be shipped or handed on: `worldmodel export RUN --out DIR`.

The exported folder has a run folder's layout (`RunDir`), so what reads a trained model reads it: `WorldModel.load`,
the dream envs, `worldmodel play`. It has no dataset, metrics or summary, so the benches and `worldmodel report`
need the run itself. It holds the tokenizer and the dynamics model without their
optimizer moments, the run's policy when it has one, the run's settings (`config.yaml`), and the token cache cut to
a few training episodes: the real contexts dreams start from. `model.json` says what it was made from, the figures
the run measured, and each kept episode's collection seed (so the real simulator can replay it).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from worldmodel.checkpoint import CheckpointError, copy_checkpoint
from worldmodel.config import ConfigError, whole
from worldmodel.dataset import Dataset
from worldmodel.files import atomic_path, read_json, write_json_atomic
from worldmodel.run_dir import RunDir
from worldmodel.world_model import WorldModel

MANIFEST = "model.json"
CHECKPOINTS = (("tokenizer", "tokenizer"), ("dynamics", "dynamics"), ("policy", "policy"))  # (RunDir name, kind)


def export_model(run_dir: str | Path, out: str | Path, episodes: int = 32, note: str = "") -> dict[str, Any]:
    """Write `out` (replacing it whole, atomically: a folder that is not an earlier export is refused) from the run
    in `run_dir`; returns the manifest."""
    run, out = RunDir(run_dir), Path(out)
    if not whole(episodes, 1):
        raise ConfigError(
            f"episodes: expected an integer of at least 1 (real contexts for dreams to start from), got {episodes!r}"
        )
    if run.root.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"export to a folder outside the run, not {out}: the export replaces its folder whole")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; export to a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ConfigError(f"{out} holds files that are not an exported model; export to a new or empty folder")
    model = WorldModel.load(run.root, with_contexts=True)  # refuses a run whose files do not belong together
    ids = model.contexts.episode_ids
    kept = [int(i) for i in ids[np.linspace(0, len(ids) - 1, min(episodes, len(ids))).round().astype(int)]]
    contexts = model.contexts.select(kept)

    seeds: dict[str, int | None] = {}
    if run.dataset.is_dir():
        records = Dataset.open(run.dataset).episodes
        seeds = {str(i): records[i].seed for i in kept if i < len(records)}
    summary = read_json(run.summary, {})
    manifest = {
        "made_from": run.root.resolve().name,
        "note": note,
        "episodes": kept,
        "seeds": seeds,
        "source": summary.get("source"),
        "figures": {
            key: summary[key]
            for key in ("tokenizer", "dynamics", "policy", "random", "expert", "steady")
            if key in summary
        },
        "episodes_evaluated": summary.get("episodes_evaluated"),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, folder=True) as tmp:
        target = RunDir(tmp)
        for name, kind in CHECKPOINTS:
            source = getattr(run, name)
            if name == "policy" and not source.with_suffix(".json").is_file():
                continue  # a run stopped before its policy still dreams
            try:
                copy_checkpoint(source, getattr(target, name), kind)
            except CheckpointError as err:
                raise CheckpointError(f"cannot export {run.root}: {err}") from None
        contexts.save(target.tokens)
        if run.config.is_file():
            shutil.copyfile(run.config, target.config)
        write_json_atomic(target.root / MANIFEST, manifest)
    return manifest


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The `model.json` of an exported model (empty for an ordinary run folder)."""
    path = Path(model_dir) / MANIFEST
    return read_json(path, {})
