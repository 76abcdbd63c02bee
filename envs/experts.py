"""Scripted expert drivers that read simulator internals to record training data."""

from __future__ import annotations

import math

import gymnasium
import numpy as np

_CAR_FORWARD_OFFSET = math.pi / 2  # CarRacing hull angle 0 points along +y
_WHEELBASE = 3.24  # distance between CarRacing's front and rear axles, world units
_MAX_WHEEL_ANGLE = 0.4  # joint limit of the front wheels, radians
_MIN_LOOKAHEAD_DIST = 6.0
_NEAREST_SEARCH = 30  # track points either side of the last index searched
_LOST_DISTANCE = 15.0  # beyond this from the local window, search the whole track
_CURVATURE_SPAN = 2  # points either side used to estimate curvature
_MIN_SPEED = 20.0
_GAS_GAIN = 0.1
_BRAKE_GAIN = 0.05
_BRAKE_MARGIN = 3.0  # tolerated overspeed before braking
_MAX_BRAKE = 0.8  # at 0.9 and above the wheels lock
_YAW_DAMPING = 0.05  # steer correction per rad/s of yaw rate beyond what the path needs


def _wrap(angle: np.ndarray | float) -> np.ndarray | float:
    """Angle(s) mapped into [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


class CarRacingExpert:
    """Pure-pursuit driver for Gymnasium's continuous ``CarRacing-v3``."""

    def __init__(
        self,
        target_speed: float = 100.0,
        lookahead: float = 0.2,
        action_repeat: int = 1,
        lateral_accel: float = 55.0,
        brake_accel: float = 40.0,
    ) -> None:
        self.target_speed = target_speed
        self.lookahead = lookahead
        self.action_repeat = action_repeat
        self.lateral_accel = lateral_accel
        self.brake_accel = brake_accel
        self._index: int | None = None
        self._track_key: tuple | None = None
        self._points: np.ndarray | None = None
        self._speed_limits: np.ndarray | None = None

    def reset(self) -> None:
        """Forget per-episode state (call at episode start)."""
        self._index = None
        self._track_key = None
        self._points = None
        self._speed_limits = None

    def _nearest_index(self, points: np.ndarray, position: np.ndarray) -> int:
        """Index of the track point closest to ``position``, preferring the local stretch."""
        n = len(points)
        if self._index is not None:
            local = (self._index + np.arange(-_NEAREST_SEARCH, _NEAREST_SEARCH + 1)) % n
            dists = np.sum((points[local] - position) ** 2, axis=1)
            best = int(np.argmin(dists))
            if dists[best] < _LOST_DISTANCE**2:
                return int(local[best])
        return int(np.argmin(np.sum((points - position) ** 2, axis=1)))

    def _plan_speeds(self, points: np.ndarray) -> np.ndarray:
        """Highest speed at each track point that still allows braking for later curves."""
        n = len(points)
        seg = np.roll(points, -1, axis=0) - points
        seg_len = np.hypot(seg[:, 0], seg[:, 1])
        heading = np.arctan2(seg[:, 1], seg[:, 0])
        turn = _wrap(np.roll(heading, -_CURVATURE_SPAN) - np.roll(heading, _CURVATURE_SPAN))
        span = 2 * _CURVATURE_SPAN * np.mean(seg_len)
        curvature = np.abs(turn) / span
        corner = np.sqrt(self.lateral_accel / np.maximum(curvature, 1e-6))
        limits = np.clip(corner, _MIN_SPEED, self.target_speed)
        # Two backward passes over the loop propagate braking constraints around the wrap.
        for _ in range(2):
            for i in range(n - 1, -1, -1):
                nxt = limits[(i + 1) % n]
                reachable = math.sqrt(nxt**2 + 2.0 * self.brake_accel * seg_len[i])
                limits[i] = min(limits[i], reachable)
        return limits

    def act(self, env: gymnasium.Env) -> np.ndarray:
        """Action ``[steer, gas, brake]`` for the current state of ``env``."""
        sim = env.unwrapped
        track = sim.track
        # Content-based key: a new episode (even without reset()) brings a new track.
        key = (len(track), tuple(track[0]), tuple(track[len(track) // 2]))
        if self._track_key != key or self._points is None or self._speed_limits is None:
            self._track_key = key
            self._index = None
            self._points = np.asarray([p[2:4] for p in track], dtype=np.float64)
            self._speed_limits = self._plan_speeds(self._points)
        points = self._points

        hull = sim.car.hull
        position = np.array([hull.position[0], hull.position[1]])
        speed = float(np.hypot(hull.linearVelocity[0], hull.linearVelocity[1]))
        index = self._nearest_index(points, position)
        self._index = index

        # Longer action repeats commit to a control for longer, so look further ahead.
        lookahead_dist = _MIN_LOOKAHEAD_DIST + self.lookahead * speed * (1.0 + 0.1 * (self.action_repeat - 1))
        n = len(points)
        target_index = index
        for _ in range(n):
            target_index = (target_index + 1) % n
            if np.hypot(*(points[target_index] - position)) >= lookahead_dist:
                break
        target = points[target_index]

        heading = hull.angle + _CAR_FORWARD_OFFSET
        dx, dy = target - position
        alpha = float(_wrap(math.atan2(dy, dx) - heading))
        distance = max(math.hypot(dx, dy), 1e-3)
        wheel_angle = math.atan2(2.0 * _WHEELBASE * math.sin(alpha), distance)
        path_yaw_rate = speed * 2.0 * math.sin(alpha) / distance
        yaw_excess = hull.angularVelocity - path_yaw_rate
        # The env negates steer: a positive action turns the car clockwise (right).
        steer = -wheel_angle / _MAX_WHEEL_ANGLE + _YAW_DAMPING * yaw_excess
        steer = float(np.clip(steer, -1.0, 1.0))

        limit = float(self._speed_limits[index])
        excess = speed - limit
        gas = float(np.clip(-_GAS_GAIN * excess, 0.0, 1.0))
        brake = float(np.clip(_BRAKE_GAIN * (excess - _BRAKE_MARGIN), 0.0, _MAX_BRAKE))
        if brake > 0.0:
            gas = 0.0
        return np.array([steer, gas, brake], dtype=np.float32)


_LANE_LEFT, _IDLE, _LANE_RIGHT, _FASTER, _SLOWER = range(5)
_VEHICLE_LENGTH = 5.0
_FRONT_HEADWAY = 1.0  # seconds of ego travel that must stay free ahead
_FRONT_MIN_GAP = 8.0
_SLOW_HEADWAY = 0.5  # seconds of ego travel below which a matched-speed follower backs off
_REAR_HEADWAY = 1.0  # seconds of closing speed a follower in the target lane needs
_REAR_MIN_GAP = 8.0
_CLEAR_HORIZON = 2.0  # decisions hold about a second, so look a bit beyond that
_SWITCH_BENEFIT = 10.0  # extra free distance a lane change must buy
_RIGHT_LANE_GAP = 60.0  # free distance needed to drift right for the lane reward
_FAR = 1e6
_CLOSING_TOLERANCE = 1.0  # m/s of closing speed ignored when merely following


class HighwayExpert:
    """Rule-based lane keeping / overtaking driver for highway-env with ``DiscreteMetaAction``.

    It reads every car from the simulator's state; `sight` (behind, ahead), in metres of free road, blinds it beyond
    that, as a frame showing only so much road would (`bench sight`)."""

    def __init__(self, sight: tuple[float, float] | None = None) -> None:
        self.sight = sight

    def reset(self) -> None:
        """Forget per-episode state (the expert keeps none)."""

    def _lane_gaps(self, env: gymnasium.Env, lane_id: int) -> tuple[float, float, float, float]:
        """Free distance and speed of the nearest vehicles it sees ahead and behind the ego in a lane."""
        behind_sight, ahead_sight = self.sight or (_FAR, _FAR)
        sim = env.unwrapped
        ego = sim.vehicle
        lane = sim.road.network.get_lane(ego.lane_index)
        ego_s = lane.local_coordinates(ego.position)[0]
        ahead, ahead_speed = _FAR, ego.speed
        behind, behind_speed = _FAR, ego.speed
        for other in sim.road.vehicles:
            if other is ego:
                continue
            # A vehicle changing lanes blocks both its current and its target lane.
            lanes = {other.lane_index[2], getattr(other, "target_lane_index", other.lane_index)[2]}
            if lane_id not in lanes:
                continue
            delta = lane.local_coordinates(other.position)[0] - ego_s
            gap = abs(delta) - _VEHICLE_LENGTH
            if delta >= 0.0 and gap < min(ahead, ahead_sight):
                ahead, ahead_speed = gap, other.speed
            elif delta < 0.0 and gap < min(behind, behind_sight):
                behind, behind_speed = gap, other.speed
        return ahead, ahead_speed, behind, behind_speed

    @staticmethod
    def _front_clear(ahead: float, ahead_speed: float, speed: float) -> float:
        """Distance ahead that stays free beyond the safety margin over the decision horizon."""
        closing = max(speed - ahead_speed, 0.0)
        needed = max(_FRONT_MIN_GAP, _FRONT_HEADWAY * speed)
        return ahead - closing * _CLEAR_HORIZON - needed

    @staticmethod
    def _rear_clear(behind: float, behind_speed: float, speed: float) -> bool:
        """Whether a follower in a target lane leaves room to merge in front of it."""
        closing = max(behind_speed - speed, 0.0)
        return behind > _REAR_MIN_GAP + _REAR_HEADWAY * closing * _CLEAR_HORIZON

    def act(self, env: gymnasium.Env) -> int:
        """Meta-action index (0 left, 1 idle, 2 right, 3 faster, 4 slower) for ``env``'s state."""
        sim = env.unwrapped
        ego = sim.vehicle
        speed = float(ego.speed)
        lane_id = ego.target_lane_index[2]
        lanes_count = len(sim.road.network.all_side_lanes(ego.lane_index))

        ahead, ahead_speed, _, _ = self._lane_gaps(env, lane_id)
        current = self._front_clear(ahead, ahead_speed, speed)
        # A lane change still in progress must finish before another is requested.
        changing = ego.lane_index[2] != lane_id

        options: list[tuple[float, int]] = []
        if not changing:
            for side, action in ((lane_id + 1, _LANE_RIGHT), (lane_id - 1, _LANE_LEFT)):
                if not 0 <= side < lanes_count:
                    continue
                s_ahead, s_speed, s_behind, s_behind_speed = self._lane_gaps(env, side)
                if not self._rear_clear(s_behind, s_behind_speed, speed):
                    continue
                options.append((self._front_clear(s_ahead, s_speed, speed), action))

        if current > 0.0:
            # Drift right when it costs little free road: the reward favours the right lanes.
            for clear, action in options:
                if action == _LANE_RIGHT and clear >= min(current, _RIGHT_LANE_GAP):
                    return _LANE_RIGHT
            return _FASTER
        best = max(options, default=None)
        if best is not None and best[0] > max(current + _SWITCH_BENEFIT, 0.0):
            return best[1]
        closing = max(speed - ahead_speed, 0.0)
        if closing > _CLOSING_TOLERANCE or ahead < _FRONT_MIN_GAP + _SLOW_HEADWAY * speed:
            return _SLOWER
        return _IDLE
