"""A simulator is one `Source` in the registry: the frames, the action repeat, the intro and the expert all come from
it, so a third simulator needs no change anywhere else."""

import gymnasium as gym
import numpy as np
import pytest

from agents.config import load_pipeline_config
from envs.sources import SOURCES, Source, SourceConfig, make_expert, make_source_env
from worldmodel.config import ConfigError


class Counter(gym.Env):
    """Frames whose pixels are the step count; one point of reward per simulator step."""

    observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._frame(), {}

    def step(self, action):
        self.t += 1
        return self._frame(), 1.0, False, False, {}

    def _frame(self):
        return np.full((8, 8, 3), self.t, np.uint8)


class Idle:
    def __init__(self, repeat):
        self.repeat = repeat

    def reset(self):
        pass

    def act(self, env):
        return np.zeros(1, np.float32)


@pytest.fixture
def counter(monkeypatch):
    source = Source(
        name="counter",
        simulator="Counter-v0",
        make_simulator=lambda frame_size, render_mode, view: Counter(),
        make_expert=Idle,
        action_repeat=2,
        intro_steps=3,
    )
    monkeypatch.setitem(SOURCES, "counter", source)
    return source


def test_a_registered_simulator_gets_its_frames_repeat_intro_and_expert(counter):
    env = make_source_env(SourceConfig("counter", frame_size=4))
    frame, info = env.reset(seed=0)
    assert frame.shape == (4, 4, 3) and (frame == 3).all()  # the 3 intro steps are skipped...
    assert info["intro_reward"] == 3.0  # ...and their reward reported
    frame, reward, *_ = env.step(np.zeros(1, np.float32))
    assert (frame == 5).all() and reward == 2.0  # the source's own action repeat, rewards summed
    assert make_expert(SourceConfig("counter")).repeat == 2
    assert make_expert(SourceConfig("counter", action_repeat=3)).repeat == 3


def test_an_unknown_source_is_refused_when_the_preset_loads_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown source 'kart'; expected one of \['carracing', 'highway'\]"):
        load_pipeline_config("tiny", source="kart")


def test_the_two_simulators_know_their_own_particulars():
    carracing, highway = SOURCES["carracing"], SOURCES["highway"]
    assert (carracing.action_repeat, carracing.intro_steps, carracing.pedals, carracing.crashes) == (
        4,
        50,
        (1, 2),
        False,
    )
    assert (highway.action_repeat, highway.intro_steps, highway.pedals, highway.crashes) == (1, 0, None, True)
    assert carracing.standing_start_group in carracing.probes and highway.standing_start_group is None


def test_fit_frame_crops_to_the_aspect_keeping_the_bottom_and_the_middle():
    from envs.sources import fit_frame

    rows = np.repeat(np.arange(8, dtype=np.uint8)[:, None, None], 16, axis=1).repeat(3, axis=2)  # pixel = its row
    wide = fit_frame(rows, 4, 16)  # 8x16 -> 4x16: the top 4 rows go, nothing is resized
    assert wide.shape == (4, 16, 3) and wide[:, 0, 0].tolist() == [4, 5, 6, 7]
    cols = np.repeat(np.arange(16, dtype=np.uint8)[None, :, None], 8, axis=0)  # pixel = its column, one channel
    narrower = fit_frame(cols, 8, 12)  # 8x16 -> 8x12: the middle 12 columns
    assert narrower.shape == (8, 12, 1) and narrower[0, :, 0].tolist() == list(range(2, 14))
    assert fit_frame(cols, 8, 16) is cols  # already that shape
    halved = fit_frame(rows, 4, 8)  # same aspect: only resized
    assert halved.shape == (4, 8, 3) and halved[0, 0, 0] < halved[-1, 0, 0]


def test_frame_shape_and_bad_sizes():
    assert SourceConfig("carracing").frame_shape == (64, 64)
    assert SourceConfig("carracing", frame_size=128, frame_width=256).frame_shape == (128, 256)
    # the fields before frame_width keep their places, for callers that pass them in order
    assert SourceConfig("carracing", 64, 2, 10) == SourceConfig("carracing", 64, action_repeat=2, max_steps=10)
    with pytest.raises(ValueError, match="frame_width"):
        SourceConfig("carracing", frame_size=64, frame_width=0)
    with pytest.raises(ValueError, match="highway records square frames only"):
        SourceConfig("highway", frame_size=64, frame_width=128)  # highway has no full-size drawing


def test_square_targets_take_the_whole_image():
    from envs.sources import fit_frame

    wide = np.repeat(np.arange(16, dtype=np.uint8)[None, :, None], 8, axis=0)  # 8x16, pixel = its column
    square = fit_frame(wide, 8, 8)  # squashed, not cropped: the first and last columns are still in it
    assert square.shape == (8, 8, 1) and square[0, 0, 0] <= 1 and square[0, -1, 0] >= 14
