"""CarRacing-v3 (Box2D): continuous steering, gas and brake, RGB frames."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from envs.experts import CarRacingExpert
from envs.sources.base import Source, register_source


def _simulator(frame_size: int, render_mode: str | None, view: tuple[float, float] | None) -> gym.Env:
    # the passive checker would see the skipped frames (None) of DrivingFrames' physics-only sub-steps
    return gym.make("CarRacing-v3", continuous=True, render_mode=render_mode, disable_env_checker=True)


def _controls(keys: frozenset[str]) -> np.ndarray:
    """Arrows: steer full left or right, full gas, brake at 0.8 (the scripted driver's hardest)."""
    steer = float("right" in keys) - float("left" in keys)
    return np.array([steer, 1.0 if "up" in keys else 0.0, 0.8 if "down" in keys else 0.0], np.float32)


CARRACING = register_source(
    Source(
        name="carracing",
        simulator="CarRacing-v3",
        make_simulator=_simulator,
        make_expert=lambda action_repeat: CarRacingExpert(action_repeat=action_repeat),
        action_repeat=4,
        intro_steps=50,
        pedals=(1, 2),
        draws_on_demand=True,
        draw_full=lambda env: env.unwrapped._render("rgb_array"),  # 600x400; the observation is 96x96
        probes={
            "steering": {"left": [-1.0, 0.3, 0.0], "straight": [0.0, 0.3, 0.0], "right": [1.0, 0.3, 0.0]},
            "throttle": {"gas": [0.0, 1.0, 0.0], "brake": [0.0, 0.0, 0.8]},
        },
        standing_start_group="throttle",  # every episode starts standing still
        controls=_controls,
    )
)
