"""The real simulators used as data sources, behind one interface: small RGB or grayscale frames,
an action repeat, the intro skipped, and a scripted expert that reads the simulator's state."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from PIL import Image

from envs.experts import CarRacingExpert, HighwayExpert

# highway-env renders through pygame; with the `dummy` driver its frames come back black without an error
os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
# SDL otherwise turns SIGTERM into a quit event, so a multiprocessing pool could never terminate its workers
os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")

CARRACING_INTRO_STEPS = 50


@dataclass(frozen=True)
class SourceConfig:
    name: Literal["carracing", "highway"] = "carracing"
    frame_size: int = 64
    action_repeat: int | None = None
    """Simulator steps per recorded step, rewards summed (None: 4 for CarRacing, 1 for highway-env)."""
    max_steps: int | None = None
    """Recorded steps per episode before it is truncated (None: the simulator's own limit)."""

    @property
    def pedals(self) -> tuple[int, int] | None:
        """Indices of the (gas, brake) parts of a continuous action, or None for a source without pedals."""
        return (1, 2) if self.name == "carracing" else None

    @property
    def repeat(self) -> int:
        if self.action_repeat is not None:
            return self.action_repeat
        return 4 if self.name == "carracing" else 1


class DrivingFrames(gym.Wrapper):
    """Observations become (S, S, C) uint8 frames; each action is repeated; CarRacing's zoom-in is skipped.

    The reward of the skipped intro steps is reported as `info["intro_reward"]` at reset, so that the sum of
    rewards plus that figure is the simulator's own episode return.
    """

    def __init__(self, env: gym.Env, config: SourceConfig):
        super().__init__(env)
        self.config = config
        probe = self._frame(np.zeros(env.observation_space.shape, env.observation_space.dtype))
        self.observation_space = gym.spaces.Box(0, 255, probe.shape, np.uint8)
        self._steps = 0

    def _frame(self, obs: np.ndarray) -> np.ndarray:
        size = self.config.frame_size
        if obs.ndim == 3 and obs.shape[0] in (1, 3, 4) and obs.shape[-1] not in (1, 3):
            obs = obs[-1:].transpose(1, 2, 0)  # highway: (stack, H, W) -> last frame as (H, W, 1)
        if obs.shape[:2] != (size, size):
            channels = obs.shape[-1]
            image = Image.fromarray(obs.squeeze(-1) if channels == 1 else obs)
            obs = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
            obs = obs[..., None] if channels == 1 else obs
        return np.ascontiguousarray(obs, dtype=np.uint8)

    @contextmanager
    def _physics_only(self) -> Iterator[None]:
        """Skip CarRacing's frame rendering (99% of a step's cost) for steps whose frame nobody sees."""
        unwrapped = self.env.unwrapped
        if self.config.name != "carracing" or not hasattr(unwrapped, "_render") or "_render" in vars(unwrapped):
            yield  # not CarRacing, or already skipping (nested)
            return
        unwrapped._render = lambda *args, **kwargs: None
        try:
            yield
        finally:
            del unwrapped._render  # back to the class's method

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        intro_reward = 0.0
        if self.config.name == "carracing":
            idle = np.zeros(self.env.action_space.shape, np.float32)
            with self._physics_only():
                for _ in range(CARRACING_INTRO_STEPS - 1):
                    intro_reward += float(self.env.step(idle)[1])
            obs, reward, _, _, info = self.env.step(idle)
            intro_reward += float(reward)
        self._steps = 0
        return self._frame(obs), {**info, "intro_reward": intro_reward}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        total = 0.0
        for repeat in range(self.config.repeat):
            if repeat < self.config.repeat - 1:
                with self._physics_only():
                    obs, reward, terminated, truncated, info = self.env.step(action)
            else:
                obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                if obs is None:  # ended on a sub-step whose frame was skipped: draw it now
                    obs = self.env.unwrapped._render("state_pixels")
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
    """The real simulator named by `config`, producing frames of `config.frame_size`."""
    if config.name == "carracing":
        # the passive checker would see the skipped frames (None) of DrivingFrames' physics-only sub-steps
        env = gym.make("CarRacing-v3", continuous=True, render_mode=render_mode, disable_env_checker=True)
    elif config.name == "highway":
        import highway_env  # noqa: F401  (registers the highway environments)

        env = gym.make(
            "highway-fast-v0",
            render_mode=render_mode,
            config={
                "observation": {
                    "type": "GrayscaleObservation",
                    "observation_shape": (config.frame_size, config.frame_size),
                    "stack_size": 1,
                    "weights": [0.2989, 0.587, 0.114],
                    "scaling": 1.75,
                },
            },
        )
    else:
        raise ValueError(f"unknown source {config.name!r}; expected 'carracing' or 'highway'")
    return DrivingFrames(env, config)


def make_expert(config: SourceConfig) -> CarRacingExpert | HighwayExpert:
    """The scripted driver for a source; `act(env)` reads the simulator state through `env.unwrapped`."""
    if config.name == "carracing":
        return CarRacingExpert(action_repeat=config.repeat)
    return HighwayExpert()
