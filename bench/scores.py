"""Held-out scores that a bench keeps between its runs, so that a resumed bench scores no driver twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agents.evaluate import EvalConfig, evaluate
from envs.sources import SourceConfig
from worldmodel.files import read_json, write_json_atomic

KEPT = ("mean", "std", "returns", "crashes")


class HeldOutScores:
    """Each driver's held-out score by key, in the JSON file `path`, written after every score. The file records
    the number of episodes the scores are over; scores over another number are dropped, never mixed in."""

    def __init__(
        self, path: Path, run_dir: Path, source: SourceConfig, config: EvalConfig, used_seeds: list[int]
    ) -> None:
        self.path, self.run_dir, self.source, self.config, self.used_seeds = path, run_dir, source, config, used_seeds
        kept = read_json(path, {})
        self.scores: dict[str, Any] = kept if kept.get("episodes") == config.episodes else {"episodes": config.episodes}

    def __call__(self, key: str, policy: Path | None = None, kind: str = "policy") -> dict[str, Any]:
        """The score under `key` of the policy checkpoint `policy` (default: the run's), or of another `kind` of
        driver (`agents.evaluate.reference_kinds`), scored now if it is not kept yet: mean, std, per-episode returns
        and crashes."""
        if key not in self.scores:
            result = evaluate(self.run_dir, self.source, self.config, self.used_seeds, (kind,), policy)[kind]
            self.scores[key] = {name: result[name] for name in KEPT}
            write_json_atomic(self.path, self.scores)
        return self.scores[key]
