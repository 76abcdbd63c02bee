"""A run folder's layout, in one place. The run folder is the bus between stages: each finds its inputs and writes its
outputs through a `RunDir`, so no file name is spelled in two modules. Checkpoints are stems (`tokenizer` is
`tokenizer.safetensors` and `tokenizer.json`; `worldmodel.checkpoint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worldmodel.files import read_json, write_json_atomic


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:
        """The resolved settings the run was made with (`worldmodel run` writes it)."""
        return self.root / "config.yaml"

    @property
    def results(self) -> Path:
        """Each finished stage's figures; a stage listed here is skipped when the run resumes."""
        return self.root / "results.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def tokens(self) -> Path:
        """The token cache of the dataset's episodes (`worldmodel.tokens`), the dream's real contexts."""
        return self.root / "tokens.npz"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def dynamics(self) -> Path:
        return self.root / "dynamics"

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def policy_real(self) -> Path:
        """A loop round's policy after its updates on real episodes, before the dream's (`loop.real_epochs`)."""
        return self.root / "policy_real"

    @property
    def real_ppo(self) -> Path:
        """The baseline's folder: PPO trained in the real simulator (`bench baseline`, `train policy --real`)."""
        return self.root / "real_ppo"

    @property
    def clone(self) -> Path:
        """`bench clone`'s folder: the clone of the scripted driver's decisions, and its scores."""
        return self.root / "clone"

    @property
    def rollout(self) -> Path:
        """The rollout video's stem (`.mp4` and `.gif`)."""
        return self.root / "rollout"

    @property
    def fidelity(self) -> Path:
        """`bench dynamics`' figures (`.json`) and PSNR-by-horizon plot (`.png`) of this run."""
        return self.root / "fidelity"

    @property
    def report(self) -> Path:
        """The run's self-contained HTML page (`worldmodel report`)."""
        return self.root / "report.html"

    @property
    def loop_plot(self) -> Path:
        return self.root / "loop.png"

    def loop_round(self, iteration: int) -> RunDir:
        """Round `iteration` of the dream-to-real loop (00: the policy before the loop), a run folder of its own
        layout: `loop/01/dynamics`, `loop/01/policy`, ..."""
        return RunDir(self.root / "loop" / f"{iteration:02d}")


class Results:
    """`<run>/results.json`: each finished stage's figures, rewritten atomically after every stage."""

    def __init__(self, run_dir: str | Path):
        self.path = RunDir(run_dir).results
        self.data: dict[str, Any] = read_json(self.path, {})

    def done(self, stage: str) -> bool:
        """Whether `stage` finished; `loop` stands for any of the loop's stages."""
        if stage == "loop":
            return any(name.startswith("loop/") for name in self.data)
        return stage in self.data

    def record(self, stage: str, figures: dict[str, Any]) -> None:
        self.data[stage] = figures
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)
