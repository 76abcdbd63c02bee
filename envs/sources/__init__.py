"""The real simulators used as data sources, behind one interface: small RGB or grayscale frames,
an action repeat, the intro skipped, and a scripted expert that reads the simulator's state.

What is particular to one simulator is its `Source` (`base.py`), in a module of its own in this package
(`carracing.py`, `highway.py`), found and registered when the package is imported."""

from __future__ import annotations

import importlib
import math
import os
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from PIL import Image

from envs.sources.base import SOURCES, Expert, Source, register_source

# highway-env renders through pygame; with the `dummy` driver its frames come back black without an error
os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
# SDL otherwise turns SIGTERM into a quit event, so a multiprocessing pool could never terminate its workers
os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "SOURCES",
    "DrivingFrames",
    "Expert",
    "Source",
    "SourceConfig",
    "check_view",
    "fit_frame",
    "get_source",
    "make_expert",
    "make_source_env",
    "register_source",
]


def check_view(view: Any, what: str = "view", across: bool = False) -> None:
    """Refuses a (behind, ahead) stretch of road in metres that shows nothing ahead: the sight of `bench sight`'s
    scripted driver, and, with `across` (a third figure allowed: the metres shown across the road, > 0),
    `SourceConfig.view`."""
    shape = "[behind, ahead] or [behind, ahead, across]" if across else "[behind, ahead]"
    sizes = (2, 3) if across else (2,)
    ok = len(view) in sizes and view[0] >= 0 and view[1] > 0 and (len(view) == 2 or view[2] > 0)
    if not ok or not all(math.isfinite(v) for v in view):
        extra = ", across > 0" if across else ""
        raise ValueError(f"{what} {view}: expected {shape} in metres, finite, behind >= 0 and ahead > 0{extra}")


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; expected one of {sorted(SOURCES)}")
    return SOURCES[name]


@dataclass(frozen=True)
class SourceConfig:
    name: str = "carracing"
    """A registered source (`envs/sources/`): carracing or highway."""
    frame_size: int = 64
    """Frame height in pixels, and width too unless `frame_width` is set. Square frames are the simulator's
    observation resized, whatever its size."""
    action_repeat: int | None = None
    """Simulator steps per recorded step, rewards summed (None: the source's own, 4 for CarRacing, 1 for highway)."""
    max_steps: int | None = None
    """Recorded steps per episode before it is truncated (None: the simulator's own limit)."""
    frame_width: int | None = None
    """Frame width of frames that are not square (road-camera frames: `frame_size` 128, `frame_width` 256), for a
    source that offers a full-size drawing (`Source.draw_full`, CarRacing's 600x400 view): that drawing is cropped
    to the frame's aspect ratio, keeping its bottom rows (the car and its gauges), then resized."""
    gauges: bool = False
    """Draw the car's own gauges into the frames of a simulator that shows none (`Source.gauges`; highway: its speed
    as a bar at the right edge). Off by default: on highway the dream then tells FASTER from SLOWER, but its
    policies speed into crashes it does not foresee (docs/loop.md, "highway's speed bar")."""
    view: tuple[float, ...] | None = None
    """(behind, ahead) or (behind, ahead, across): metres of road the frames show behind and ahead of the car, and
    across the road (default: as many as along it, square pixels, centred on the car; given: centred on the road's
    middle, so that the road stays put and the car moves across it), for a simulator whose view can be
    set (`Source.view`; highway's own: 11.0 and 25.6 on 64 pixels, 1.75 pixels per metre); None: the simulator's own
    view. Farther means smaller cars; nearer can hide what decides the driving: the scripted highway driver, blinded
    beyond 25.6 m ahead, scores below braking (docs/loop.md, "highway's view ahead"). Fewer metres across than along
    stretch the road sideways over the frame's width: highway's [13, 51, 17] draws each car 7 pixels wide, not 2."""

    def __post_init__(self) -> None:
        source = get_source(self.name)
        if self.frame_size < 1 or (self.frame_width is not None and self.frame_width < 1):
            raise ValueError(f"frame_size {self.frame_size} and frame_width {self.frame_width} must be >= 1")
        if self.gauges and source.gauges is None:
            drawers = ", ".join(n for n, s in SOURCES.items() if s.gauges) or "none"
            raise ValueError(f"gauges: {self.name} draws no gauges of its own to add (sources that do: {drawers})")
        if self.view is not None:
            settable = ", ".join(n for n, s in SOURCES.items() if s.view) or "none"
            if source.view is None:
                raise ValueError(f"view: {self.name}'s view cannot be set (sources whose can: {settable})")
            check_view(self.view, across=True)
        height, width = self.frame_shape
        if height != width and source.draw_full is None:
            raise ValueError(
                f"frame_width: {self.name} records square frames only (got {height}x{width}); non-square frames come"
                f" from a source's full-size drawing, which {', '.join(n for n, s in SOURCES.items() if s.draw_full)}"
                " offers"
            )

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(height, width) of the recorded frames."""
        return self.frame_size, self.frame_width or self.frame_size

    @property
    def source(self) -> Source:
        return SOURCES[self.name]

    @property
    def pedals(self) -> tuple[int, int] | None:
        """Indices of the (gas, brake) parts of a continuous action, or None for a source without pedals."""
        return self.source.pedals

    @property
    def repeat(self) -> int:
        return self.action_repeat if self.action_repeat is not None else self.source.action_repeat


def fit_frame(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C), resized bilinearly. A square target takes the whole image, squashed if
    need be (as the frames of the 64x64 presets always were); a non-square one is first cropped to its aspect ratio,
    keeping the bottom rows (where CarRacing draws the car and its gauges) and the middle columns."""
    rows, cols = image.shape[:2]
    if height != width:
        if rows * width > cols * height:  # too tall: drop rows from the top
            image = image[rows - round(cols * height / width) :]
        elif rows * width < cols * height:  # too wide: drop columns from both sides
            keep = round(rows * width / height)
            image = image[:, (cols - keep) // 2 : (cols - keep) // 2 + keep]
    if image.shape[:2] != (height, width):
        channels = image.shape[-1]
        resized = Image.fromarray(image.squeeze(-1) if channels == 1 else image).resize(
            (width, height), Image.Resampling.BILINEAR
        )
        image = np.asarray(resized).reshape(height, width, channels)
    return image


class DrivingFrames(gym.Wrapper):
    """Observations become (H, W, C) uint8 frames; each action is repeated; the source's intro (CarRacing's zoom-in)
    is skipped.

    The reward of the skipped intro steps is reported as `info["intro_reward"]` at reset, so that the sum of
    rewards plus that figure is the simulator's own episode return.
    """

    def __init__(self, env: gym.Env, config: SourceConfig):
        super().__init__(env)
        self.config = config
        probe = self._fit(np.zeros(env.observation_space.shape, env.observation_space.dtype))
        self.observation_space = gym.spaces.Box(0, 255, probe.shape, np.uint8)
        # one action space for the wrapper's life: highway-env builds a new one in every reset, which would drop the
        # seed a caller gave it before the reset (the random policy's actions were unseeded)
        self.action_space = env.action_space
        # non-square frames come from the source's full-size drawing (SourceConfig refuses them for a source
        # without one), so the observation's own drawing is skipped on every sub-step
        height, width = config.frame_shape
        self._draws_full = height != width
        self._steps = 0

    def _fit(self, obs: np.ndarray) -> np.ndarray:
        if obs.ndim == 3 and obs.shape[0] in (1, 3, 4) and obs.shape[-1] not in (1, 3):
            obs = obs[-1:].transpose(1, 2, 0)  # highway: (stack, H, W) -> last frame as (H, W, 1)
        return np.ascontiguousarray(fit_frame(obs, *self.config.frame_shape), dtype=np.uint8)

    def _frame(self, obs: np.ndarray | None) -> np.ndarray:
        """The recorded frame of the step that returned `obs`: the observation, or, for non-square frames, the
        source's full-size drawing of the same state (`Source.draw_full`), fitted to the frame shape."""
        if self._draws_full:
            frame = self._fit(self.config.source.draw_full(self.env))
        else:
            if obs is None:  # ended on a sub-step whose frame was skipped: draw it now
                obs = self.env.unwrapped._render("state_pixels")
            frame = self._fit(obs)
        if self.config.gauges:
            frame = frame.copy()  # the fitted frame can be a view of the simulator's own observation
            self.config.source.gauges(self.env, frame)
        return frame

    @contextmanager
    def _physics_only(self) -> Iterator[None]:
        """Skip frame drawing (99% of a CarRacing step's cost) for steps whose frame nobody sees."""
        unwrapped = self.env.unwrapped
        if not self.config.source.draws_on_demand or "_render" in vars(unwrapped):
            yield  # the simulator draws every step, or we are already skipping (nested)
            return
        unwrapped._render = lambda *args, **kwargs: None
        try:
            yield
        finally:
            del unwrapped._render  # back to the class's method

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        intro_reward = 0.0
        intro_steps = self.config.source.intro_steps
        if intro_steps:
            idle = np.zeros(self.env.action_space.shape, np.float32)
            with self._physics_only():
                for _ in range(intro_steps - 1):
                    intro_reward += float(self.env.step(idle)[1])
            with self._physics_only() if self._draws_full else nullcontext():
                obs, reward, _, _, info = self.env.step(idle)
            intro_reward += float(reward)
        self._steps = 0
        return self._frame(obs), {**info, "intro_reward": intro_reward}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        total = 0.0
        for repeat in range(self.config.repeat):
            drawn = repeat == self.config.repeat - 1 and not self._draws_full
            with nullcontext() if drawn else self._physics_only():
                obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        self._steps += 1
        if self.config.max_steps is not None and self._steps >= self.config.max_steps:
            truncated = True
        return self._frame(obs), total, bool(terminated), bool(truncated), info

    def replay(self, seed: int, actions: np.ndarray) -> np.ndarray:
        """Restore the state reached by `actions` after `reset(seed=seed)` and return its frame.

        Only the last frame is drawn, so restoring a recorded state costs little more than its physics.
        """
        obs, _ = self.reset(seed=seed)
        if len(actions) == 0:
            return obs
        with self._physics_only():
            for action in actions[:-1]:
                for _ in range(self.config.repeat):
                    self.env.step(action)
        self._steps = len(actions) - 1
        return self.step(actions[-1])[0]


def make_source_env(config: SourceConfig, render_mode: str | None = None) -> DrivingFrames:
    """The real simulator named by `config`, producing frames of `config.frame_shape`."""
    simulator = config.source.make_simulator(max(config.frame_shape), render_mode, config.view)
    return DrivingFrames(simulator, config)


def make_expert(config: SourceConfig) -> Expert:
    """The scripted driver for a source; `act(env)` reads the simulator state through `env.unwrapped`."""
    return config.source.make_expert(config.repeat)
