"""What the project knows about one simulator, in one place: a `Source`. Each simulator is a module of this package
that registers its `Source` (`carracing.py`, `highway.py`); adding a third is one new file there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym


class Expert(Protocol):
    """A scripted driver: `act(env)` reads the simulator's state through `env.unwrapped`."""

    def reset(self) -> None: ...

    def act(self, env: gym.Env) -> Any: ...


@dataclass(frozen=True)
class Source:
    name: str
    """The name presets and `--source` use."""
    simulator: str
    """The simulator's own id, as tables and benches show it (`CarRacing-v3`)."""
    make_simulator: Callable[[int, str | None, tuple[float, ...] | None], gym.Env]
    """(frame_size, render_mode, view) -> the simulator, configured to draw frames near that size, showing `view`'s
    (behind, ahead) or (behind, ahead, across) metres of road around the car (None: its own view)."""
    make_expert: Callable[[int], Expert]
    """(action_repeat) -> the scripted driver, which reads the simulator's state through `env.unwrapped`."""
    action_repeat: int = 1
    """Simulator steps per recorded step unless a preset says otherwise."""
    intro_steps: int = 0
    """Steps after reset that nobody records (CarRacing's zoom-in); their reward is `info["intro_reward"]`."""
    pedals: tuple[int, int] | None = None
    """Indices of the (gas, brake) parts of a continuous action, or None for a source without pedals."""
    draws_on_demand: bool = False
    """The simulator draws a frame only through `unwrapped._render`, so sub-steps nobody sees can skip it."""
    draw_full: Callable[[gym.Env], Any] | None = None
    """env -> an (H, W, C) uint8 drawing of the current state larger than the observation (CarRacing's 600x400
    video frame), which non-square frames are cropped from; None where the observation is all there is (square
    frames only)."""
    gauges: Callable[[gym.Env, Any], None] | None = None
    """(env, frame) -> draws the car's own gauges into a fitted (H, W, C) uint8 frame, in place, for a simulator
    whose drawing shows none (highway's speed bar), where `SourceConfig.gauges` asks; None where the simulator
    draws its own (CarRacing's dashboard)."""
    view: tuple[float, float] | None = None
    """(behind, ahead): metres of road the simulator's own 64-pixel frames show around the car, for a simulator whose
    view can be set (`SourceConfig.view`; highway: 11.0 and 25.6); None where it cannot (CarRacing)."""
    crashes: bool = False
    """Episodes can end in a crash, reported as `info["crashed"]`, which evaluation counts."""
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Probe actions in groups compared with each other (`bench dynamics`' action faithfulness)."""
    standing_start_group: str | None = None
    """The probe group also held from a standing start (None where the simulator's episodes start moving)."""
    steady_action: tuple[str, Any] | None = None
    """(name, action): the one action that, held through every episode, drives without looking (highway: SLOWER,
    which never crashes). Evaluation scores it beside the random policy and the scripted driver, so that a learned
    policy no better than holding it shows as such; None where no single action drives (CarRacing)."""
    controls: Callable[[frozenset[str]], Any] | None = None
    """The keys a person holds (names among "left", "right", "up", "down") -> the action they mean
    (`worldmodel play`); None where nobody can drive the simulator by hand."""


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    if source.name in SOURCES:
        raise ValueError(f"a source named {source.name!r} is already registered")
    SOURCES[source.name] = source
    return source
