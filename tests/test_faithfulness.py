import dataclasses

import numpy as np
import pytest

import envs.collect as collect_module
from bench.faithfulness import (
    ProbeConfig,
    ProbeUnavailable,
    _group_figures,
    _real_rollouts,
    _Start,
    _starts,
    action_faithfulness,
)
from envs.collect import CollectConfig, collect
from envs.sources import SourceConfig, make_source_env
from worldmodel.dataset import Dataset


def frames(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def test_a_dream_that_ignores_actions_scores_chance_and_no_response():
    rng = np.random.default_rng(0)
    real = frames(rng, 5, 3, 8, 8, 3)  # 5 states, 3 probes
    same = np.repeat(frames(rng, 5, 1, 8, 8, 3), 3, axis=1)
    figures = _group_figures(real, same)
    assert figures["match_accuracy"] == pytest.approx(1 / 3)
    assert figures["chance"] == pytest.approx(1 / 3)
    assert figures["response_ratio"] == 0.0


def test_a_dream_that_equals_the_simulator_scores_perfectly():
    rng = np.random.default_rng(1)
    real = frames(rng, 4, 2, 8, 8, 1)
    figures = _group_figures(real, real.copy())
    assert figures["match_accuracy"] == 1.0
    assert figures["response_ratio"] == pytest.approx(1.0)
    swapped = _group_figures(real, real[:, ::-1].copy())  # responds, but the wrong way round
    assert swapped["match_accuracy"] == 0.0
    assert swapped["response_ratio"] == pytest.approx(1.0)


@pytest.mark.slow
def test_replay_restores_a_recorded_carracing_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "offscreen")
    monkeypatch.setattr(collect_module, "_worker_envs", {})
    config = CollectConfig(
        source=SourceConfig("carracing", max_steps=12), episodes=1, workers=1, action_noise=0.3, perturb_prob=0.3
    )
    dataset = collect(config, tmp_path / "data")
    episode = dataset.load(0)
    env = make_source_env(dataclasses.replace(config.source, max_steps=None))
    for step in (0, 5, 12):
        restored = env.replay(dataset.episodes[0].seed, episode.actions[:step])
        np.testing.assert_array_equal(restored, episode.frames[step])
    # the restored simulator goes on exactly as the recorded one did
    env.replay(dataset.episodes[0].seed, episode.actions[:5])
    for step in range(5, 8):
        frame, *_ = env.step(episode.actions[step])
        np.testing.assert_array_equal(frame, episode.frames[step + 1])
    env.close()


@pytest.mark.slow
def test_a_highway_probe_stops_where_its_episode_ends(tmp_path, monkeypatch):
    """Held past highway-fast's 30-step limit, every probe stops where its episode ends, with the return earned
    until then, and counts as ended only if it crashed; held one step from the start, braking ends nothing."""
    monkeypatch.setattr(collect_module, "_worker_envs", {})
    source = SourceConfig("highway", max_steps=3)
    dataset = collect(CollectConfig(source=source, episodes=1, workers=1, seed=4), tmp_path / "data")
    start = _Start(0, int(dataset.episodes[0].seed), 0)
    probes = [0, 1, 3, 4]  # LANE_LEFT, IDLE, FASTER, SLOWER
    finals, returns, ends = _real_rollouts(dataset, source, [start], probes, horizon=40)
    assert finals.shape == (1, 4, 64, 64, 1)
    env = make_source_env(dataclasses.replace(source, max_steps=None))
    crashes = []
    for p, probe in enumerate(probes):  # the same probe by hand: the rewards until the episode ends
        env.reset(seed=start.seed)
        total, terminated, truncated = 0.0, False, False
        while not (terminated or truncated):
            _, reward, terminated, truncated, info = env.step(probe)
            total += reward
        assert returns[0, p] == pytest.approx(total)
        assert ends[0, p] == terminated == info["crashed"]
        crashes.append(terminated)
    env.close()
    assert any(crashes) and not all(crashes)  # the seed was chosen so that both kinds of ending are checked
    _, returns, ends = _real_rollouts(dataset, source, [start], [4], horizon=1)
    assert ends.tolist() == [[False]] and 0 < returns[0, 0] <= 1


@pytest.mark.slow
def test_action_faithfulness_on_a_tiny_carracing_run(tmp_path, monkeypatch):
    from worldmodel.dynamics import DynamicsConfig
    from worldmodel.logger import RunLogger
    from worldmodel.tokenizer import TokenizerConfig
    from worldmodel.train import DynamicsStage, TokenizerStage, train_dynamics, train_tokenizer
    from worldmodel.trainer import TrainConfig

    monkeypatch.setenv("SDL_VIDEODRIVER", "offscreen")
    monkeypatch.setattr(collect_module, "_worker_envs", {})
    data, run = tmp_path / "data", tmp_path / "run"
    source = SourceConfig("carracing", frame_size=16, max_steps=10)
    collect(CollectConfig(source=source, episodes=2, workers=1), data)
    steps = TrainConfig(steps=2, batch_size=4, warmup_steps=1, log_every=1, eval_every=100, checkpoint_every=100)
    logger = RunLogger(run)
    train_tokenizer(data, run, TokenizerStage(TokenizerConfig(widths=(8, 16), levels=(4, 3)), steps, 16), logger, 0.5)
    dynamics = DynamicsConfig(context_frames=3, d_model=32, layers=1, heads=2)
    train_dynamics(data, run, DynamicsStage(dynamics, steps, val_batches=1), logger, 0.5)
    logger.close()

    probe = ProbeConfig(states=2, horizon=2, start_episodes=1, start_horizon=3)
    figures = action_faithfulness(str(run), str(data), probe)
    assert figures["states"] == 2 and figures["horizon"] == 2
    assert set(figures) >= {"steering", "throttle"}
    assert figures["steering"]["chance"] == pytest.approx(1 / 3)
    assert figures["throttle"]["chance"] == pytest.approx(1 / 2)
    for group in ("steering", "throttle"):
        assert 0.0 <= figures[group]["match_accuracy"] <= 1.0
        assert figures[group]["real_spread"] > 0  # the simulator's car does respond to the probes
    # two steps in the middle of a CarRacing episode end nothing in the simulator; the dream says what it says
    assert figures["throttle"]["ends"]["real"] == {"gas": 0.0, "brake": 0.0}
    assert all(v in (0.0, 0.5, 1.0) for v in figures["throttle"]["ends"]["dream"].values())
    assert set(figures["steering"]["returns"]["dream"]) == {"left", "straight", "right"}
    standing = figures["standing_start"]
    assert standing["episodes"] == 1 and standing["horizon"] == 3 and 0.0 <= standing["match_accuracy"] <= 1.0
    # at rest under the brake the simulator pays its time penalty and nothing else: -0.1 per simulator step
    assert standing["returns"]["real"]["brake"] == pytest.approx(-0.1 * 4 * 3)
    assert set(standing["returns"]["dream"]) == {"gas", "brake"}
    assert all(np.isfinite(v) for v in standing["returns"]["dream"].values())
    assert standing["response_ratio"] >= 0.0 and np.isfinite(standing["response_ratio"])
    real_gap = standing["returns"]["real"]["gas"] - standing["returns"]["real"]["brake"]
    dream_gap = standing["returns"]["dream"]["gas"] - standing["returns"]["dream"]["brake"]
    if real_gap:
        assert standing["return_gap_ratio"] == pytest.approx(dream_gap / real_gap)
    else:
        assert standing["return_gap_ratio"] is None


def test_action_faithfulness_needs_a_recorded_source(box_run, box_data):
    with pytest.raises(ProbeUnavailable, match="no collection source"):
        action_faithfulness(str(box_run), str(box_data), ProbeConfig(states=1, horizon=1))


def test_starts_refuse_episodes_too_short_to_probe(box_data):
    dataset = Dataset.open(box_data)  # 12-step episodes
    assert len(_starts(dataset, [0, 1], context=2, config=ProbeConfig(states=3, horizon=10))) == 3
    with pytest.raises(ValueError, match="at least 25 steps"):
        _starts(dataset, [0, 1], context=5, config=ProbeConfig(horizon=20))
