"""The shipped world model, `worldmodel export` that makes it, and `worldmodel play` that drives it by hand."""

import shutil
from dataclasses import replace

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import pytest

import envs  # noqa: F401  (registers the dream env)
from agents.config import read_run_config
from envs.dream import SHIPPED_MODEL, DreamEnv
from envs.sources import SOURCES
from pipeline.cli import main
from pipeline.play import PlayConfig, Session, parse_keys, play
from worldmodel.checkpoint import CheckpointError
from worldmodel.config import ConfigError
from worldmodel.export import export_model, read_manifest
from worldmodel.world_model import WorldModel


def read_video(path):
    with imageio.get_reader(path) as reader:
        return np.stack([frame for frame in reader])  # not list(reader): its len() is inf


def test_the_shipped_model_loads_and_dreams_without_a_checkpoint():
    # what a user gets right after `pip install`; regenerate it (docs/shipped_model.md) when this fails
    env = gym.make("WorldModel/Dream-v0", obs_mode="pixels")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    for _ in range(3):
        obs, reward, terminated, truncated, _ = env.step(np.array([0.0, 1.0, 0.0], np.float32))
        assert np.isfinite(reward)
    config = read_run_config(SHIPPED_MODEL)  # its settings still parse with today's config schema
    assert config.collect.source.name == "carracing"
    manifest = read_manifest(SHIPPED_MODEL)
    assert manifest["figures"]["policy"]["real_return_mean"] > 0  # the policy beside it drove in its evaluation
    assert len(manifest["episodes"]) == len(WorldModel.load(SHIPPED_MODEL).contexts.episode_ids)
    assert sum(f.stat().st_size for f in SHIPPED_MODEL.iterdir()) <= 15 * 2**20


def test_export_keeps_what_a_dream_needs_and_dreams_as_the_run_does(box_run, tmp_path):
    out = tmp_path / "exported"
    manifest = export_model(box_run, out, episodes=2, note="made by a test")
    assert manifest["note"] == "made by a test" and len(manifest["episodes"]) == 2
    assert not any(p.name.endswith("_last.safetensors") for p in out.iterdir())  # no optimizer moments
    exported, original = WorldModel.load(out), WorldModel.load(box_run)
    assert sorted(exported.contexts.episode_ids.tolist()) == sorted(manifest["episodes"])
    assert set(manifest["episodes"]) <= set(original.contexts.episode_ids.tolist())  # training episodes only
    # from the same real frames and actions, the exported model dreams exactly what the run's does
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    actions = np.array([[0.5, 0.2, 0.0], [-0.5, 0.0, 0.3]], np.float32)
    dreams = []
    for model in (exported, original):
        env = DreamEnv(model, obs_mode="pixels")
        env.reset(seed=1, options={"frames": frames, "actions": actions})
        dreams.append([env.step(np.array([0.3, 0.6, 0.0], np.float32))[:2] for _ in range(4)])
    for (a, ra), (b, rb) in zip(*dreams, strict=True):
        np.testing.assert_array_equal(a, b)
        assert ra == rb

    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(CheckpointError):
        export_model(tmp_path / "not-a-run", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    for inside in (box_run, box_run.parent):  # the export replaces its folder: never the run's, nor one holding it
        with pytest.raises(ConfigError, match="outside the run"):
            export_model(box_run, inside)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an exported model"):
        export_model(box_run, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="is a file"):  # a file given as the folder is kept, not replaced
        export_model(box_run, tmp_path / "mine" / "notes.txt")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    for episodes in (0, 2.5, True):  # refused before the model loads, not after
        with pytest.raises(ConfigError, match="episodes: expected an integer of at least 1"):
            export_model(tmp_path / "not-a-run", tmp_path / "nothing", episodes=episodes)
    export_model(box_run, out, episodes=1)  # an earlier export is replaced
    assert len(read_manifest(out)["episodes"]) == 1


def test_key_scripts_parse_and_bad_ones_say_what_is_expected():
    assert parse_keys("up:2,up+left:1,:2") == [frozenset({"up"})] * 2 + [frozenset({"up", "left"})] + [frozenset()] * 2
    for bad in ("up", "jump:3", "up:0", "up:x"):
        with pytest.raises(ConfigError, match="KEYS:FRAMES"):
            parse_keys(bad)


def test_each_source_maps_the_keys_to_the_action_a_driver_means():
    carracing = SOURCES["carracing"].controls
    np.testing.assert_array_equal(carracing(frozenset()), [0, 0, 0])
    np.testing.assert_array_equal(carracing(frozenset({"up", "left"})), [-1, 1, 0])
    np.testing.assert_array_equal(carracing(frozenset({"right", "down"})), np.float32([1, 0, 0.8]))
    highway = SOURCES["highway"].controls
    assert [highway(frozenset(k)) for k in ((), ("left",), ("right",), ("up",), ("down",))] == [1, 0, 2, 3, 4]


def test_a_session_steps_the_dream_with_the_keys_and_hands_over_to_the_policy():
    session = Session(SHIPPED_MODEL, seed=3)
    start = session.panels[0].frame.copy()
    for _ in range(6):
        action = session.step(frozenset({"up"}))
        np.testing.assert_array_equal(action, [0, 1, 0])
    assert session.steps == 6 and not np.array_equal(session.panels[0].frame, start)
    session.toggle_policy()
    assert session.policy_drives
    action = session.step(frozenset({"left"}))  # the keys are ignored while the policy drives
    space = session.action_space
    assert action.shape == (3,) and np.all(action >= space.low) and np.all(action <= space.high)
    assert not np.array_equal(action, [-1, 0, 0])
    session.close()


def test_a_policy_of_three_frames_takes_over_seeing_the_dream_s_last_three(tmp_path):
    import torch

    from agents.policy import ActorCritic, PolicyConfig
    from agents.ppo import POLICY
    from worldmodel.checkpoint import load_module, save_checkpoint

    run = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, run)
    shipped, _, _ = load_module(run / POLICY, POLICY, ActorCritic, PolicyConfig)
    torch.manual_seed(0)
    save_checkpoint(run / POLICY, ActorCritic(replace(shipped.config, frames=3)), POLICY, {})
    session = Session(run, seed=3)
    grids = [session._tokens.copy()]
    for _ in range(4):
        session.step(frozenset({"up"}))
        grids.append(session._tokens.copy())
    np.testing.assert_array_equal(session.seen.grids[0].numpy(), np.stack(grids[-3:]))
    session.toggle_policy()
    expected = session.policy.action_for(torch.as_tensor(np.stack(grids[-3:])), session.action_space)
    still = session.policy.action_for(torch.as_tensor(np.stack(grids[-1:] * 3)), session.action_space)
    assert not np.array_equal(expected, still)  # the history, not the current grid alone, decides the action
    np.testing.assert_array_equal(session.step(frozenset()), expected)
    session.restart()  # a new dream begins from the real grids it was started from, as PPO's histories do
    context = session.dream._vector.context_tokens()[0]
    assert not np.array_equal(context[-3], context[-1])  # a history that differs from its first frame repeated
    np.testing.assert_array_equal(session.seen.grids[0].numpy(), context[-3:])
    np.testing.assert_array_equal(context[-1], session._tokens)
    session.close()


def test_play_under_the_dummy_video_driver_drives_as_the_scripted_keys_say_and_records(tmp_path, monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    runs = {}
    for name, keys in (("gas", "up:10"), ("gas-again", "up:10"), ("gas-left", "up:4,up+left:6")):
        record = tmp_path / f"{name}.mp4"
        runs[name] = play(PlayConfig(keys=parse_keys(keys), record=record, fps=0, seed=5, scale=2))
        assert runs[name]["steps"] == 10
    assert runs["gas"]["actions"] == [[0.0, 1.0, 0.0]] * 10
    assert runs["gas-left"]["actions"] == [[0.0, 1.0, 0.0]] * 4 + [[-1.0, 1.0, 0.0]] * 6

    def dream_panel(name):
        frames = read_video(tmp_path / f"{name}.mp4")
        assert frames.shape[:3] == (10, 128 + 56, 128)  # 10 frames: the dream's panel, scale 2, and the text bar
        return frames[:, :128].astype(np.int16)

    gas, again, left = dream_panel("gas"), dream_panel("gas-again"), dream_panel("gas-left")
    assert np.abs(gas - again).mean() < 0.5  # the same keys from the same seed: the same dream
    # the same until the keys differ (up to the codec's noise, about 1 level in 255) ...
    assert max(np.abs(gas[i] - left[i]).mean() for i in range(4)) < 2.0
    assert np.abs(gas[-1] - left[-1]).mean() > 5.0  # ... then steering took the dream somewhere else
    assert np.abs(gas[-1] - gas[0]).mean() > 5.0  # and with gas the road moved


@pytest.mark.slow
def test_play_side_by_side_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    record = tmp_path / "side.mp4"
    main(["play", "--side-by-side", "--keys", "up:6", "--fps", "0", "--scale", "2", "--record", str(record)])
    assert "6 steps" in capsys.readouterr().out
    frames = read_video(record)
    assert frames.shape == (6, 128 + 56, 256, 3)  # the dream and the real simulator, side by side
    assert frames[:, :128, 128:].std() > 10  # the real panel shows a frame, not a blank


def test_play_without_a_display_says_how_to_play_headless(monkeypatch, capsys):
    monkeypatch.setenv("SDL_VIDEODRIVER", "no-such-driver")
    with pytest.raises(SystemExit) as exit_:
        main(["play", "--keys", "up:2"])
    assert exit_.value.code == 2 and "SDL_VIDEODRIVER=dummy" in capsys.readouterr().err


def test_play_refuses_what_it_cannot_do_before_opening_a_window(tmp_path):
    with pytest.raises(ConfigError, match=r"\.mp4"):
        play(PlayConfig(record=tmp_path / "out.gif", keys=[]))
    run = tmp_path / "run"
    shutil.copytree(SHIPPED_MODEL, run)
    (run / "policy.json").unlink()
    with pytest.raises(CheckpointError, match="no policy"):
        Session(run, policy_drives=True)


def test_play_s_frame_rate_is_a_positive_number_or_zero(capsys):
    from pipeline.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["play", "--fps", "0"]).fps == parser.parse_args(["play", "--fps", "0e0"]).fps == 0.0
    assert parser.parse_args(["play", "--fps", "24"]).fps == 24.0
    for bad in ("-3", "nan", "inf", "fast"):
        with pytest.raises(SystemExit):
            parser.parse_args(["play", "--fps", bad])
        assert "--fps: expected a positive number or 0" in capsys.readouterr().err
