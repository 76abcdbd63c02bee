import dataclasses

import gymnasium as gym
import numpy as np
import pytest

import envs.collect as collect_module
from envs.collect import CollectConfig, collect
from envs.sources import SOURCES, SourceConfig, fit_frame, make_expert, make_source_env
from worldmodel.dataset import Dataset, DatasetError

CARRACING_INTRO_STEPS = SOURCES["carracing"].intro_steps

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _offscreen(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "offscreen")
    # collect() keeps one simulator per source config and process; start each test without any
    monkeypatch.setattr(collect_module, "_worker_envs", {})


def tile_multiple(value: float, env, base: float) -> bool:
    """value == base + k * (1000 / tiles) for a small k >= 0 (CarRacing pays 1000/N per new tile)."""
    per_tile = 1000 / len(env.unwrapped.track)
    k = round((value - base) / per_tile)
    return 0 <= k <= 3 and abs(value - (base + k * per_tile)) < 1e-3


def test_source_config_repeat_defaults():
    assert SourceConfig("carracing").repeat == 4
    assert SourceConfig("highway").repeat == 1
    assert SourceConfig("carracing", action_repeat=2).repeat == 2
    with pytest.raises(ValueError, match="unknown source"):
        make_source_env(SourceConfig(name="nope"))  # type: ignore[arg-type]


def test_carracing_frames_intro_and_action_repeat():
    env = make_source_env(SourceConfig("carracing", frame_size=64, max_steps=3))
    assert env.observation_space == gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    obs, info = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert obs in env.observation_space
    # the 50 idle intro steps each cost 0.1 (plus the bonus of the start tile the car sits on)
    assert tile_multiple(info["intro_reward"], env, -0.1 * CARRACING_INTRO_STEPS)
    # CarRacing gives -0.1 per simulator step; 4 repeated idle steps sum to -0.4
    idle = np.zeros(3, np.float32)
    obs, reward, terminated, truncated, _ = env.step(idle)
    assert obs.shape == (64, 64, 3)
    assert tile_multiple(reward, env, -0.4)
    assert not terminated and not truncated
    env.step(idle)
    *_, truncated, _ = env.step(idle)
    assert truncated  # max_steps=3 recorded steps
    env.close()

    single = make_source_env(SourceConfig("carracing", frame_size=32, action_repeat=1))
    obs, _ = single.reset(seed=0)
    assert obs.shape == (32, 32, 3)
    assert tile_multiple(single.step(idle)[1], single, -0.1)
    single.close()


def test_carracing_intro_reward_completes_the_return():
    """Rewards summed over recorded steps plus intro_reward equal the raw simulator's return."""
    raw = gym.make("CarRacing-v3", continuous=True)
    raw.reset(seed=3)
    gas = np.array([0.0, 0.5, 0.0], np.float32)
    raw_total = sum(raw.step(np.zeros(3, np.float32))[1] for _ in range(CARRACING_INTRO_STEPS))
    raw_total += sum(raw.step(gas)[1] for _ in range(4 * 5))
    raw.close()
    env = make_source_env(SourceConfig("carracing"))
    _, info = env.reset(seed=3)
    total = info["intro_reward"] + sum(env.step(gas)[1] for _ in range(5))
    env.close()
    assert total == pytest.approx(raw_total, abs=1e-3)


def test_highway_frames():
    env = make_source_env(SourceConfig("highway", frame_size=64, max_steps=2))
    assert env.observation_space.shape == (64, 64, 1)
    assert isinstance(env.action_space, gym.spaces.Discrete)
    obs, info = env.reset(seed=0)
    assert obs.shape == (64, 64, 1) and obs.dtype == np.uint8
    assert info["intro_reward"] == 0.0
    assert obs.max() > 0 and obs.std() > 1  # offscreen rendering, not a black frame
    expert = make_expert(env.config)
    expert.reset()
    obs, reward, terminated, truncated, _ = env.step(expert.act(env))
    assert obs.shape == (64, 64, 1) and obs.max() > 0
    assert isinstance(reward, float)
    if not terminated:
        assert env.step(1)[3]  # truncated at max_steps=2
    env.close()


@pytest.mark.parametrize("frame_size", [64, 96])
def test_highway_frames_show_the_speed_the_reward_pays_for(frame_size):
    """highway-env draws no speedometer; with `gauges` the frames carry a speed bar that FASTER raises and SLOWER
    lowers, as the simulator's speed and its reward do."""
    env = make_source_env(SourceConfig("highway", frame_size=frame_size, gauges=True))

    def bar_rows(frame: np.ndarray) -> int:
        bar = max(1, frame_size // 16)
        column = frame[:, frame_size - 2 * bar, 0]
        assert set(np.unique(column)) <= {0, 255}  # nothing of the road drawn over it
        return int((column == 255).sum())

    obs, _ = env.reset(seed=1)
    heights, speeds, rewards = [bar_rows(obs)], [env.unwrapped.vehicle.speed], []
    for action in (3, 3, 4, 4, 4):  # FASTER twice, then SLOWER
        obs, reward, terminated, truncated, _ = env.step(action)
        assert not (terminated or truncated)
        heights.append(bar_rows(obs))
        speeds.append(env.unwrapped.vehicle.speed)
        rewards.append(reward)
    env.close()
    assert heights[2] > heights[0] > heights[-1] > 0
    for i in range(1, len(heights)):
        if abs(speeds[i] - speeds[i - 1]) > 1:  # a change of speed the bar can show (20 m/s fill the frame's height)
            assert np.sign(heights[i] - heights[i - 1]) == np.sign(speeds[i] - speeds[i - 1])
    assert rewards[1] > rewards[-1]  # the speed the bar shows is what the reward pays for
    assert heights[2] == pytest.approx(frame_size * (speeds[2] - 15) / 20, abs=1)


def test_gauges_are_drawn_only_on_request_and_only_where_a_source_has_some():
    plain = make_source_env(SourceConfig("highway"))
    frame, _ = plain.reset(seed=1)
    plain.close()
    assert (frame[:, 64 - 8, 0] == 99).all()  # highway-env's own frame: road where the bar would be
    with pytest.raises(ValueError, match="carracing draws no gauges of its own to add.*highway"):
        SourceConfig("carracing", gauges=True)


def test_collect_writes_a_dataset_and_resumes(tmp_path):
    config = CollectConfig(source=SourceConfig("carracing", max_steps=10), episodes=2, workers=1, seed=7)
    dataset = collect(config, tmp_path / "data")
    assert len(dataset) == 2
    reopened = Dataset.open(tmp_path / "data")
    assert reopened.manifest.source == "carracing"
    assert reopened.frame_shape == (64, 64, 3)
    assert isinstance(reopened.action_space, gym.spaces.Box) and reopened.action_space.shape == (3,)
    assert [e.name for e in reopened.episodes] == ["000000", "000001"]
    assert [e.seed for e in reopened.episodes] == [7, 8]
    assert reopened.usable() == [0, 1]
    for index, record in enumerate(reopened.episodes):
        episode = reopened.load(index)
        assert len(episode) == record.length == 10
        assert episode.truncated[-1] and not episode.truncated[:-1].any()
        assert episode.actions.dtype == np.float32 and episode.actions.shape == (10, 3)
        assert episode.expert_actions.dtype == np.float32 and episode.expert_actions.shape == (10, 3)
        assert record.ret == pytest.approx(float(episode.rewards.sum()), abs=1e-3)
        assert record.kind in ("expert", "random")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "episodes").iterdir()}

    more = collect(dataclasses.replace(config, episodes=3), tmp_path / "data")
    assert len(more) == 3
    assert [e.name for e in Dataset.open(tmp_path / "data").episodes] == ["000000", "000001", "000002"]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "episodes").iterdir()}
    assert {k: after[k] for k in before} == before  # the first two episodes were not re-recorded
    assert set(after) == {"000000", "000001", "000002"}
    # killed after the last episode was added, before the manifest was put in episode order: the next call sorts it
    dataset = Dataset.open(tmp_path / "data")
    dataset.manifest.episodes.reverse()
    dataset.save_manifest()
    again = collect(dataclasses.replace(config, episodes=3), tmp_path / "data")
    assert [e.name for e in again.episodes] == [e.name for e in Dataset.open(tmp_path / "data").episodes]
    assert [e.name for e in again.episodes] == ["000000", "000001", "000002"]


def test_road_camera_frames_come_from_the_full_drawing(tmp_path):
    # 128x256 frames are drawn from CarRacing's 600x400 view (its 96x96 observation would be upsampled), cropped to
    # 2:1 from the top so that the car and the gauges stay; the dataset records them in the documented format
    config = CollectConfig(source=SourceConfig("carracing", frame_size=128, frame_width=256, max_steps=4), episodes=1)
    dataset = collect(dataclasses.replace(config, workers=1), tmp_path / "road")
    reopened = Dataset.open(tmp_path / "road")
    assert reopened.frame_shape == dataset.frame_shape == (128, 256, 3)
    frames = np.load(tmp_path / "road" / "episodes" / "000000" / "frames.npy")
    assert frames.shape == (5, 128, 256, 3) and frames.dtype == np.uint8
    env = make_source_env(config.source)
    assert env.observation_space.shape == (128, 256, 3)
    first, _ = env.reset(seed=config.seed)
    assert np.array_equal(first, frames[0])  # the same state drawn the same way
    full = env.unwrapped._render("rgb_array")  # (400, 600, 3)
    assert full.shape == (400, 600, 3) and np.array_equal(first, fit_frame(full, 128, 256))
    # the bottom rows of the full drawing hold the gauges' black panel; they are the bottom of the frame too
    assert full[-20:].mean() < 30 and first[-6:].mean() < 30 and first[:60].mean() > 60
    env.close()


def test_collect_twice_in_one_process_uses_each_config(tmp_path):
    first = CollectConfig(source=SourceConfig("carracing", max_steps=3), episodes=1, workers=1)
    second = CollectConfig(source=SourceConfig("carracing", max_steps=6), episodes=1, workers=1)
    collect(first, tmp_path / "a")
    dataset = collect(second, tmp_path / "b")
    assert dataset.episodes[0].length == 6


def _road_lines(frame: np.ndarray) -> tuple[int, int]:
    """Columns of the outermost lane lines of a highway frame (its lines run down the frame)."""
    lines = np.flatnonzero((frame[..., 0] > 200).mean(axis=0) > 0.3)
    return int(lines[0]), int(lines[-1])


def _road_width(frame: np.ndarray) -> int:
    """Pixels between the outermost lane lines of a highway frame, across the road."""
    first, last = _road_lines(frame)
    return last - first


def test_highway_view_sets_the_metres_the_frame_shows():
    """`view` (behind, ahead) sets how many metres of road the frame spans: highway-env's own (11.0, 25.6) draws
    exactly its default frames; (13, 51) draws highway-fast's three 4-metre lanes at 1 pixel per metre, not 1.75."""
    frames = {}
    for view in (None, SOURCES["highway"].view, (13.0, 51.0)):
        env = make_source_env(SourceConfig("highway", view=view))
        frames[view], _ = env.reset(seed=2)
        env.close()
    own, given, far = frames.values()
    assert SOURCES["highway"].view == pytest.approx((11.0, 25.6), abs=0.05)
    np.testing.assert_array_equal(own, given)
    assert _road_width(own) == pytest.approx(12 * 1.75, abs=1)
    assert _road_width(far) == pytest.approx(12 * 1.0, abs=1)
    with pytest.raises(ValueError, match="carracing's view cannot be set.*highway"):
        SourceConfig("carracing", view=(10.0, 40.0))
    with pytest.raises(ValueError, match=r"expected \[behind, ahead\] or \[behind, ahead, across\] in metres"):
        SourceConfig("highway", view=(10.0, 0.0))
    with pytest.raises(ValueError, match="across > 0"):
        SourceConfig("highway", view=(10.0, 40.0, 0.0))


def test_highway_view_across_stretches_the_road_and_keeps_it_put():
    """A third figure, metres across the road, draws the three 4-metre lanes over the frame's width (17 m across:
    45 pixels, not 12) with the road's middle in the frame's middle, so that a lane change moves the car, not the
    road; along the road the frame still spans `behind + ahead` metres (the car 13 pixels from its top edge)."""
    env = make_source_env(SourceConfig("highway", view=(13.0, 51.0, 17.0)))
    frame, _ = env.reset(seed=2)
    assert frame.shape == (64, 64, 1)
    start = env.unwrapped.vehicle.position[1]
    frames = [frame] + [env.step(action)[0] for action in (0, 0, 1)]  # LANE_LEFT twice, then IDLE
    assert env.unwrapped.vehicle.position[1] != pytest.approx(start, abs=1.0)  # it did change lane
    env.close()
    lines = {_road_lines(frame) for frame in frames}
    assert len(lines) == 1, f"the road moved across the frame: {lines}"
    first, last = lines.pop()
    assert last - first == pytest.approx(12 * 64 / 17, abs=1.5)
    assert (first + last) / 2 == pytest.approx(31.5, abs=1.5)
    # the car (green, mid-grey here; the others are yellow, lighter) is where its lane is, 13 pixels from the top
    column = round(31.5 + (start - 4.0) * 64 / 17)
    car = frames[0][10:17, column - 2 : column + 3, 0]
    assert ((car > 110) & (car < 160)).sum() >= 8


def test_collect_highway(tmp_path):
    config = CollectConfig(source=SourceConfig("highway", max_steps=4), episodes=2, workers=1)
    dataset = collect(config, tmp_path / "data")
    assert dataset.frame_shape == (64, 64, 1)
    assert dataset.action_space == gym.spaces.Discrete(5)
    episode = dataset.load(0)
    assert episode.frames.shape[1:] == (64, 64, 1)
    assert episode.actions.dtype == np.int64
    assert episode.frames.max() > 0
    # more episodes of another length may join it; frames drawn with the speed bar or another view may not, and nothing
    # is recorded
    longer = dataclasses.replace(config, source=SourceConfig("highway", max_steps=5), episodes=3)
    assert len(collect(longer, tmp_path / "data")) == 3
    barred = dataclasses.replace(longer, source=SourceConfig("highway", max_steps=5, gauges=True), episodes=4)
    farther = dataclasses.replace(longer, source=SourceConfig("highway", max_steps=5, view=(13.0, 51.0)), episodes=4)
    for other in (barred, farther):
        with pytest.raises(DatasetError, match="frames drawn otherwise would mix"):
            collect(other, tmp_path / "data")
    assert len(Dataset.open(tmp_path / "data")) == 3


def test_collection_labels_every_step_with_the_scripted_drivers_decision(tmp_path):
    """Whatever drives (noise, a perturbation, random actions), each step records what the scripted driver would
    have done there (DART's labels); without noise the labels are the actions."""
    source = SourceConfig("highway", max_steps=8)
    quiet = CollectConfig(source=source, episodes=2, workers=1, random_fraction=0.0, action_noise=0.0, perturb_prob=0.0)
    for episode in map(collect(quiet, tmp_path / "quiet").load, range(2)):
        assert episode.expert_actions.dtype == np.int64
        np.testing.assert_array_equal(episode.expert_actions, episode.actions)
    noisy = dataclasses.replace(quiet, episodes=6, random_fraction=0.5, action_noise=0.5, perturb_prob=0.2)
    dataset = collect(noisy, tmp_path / "noisy")
    differ = 0
    for index, record in enumerate(dataset.episodes):
        episode = dataset.load(index)
        env = make_source_env(source)  # replay: the label is the driver's decision in the state the step began in
        env.reset(seed=record.seed)
        expert = make_expert(source)
        expert.reset()
        for action, label in zip(episode.actions, episode.expert_actions, strict=True):
            assert expert.act(env) == label
            env.step(int(action))
        env.close()
        differ += int((episode.expert_actions != episode.actions).sum())
    assert differ > 0


def test_start_perturbations_open_expert_episodes_with_a_held_action():
    class Stub:  # the driver reads only the action space before its first step
        action_space = gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))

    always = CollectConfig(random_fraction=0.0, start_perturb_prob=1.0, perturb_steps=(3, 5))
    never = dataclasses.replace(always, start_perturb_prob=0.0, perturb_prob=0.0)
    for seed in range(5):
        driver = collect_module._Driver(always, Stub(), seed)
        assert driver.kind == "expert" and 3 <= driver.hold_left <= 5
        assert driver.held_dims is not None and driver.held_dims.any()
        assert collect_module._Driver(never, Stub(), seed).hold_left == 0


def test_exploration_presses_one_pedal_at_a_time_and_coasts():
    class Stub:  # an expert that drives at full gas; the driver reads the action space and asks the expert
        action_space = gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))

    class FullGas:
        def reset(self):
            pass

        def act(self, env):
            return np.array([0.0, 1.0, 0.0], np.float32)

    config = CollectConfig(random_fraction=0.0, action_noise=0.15, perturb_prob=0.3, perturb_steps=(3, 12))
    actions = []
    for seed in range(20):
        driver = collect_module._Driver(config, Stub(), seed)
        driver.expert = FullGas()
        actions += [driver.act() for _ in range(50)]
    actions = np.array(actions)
    gas, brake = actions[:, 1], actions[:, 2]
    assert not ((gas > 0) & (brake > 0)).any()
    assert (brake > 0).mean() < 0.3  # noise alone on a zero brake pressed it about half the time
    assert ((gas < 0.1) & (brake < 0.1)).mean() > 0.01  # perturbations idle and coast
    assert actions.dtype == np.float32 and (actions >= Stub.action_space.low).all()

    # highway-env has no pedals; CarRacing's random episodes keep both pedals, so the data still shows them
    assert SourceConfig("highway").pedals is None
    random_driver = collect_module._Driver(dataclasses.replace(config, random_fraction=1.0), Stub(), 0)
    random_driver.expert = FullGas()
    both = np.array([random_driver.act() for _ in range(200)])
    assert ((both[:, 1] > 0) & (both[:, 2] > 0)).mean() > 0.5
