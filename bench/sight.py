"""`worldmodel bench sight`: how much road a highway frame must show, measured on the scripted driver.

The scripted driver reads every car from the simulator's state. Blinded beyond a view, (behind, ahead) metres of
free road around its car, it drives as well as anything that sees only such a frame could with its rules: where it
falls below always braking, no policy of those frames can be expected to beat it with its eyes alone. Every view
drives the same held-out episodes as `worldmodel evaluate` (seeds from 1,000,000)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from envs.experts import HighwayExpert
from envs.sources import SourceConfig, check_view, make_source_env
from worldmodel.config import ConfigError
from worldmodel.files import write_json_atomic
from worldmodel.parallel import imap_unordered

SOURCE = "highway"
"""The one source whose scripted driver can be blinded (its view can be set too: `SourceConfig.view`)."""


def _episode(task: tuple[tuple[float, float] | None, int]) -> tuple[tuple[float, float] | None, float, bool]:
    sight, seed = task
    env = make_source_env(SourceConfig(SOURCE))
    expert = HighwayExpert(sight)
    env.reset(seed=seed)
    total = 0.0
    while True:
        _, reward, terminated, truncated, info = env.step(expert.act(env))
        total += reward
        if terminated or truncated:
            break
    env.close()
    return sight, float(total), bool(info.get("crashed", False))


def bench_sight(
    sights: list[tuple[float, float] | None], episodes: int = 50, seed: int = 1_000_000, workers: int = 2
) -> list[dict[str, Any]]:
    """Per sight (None: all of it): mean and std of the return over `episodes` held-out episodes, and crashes."""
    for sight in sights:
        if sight is not None:
            check_view(sight, "sight")
    if episodes < 1:
        raise ConfigError(f"episodes {episodes}: expected at least 1")
    returns: dict[Any, list[float]] = {sight: [] for sight in sights}
    crashes: dict[Any, int] = {sight: 0 for sight in sights}
    tasks = [(sight, seed + i) for sight in sights for i in range(episodes)]
    with tqdm(total=len(tasks), desc="scripted driver by sight", unit="episode", dynamic_ncols=True) as progress:
        for sight, ret, crashed in imap_unordered(_episode, tasks, workers):
            returns[sight].append(ret)
            crashes[sight] += crashed
            progress.update()
    return [
        {
            "sight": None if sight is None else list(sight),
            "mean": float(np.mean(returns[sight])),
            "std": float(np.std(returns[sight])),
            "crashes": crashes[sight],
            "episodes": episodes,
        }
        for sight in sights
    ]


def format_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scripted driver sees (behind, ahead) | return | crashes |",
        "|---|---|---|",
    ]
    for row in rows:
        sight = "everything" if row["sight"] is None else f"{row['sight'][0]:g} m, {row['sight'][1]:g} m"
        lines.append(f"| {sight} | {row['mean']:.1f} +- {row['std']:.1f} | {row['crashes']} of {row['episodes']} |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    write_json_atomic(path, {"source": SOURCE, "rows": rows})
