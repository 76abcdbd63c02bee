"""Run logging: metrics always go to `<run>/metrics.jsonl`; wandb only when asked (offline by default)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from worldmodel.run_dir import RunDir

WandbMode = Literal["disabled", "offline", "online"]


class RunLogger:
    """Append `{"step": .., "<component>/<split>/<name>": ..}` rows; mirror them to wandb when enabled."""

    def __init__(
        self,
        run_dir: str | Path,
        wandb_mode: WandbMode = "disabled",
        config: dict[str, Any] | None = None,
        project: str = "driving-worldmodel",
    ):
        self.path = RunDir(run_dir).metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=project,
                dir=str(self.path.parent),
                mode=wandb_mode,
                config=config,
                name=self.path.parent.name,
                resume="allow",
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {
            "step": step,
            **{k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def media(self, files: dict[str, str | Path], step: int | None = None) -> list[str]:
        """Videos (`.mp4`, `.gif`) and pages (`.html`) to wandb, when it is enabled, under their keys; returns the keys
        sent (`metrics.jsonl` keeps numbers only; the files stay in the run folder)."""
        if self._wandb is None:
            return []
        import wandb

        items: dict[str, Any] = {}
        for key, path in files.items():
            path = Path(path)
            if path.is_file():
                items[key] = wandb.Html(path.read_text()) if path.suffix == ".html" else wandb.Video(str(path))
        if items:
            self._wandb.log(items, step=step)
        return sorted(items)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
