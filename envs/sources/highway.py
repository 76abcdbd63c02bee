"""highway-env's highway-fast-v0: five discrete meta-actions, grayscale frames, crashes."""

from __future__ import annotations

import gymnasium as gym

from envs.experts import HighwayExpert
from envs.sources.base import Source, register_source


def _simulator(frame_size: int, render_mode: str | None) -> gym.Env:
    import highway_env  # noqa: F401  (registers the highway environments)

    observation = {
        "type": "GrayscaleObservation",
        "observation_shape": (frame_size, frame_size),
        "stack_size": 1,
        "weights": [0.2989, 0.587, 0.114],
        "scaling": 1.75,
    }
    return gym.make("highway-fast-v0", render_mode=render_mode, config={"observation": observation})


def _controls(keys: frozenset[str]) -> int:
    """highway-env's meta-actions: left and right change lane, up is faster, down slower, no key keeps going."""
    for key, action in (("left", 0), ("right", 2), ("up", 3), ("down", 4)):
        if key in keys:
            return action
    return 1  # IDLE


HIGHWAY = register_source(
    Source(
        name="highway",
        simulator="highway-fast-v0",
        make_simulator=_simulator,
        make_expert=lambda action_repeat: HighwayExpert(),
        crashes=True,
        probes={
            "steering": {"lane_left": 0, "idle": 1, "lane_right": 2},
            "throttle": {"faster": 3, "slower": 4},
        },
        standing_start_group=None,  # its cars start moving
        controls=_controls,
    )
)
