"""highway-env's highway-fast-v0: five discrete meta-actions, grayscale frames (a speed bar on request), crashes."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from envs.experts import HighwayExpert
from envs.sources.base import Source, register_source

SCALING = 1.75
"""Pixels per metre of highway-env's own view, whatever the frame's size."""
CAR_AT = 0.3
"""highway-env's own place for the car: this share of the frame's length along the road lies behind it."""


def _simulator(frame_size: int, render_mode: str | None, view: tuple[float, ...] | None) -> gym.Env:
    import highway_env  # noqa: F401  (registers the highway environments)

    length, width = frame_size, frame_size  # pixels drawn along and across the road
    if view is None:
        scaling, car_at = SCALING, CAR_AT
    else:
        along = view[0] + view[1]
        scaling, car_at = frame_size / (view[2] if len(view) == 3 else along), view[0] / along
        if len(view) == 3:
            # drawn longer than the frame (squashed to it along the road by `fit_frame`, so that the pixels across
            # show fewer metres, larger) and wider, centred on the car, for `_AcrossTheRoad` to cut the road from
            length, width = round(along * scaling), 2 * frame_size
    observation = {
        "type": "GrayscaleObservation",
        "observation_shape": (length, width),
        "stack_size": 1,
        "weights": [0.2989, 0.587, 0.114],
        "scaling": scaling,
        "centering_position": [car_at, 0.5],
    }
    env = gym.make("highway-fast-v0", render_mode=render_mode, config={"observation": observation})
    return env if width == frame_size else _AcrossTheRoad(env, frame_size, scaling)


class _AcrossTheRoad(gym.ObservationWrapper):
    """Cuts `frame_size` pixels across the road, centred on the road's middle, from a drawing centred on the car: the
    road stays put in the frame and the car moves across it when it changes lane (highway-env's own view follows the
    car sideways, so every lane change would move the whole road)."""

    def __init__(self, env: gym.Env, frame_size: int, scaling: float):
        super().__init__(env)
        self.frame_size, self.scaling = frame_size, scaling
        stack, length, _ = env.observation_space.shape
        self.observation_space = gym.spaces.Box(0, 255, (stack, length, frame_size), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        unwrapped = self.env.unwrapped
        network = unwrapped.road.network
        sides = [network.get_lane(index).position(0.0, 0.0)[1] for index in network.lanes_dict()]
        middle = (min(sides) + max(sides)) / 2
        drawn = observation.shape[-1]  # the car is drawn in its middle
        first = round(drawn / 2 + (middle - float(unwrapped.vehicle.position[1])) * self.scaling - self.frame_size / 2)
        first = min(max(first, 0), drawn - self.frame_size)
        return observation[..., first : first + self.frame_size]


SPEED_RANGE = (15.0, 35.0)
"""m/s shown by the speed bar's empty and full ends; highway-env's meta-actions aim at 20, 25 and 30."""


def _speed_bar(env: gym.Env, frame: np.ndarray) -> None:
    """The car's speed as a white bar rising from the bottom of the frame's right edge, over the empty road beside
    the lanes: highway-env draws no speedometer, and without one neither a tokenizer nor a dynamics model can tell
    a FASTER from a SLOWER, though the speed is most of the reward."""
    height, width = frame.shape[:2]
    low, high = SPEED_RANGE
    share = min(max((float(env.unwrapped.vehicle.speed) - low) / (high - low), 0.0), 1.0)
    bar = max(1, width // 16)
    frame[:, width - 2 * bar : width - bar] = 0
    frame[height - round(share * height) :, width - 2 * bar : width - bar] = 255


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
        gauges=_speed_bar,
        view=(64 * CAR_AT / SCALING, 64 * (1 - CAR_AT) / SCALING),
        crashes=True,
        probes={
            "steering": {"lane_left": 0, "idle": 1, "lane_right": 2},
            "throttle": {"faster": 3, "slower": 4},
        },
        standing_start_group=None,  # its cars start moving
        steady_action=("SLOWER", 4),  # 21.1 with no crash on the evaluation's 50 episodes; IDLE crashes in most
        controls=_controls,
    )
)
