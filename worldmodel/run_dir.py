"""A run folder's layout, in one place. The run folder is the bus between stages: each finds its inputs and writes its
outputs through a `RunDir`, so no file name is spelled in two modules. Checkpoints are stems (`tokenizer` is
`tokenizer.safetensors` and `tokenizer.json`; `worldmodel.checkpoint`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from worldmodel.files import DamagedFile, read_json, write_json_atomic


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
    def stage_clock(self) -> Path:
        """How long the stage now running has taken (`StageClock`); a run killed mid-stage leaves it behind."""
        return self.root / "stage_clock.json"

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


class StageClock:
    """`<run>/stage_clock.json`: the stage now running and the seconds it has taken, rewritten every `every` seconds
    while it runs and removed once it is recorded. A run killed (or failed) mid-stage leaves the file behind, and the
    resumed run counts that time in the stage's timing: neither the summary's times nor the loop's budget
    (`loop.max_minutes`) lose the minutes spent before a crash."""

    def __init__(self, run_dir: str | Path, every: float = 5.0):
        self.path = RunDir(run_dir).stage_clock
        self.every = every

    def left_behind(self, finished: Callable[[str], bool]) -> dict[str, float]:
        """{stage: seconds} that a killed run spent in a stage not `finished` since; {} if none (or unreadable)."""
        try:
            found = read_json(self.path, {})
        except DamagedFile:  # written atomically, so edited by hand: the time it held is only lost from the timings
            return {}
        stage, seconds = (found.get("stage"), found.get("seconds")) if isinstance(found, dict) else (None, None)
        if not isinstance(stage, str) or not isinstance(seconds, (int, float)) or finished(stage):
            return {}
        return {stage: float(seconds)}

    @contextmanager
    def running(self, stage: str, before: float = 0.0) -> Iterator[Callable[[], float]]:
        """Time `stage`, counting on from `before` seconds (its time before a kill); yields the clock. Record the
        stage inside the block: the file goes only when the block ends without an exception."""
        began = time.monotonic()

        def elapsed() -> float:
            return before + time.monotonic() - began

        def write() -> None:
            write_json_atomic(self.path, {"stage": stage, "seconds": round(elapsed(), 1)})

        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.every):
                write()

        write()
        thread = threading.Thread(target=tick, name="stage-clock", daemon=True)
        thread.start()
        finished = False
        try:
            yield elapsed
            finished = True
        finally:
            stop.set()
            thread.join()
            if finished:
                self.path.unlink(missing_ok=True)
            else:  # the stage raised: the run resumes it as after a kill, with this time on its clock
                write()
