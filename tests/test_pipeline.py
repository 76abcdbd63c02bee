import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BOX_SPACE, build_run, open_in_chromium, write_synthetic_dataset

from agents.config import load_pipeline_config
from pipeline.cli import main as cli_main
from pipeline.run import format_summary, make_summary, percent
from worldmodel.checkpoint import read_checkpoint
from worldmodel.config import ConfigError, to_dict
from worldmodel.dataset import Dataset
from worldmodel.rollout import RolloutConfig, dream_episode, write_rollout
from worldmodel.run_dir import RunDir
from worldmodel.world_model import WorldModel

MICRO = [
    "collect.episodes=4",
    "collect.source.max_steps=20",
    "tokenizer.train.steps=10",
    "dynamics.train.steps=10",
    "ppo.total_steps=2048",
    "ppo.num_envs=16",
    "eval.episodes=1",
    "eval.max_steps=20",
    "rollout.steps=8",
    "run.val_fraction=0.25",
    # one light round of the dream-to-real loop
    "loop.iterations=1",
    "loop.episodes=2",
    "loop.max_steps=20",
    "loop.dynamics_steps=4",
    "loop.ppo_steps=512",
    "loop.real_epochs=1",
    "loop.playoff_episodes=0",
]
# lighter still, so the suite stays fast on a busy 2-core machine (one torch thread avoids oversubscription)
LIGHT = [
    "run.threads=1",
    "tokenizer.train.batch_size=8",
    "tokenizer.val_frames=16",
    "dynamics.train.batch_size=4",
    "dynamics.val_batches=1",
    "eval.workers=1",
]
SUMMARY_KEYS = [
    ("tokenizer", "bytes_per_frame"),
    ("tokenizer", "val_psnr"),
    ("dynamics", "val_token_accuracy"),
    ("policy", "real_return_mean"),
    ("policy", "real_return_std"),
    ("random", "real_return_mean"),
    ("expert", "real_return_mean"),
]


def worldmodel_cli(
    args: list[str], cwd: Path, timeout: float = 300, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "SDL_VIDEODRIVER": "offscreen", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- fast: the rollout video and the summary ------------------------------------------------------------------


def test_training_twice_gives_the_same_weights(box_run, tmp_path):
    # the initial weights come from the stage's seed, not from whatever drew from torch's generator before
    _, again = build_run(tmp_path, BOX_SPACE, channels=3)
    for kind in ("tokenizer", "dynamics"):
        _, first = read_checkpoint(box_run / f"{kind}.safetensors", kind)
        _, second = read_checkpoint(again / f"{kind}.safetensors", kind)
        assert first.keys() == second.keys()
        for name, tensor in first.items():
            assert torch.equal(tensor, second[name]), f"{kind} {name} differs between two trainings"


def test_write_rollout(box_run, box_data, tmp_path):
    figures = write_rollout(box_run, box_data, RolloutConfig(steps=3, burn_in=2, scale=2, fps=4), tmp_path / "vid")
    mp4, gif = Path(figures["video"]), Path(figures["gif"])
    assert mp4 == tmp_path / "vid.mp4" and gif == tmp_path / "vid.gif"
    assert mp4.stat().st_size > 0 and gif.stat().st_size > 0
    # the video shows a held-out (validation) episode
    world = WorldModel.load(box_run, with_contexts=False)
    names = [Dataset.open(box_data).episodes[i].name for i in world.meta["val_episodes"]]
    assert figures["episode"] in names
    assert np.isfinite(figures["dream_psnr"]) and np.isfinite(figures["tokenizer_psnr"])
    import imageio.v2 as imageio

    frames = imageio.mimread(gif)
    assert len(frames) == figures["frames"]
    assert frames[0].shape[:2] == (32, 3 * 32)  # three 16x16 panels at scale 2


def test_a_rollout_from_a_dataset_without_the_run_s_held_out_episodes_says_so(box_run, tmp_path):
    from worldmodel.dataset import DatasetError

    other = write_synthetic_dataset(tmp_path / "other", BOX_SPACE, episodes=1, steps=12)
    with pytest.raises(DatasetError, match="1 episodes, too few for the run's held-out episodes"):
        write_rollout(box_run, other.root, RolloutConfig(steps=3, burn_in=2), tmp_path / "vid")
    assert not (tmp_path / "vid.mp4").exists()


def test_dream_episode_context_is_reconstruction(box_world, box_data):
    episode = Dataset.open(box_data).load(0)
    recon, dream = dream_episode(box_world, np.asarray(episode.frames), np.asarray(episode.actions), 3, 4)
    # the context part of the dream is the tokenizer's reconstruction of the real frames
    np.testing.assert_array_equal(dream[:3], recon[:3])
    assert dream.dtype == np.uint8 and dream.shape[1:] == (16, 16, 3)


def test_dream_episode_imagines_steps_frames(box_world, box_data):
    episode = Dataset.open(box_data).load(0)  # 12 steps: long enough for burn_in 3 + 4 steps
    recon, dream = dream_episode(box_world, np.asarray(episode.frames), np.asarray(episode.actions), 3, 4)
    assert recon.shape == dream.shape
    assert len(dream) == 3 + 4


def _stage_results(evaluation: dict) -> dict:
    """A finished run's stage results (`results.json`) around the given evaluation."""
    return {
        "collect": {"episodes": 2, "steps": 10, "mean_return": 1.0, "seeds": [0, 1]},
        "tokenizer": {"bytes_per_frame": 63.3, "tokens_per_frame": 64, "val_psnr": 20.0, "val_ssim": 0.5},
        "dynamics": {"val_token_accuracy": 0.5, "val_copy_last_accuracy": 0.4, "val_reward_mae": 0.1},
        "policy": {"imagined_steps": 100, "steps_per_second": 10.0, "dream_return": 2.0},
        "evaluate": evaluation,
        "rollout": {"video": "/nowhere/x/rollout.mp4"},
        "timings": {"collect": 1.0},
    }


def test_summary_from_results():
    config = load_pipeline_config("tiny", ["run.runs_dir=/nowhere", "run.name=x"])
    evaluation = {
        kind: {"mean": m, "std": 1.0, "returns": [m - 1, m + 1], "seeds": [5, 6]}
        for kind, m in (("policy", 3.0), ("random", -1.0), ("expert", 9.0))
    }
    summary = make_summary(config, _stage_results(evaluation))
    assert summary["policy"] == {"real_return_mean": 3.0, "real_return_std": 1.0, "crashes": 0}
    assert summary["policy_beats_random"] == 2 and summary["loop"] is None
    assert summary["expert"]["real_return_mean"] == 9.0
    assert summary["episodes_evaluated"] == 2
    assert summary["eval_seeds"] == [5, 6]
    assert summary["dataset"] == {"episodes": 2, "steps": 10, "mean_return": 1.0}
    assert summary["rollout_video"] == "/nowhere/x/rollout.mp4"
    text = format_summary(summary)
    assert "63.3 bytes/frame" in text and "over 2 held-out episodes" in text
    assert "SSIM 0.500\n" in text and "reward MAE 0.100\n" in text  # a run from before stages counted their steps

    results = _stage_results(evaluation)  # the stages' steps, and which limit stopped them
    results["tokenizer"]["steps"] = 619  # the tiny preset's limits: 12,000 steps or 2.5 minutes
    results["dynamics"]["steps"] = 5000  # 5,000 steps or 2.5 minutes
    text = format_summary(make_summary(config, results))
    # a 2.5-minute budget trains 1,635 steps where the preset's minutes were set (10.9 steps/s): 619 falls short
    assert "SSIM 0.500; 619 steps in its 2.5-minute budget (about 1635 where the preset was set" in text
    assert "reward MAE 0.100; 5000 steps\n" in text
    assert "steady" not in summary and "always" not in text  # CarRacing has no steady action
    assert "minute budgets x" not in text  # the preset's own minutes

    results["loop/01/dynamics"] = {"steps": 150}  # the loop's rounds, each in its own budget
    results["loop/02/dynamics"] = {"steps": 148}
    scaled = load_pipeline_config("tiny", ["run.runs_dir=/nowhere", "run.name=x", "run.time_scale=2"])
    text = format_summary(make_summary(scaled, results))
    assert "SSIM 0.500; 619 steps in its 5-minute budget (about 1635 where" in text  # the preset's own minutes
    results["tokenizer"]["steps"] = 1422  # what the scaled budget trained on a machine 2.5 times slower
    text = format_summary(make_summary(scaled, results))
    assert "SSIM 0.500; 1422 steps in its 5-minute budget\n" in text  # near the preset's 1,635: nothing to add
    assert "reward MAE 0.100; 5000 steps, then 150, 148 in the loop's rounds\n" in text
    assert text.rstrip().endswith("collect 1; minute budgets x2 (run.time_scale)")


def test_summary_names_the_loop_policy_a_shortened_round_trained():
    config = load_pipeline_config("tiny", ["run.runs_dir=/nowhere", "run.name=x"])
    evaluation = {kind: {"mean": 1.0, "std": 0.0, "returns": [1.0], "seeds": [5]} for kind in ("policy", "random")}
    results = _stage_results(evaluation)
    for j, share in ((1, None), (2, 0.94), (3, None)):  # round 2 had 94% of its minutes; round 3 only scored
        results[f"loop/{j:02d}/collect"] = {
            "real_steps_total": 10 + 4 * j,
            "steps": 4,
            "real_return_mean": float(j),
            "real_return_std": 0.0,
            "real_sampled_return_mean": 0.0,
            "dream_replay_return": 0.0,
            "real_recorded_return": 0.0,
            "dream_gap": 0.0,
            **({"round_share": share} if share else {}),
        }
        if j < 3:
            results[f"loop/{j:02d}/dynamics"] = {"val_token_accuracy": 0.5}
            results[f"loop/{j:02d}/policy"] = {"dream_return": 1.0, "continued_from": j - 1 if j == 1 else 0}
    results["loop/select"] = {"rounds": 2, "chosen": 2, "scores": [1.0, 2.0, 3.0]}
    summary = make_summary(config, results)
    assert [row.get("round_share") for row in summary["loop"]["curve"]] == [None, 1.0, 0.94]
    text = format_summary(summary)
    assert "loop policy 1  " in text and "loop policy 2 (from 0; 94% of a round's minutes)  " in text
    summary["loop"]["curve"][2]["round_share"] = 0.996  # short of its minutes, if by little: never "100%"
    assert "loop policy 2 (from 0; 99% of a round's minutes)  " in format_summary(summary)
    assert [percent(x) for x in (0.94, 0.57, 1 - 1e-12, 1.0)] == ["94%", "57%", "99%", "100%"]


def test_the_stage_clock_keeps_a_killed_stage_s_time_for_its_resume(tmp_path):
    from pipeline.run import Stages
    from worldmodel.run_dir import Results, StageClock

    clock = StageClock(tmp_path, every=0.02)
    with clock.running("tokenizer", before=3.0) as elapsed:
        seen = json.loads(RunDir(tmp_path).stage_clock.read_text())  # written as the stage starts
        assert seen["stage"] == "tokenizer" and seen["seconds"] >= 3.0
        deadline = time.monotonic() + 30
        while seen["seconds"] < 3.2 and time.monotonic() < deadline:  # rewritten while it runs
            time.sleep(0.05)
            seen = json.loads(RunDir(tmp_path).stage_clock.read_text())
        assert seen["stage"] == "tokenizer" and 3.2 <= seen["seconds"] <= elapsed() + 0.05  # to 0.1 s
    assert not RunDir(tmp_path).stage_clock.exists()  # a finished stage leaves nothing behind
    with pytest.raises(RuntimeError), clock.running("dynamics"):
        time.sleep(0.3)
        raise RuntimeError("out of memory")  # a stage that fails is resumed as after a kill, its time kept
    left = clock.left_behind(lambda stage: False)
    assert list(left) == ["dynamics"] and 0.3 <= left["dynamics"] < 5.0
    assert clock.left_behind(lambda stage: stage == "dynamics") == {}  # it finished after all
    RunDir(tmp_path).stage_clock.write_text("{not json")
    assert clock.left_behind(lambda stage: False) == {}

    # a run killed 40 s into round 1's dynamics, after 100 s of the loop: the loop's budget counts the 40 s at once,
    # and the stage's timing counts them when it finishes
    results = Results(tmp_path)
    results.record("timings", {"collect": 10.0, "loop/01/collect": 100.0})
    results.record("collect", {})
    results.record("loop/01/collect", {})
    RunDir(tmp_path).stage_clock.write_text(json.dumps({"stage": "loop/01/dynamics", "seconds": 40.0}))
    stage = Stages(Results(tmp_path), StageClock(tmp_path))
    ran = []
    stage("collect", lambda: ran.append("collect") or {})
    assert ran == [] and stage.seconds("loop/") == 140.0
    stage("loop/01/dynamics", lambda: {"steps": 5})
    timings = Results(tmp_path).data["timings"]
    assert 40.0 <= timings["loop/01/dynamics"] < 45.0 and stage.seconds("loop/") == pytest.approx(
        100 + timings["loop/01/dynamics"]
    )
    assert Results(tmp_path).data["loop/01/dynamics"] == {"steps": 5} and not RunDir(tmp_path).stage_clock.exists()
    stage("loop/01/policy", lambda: {})  # the next stage starts its own clock from zero
    assert Results(tmp_path).data["timings"]["loop/01/policy"] < 5.0


def test_a_run_without_the_video_writer_stops_before_collecting(tmp_path, monkeypatch):
    import importlib.util

    from pipeline.run import run_pipeline

    config = load_pipeline_config("tiny", [f"run.runs_dir={tmp_path}", "run.name=novideo"])
    find_spec = importlib.util.find_spec
    missing = "imageio_ffmpeg"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
        run_pipeline(config)
    assert not (tmp_path / "novideo").exists()


def test_summary_shows_highway_steady_action_beside_the_policy():
    config = load_pipeline_config("tiny", ["run.runs_dir=/nowhere", "run.name=x"], source="highway")
    evaluation = {
        kind: {"mean": m, "std": 0.5, "returns": [m, m], "seeds": [5, 6], "crashes": c}
        for kind, m, c in (("policy", 21.1, 0), ("random", 7.0, 2), ("expert", 23.4, 1), ("steady", 21.1, 0))
    }
    summary = make_summary(config, _stage_results(evaluation))
    assert summary["steady"] == {"real_return_mean": 21.1, "real_return_std": 0.5, "crashes": 0, "action": "SLOWER"}
    assert "always SLOWER (real)  21.1 +- 0.5 over 2 held-out episodes, 0 crashed" in format_summary(summary)


# --- slow: the whole pipeline as the `worldmodel` command ------------------------------------------------------


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    # the two policies play off for the one to keep, each on two more tracks
    playoff = ["loop.playoff_episodes=2", "loop.playoff_candidates=2"]
    # a policy that sees the last two frames drives every stage: the dream's PPO, the real update, the loop's episodes,
    # the playoff and the evaluation (every other run's policy sees one)
    args = ["run", "--name", "smoke", *MICRO, *LIGHT, *playoff, "ppo.policy_frames=2", f"run.runs_dir={runs}"]
    result = worldmodel_cli(args, cwd=runs)
    return runs, args, result


@pytest.mark.slow
def test_micro_run_writes_summary(micro_run):
    runs, _, result = micro_run
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = runs / "smoke"
    summary = json.loads((run_dir / "summary.json").read_text())
    for section, key in SUMMARY_KEYS:
        assert isinstance(summary[section][key], float), (section, key)
    assert summary["episodes_evaluated"] == 1
    assert summary["source"] == "carracing"
    assert summary["dataset"]["episodes"] == 4 and summary["dataset"]["steps"] == 80
    assert 0 <= summary["dynamics"]["val_token_accuracy"] <= 1
    assert summary["tokenizer"]["bytes_per_frame"] == pytest.approx(64 * np.log2(240) / 8)
    video = Path(summary["rollout_video"])
    assert video.is_file() and video.suffix == ".mp4" and video.stat().st_size > 0
    assert video.parent == run_dir
    for name in ("tokenizer", "dynamics", "policy"):
        assert (run_dir / f"{name}.safetensors").is_file() and (run_dir / f"{name}.json").is_file()
    assert json.loads((run_dir / "policy.json").read_text())["config"]["frames"] == 2
    assert (run_dir / "tokens.npz").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert "summary" in result.stdout
    # evaluation seeds never overlap the collection seeds
    results = json.loads((run_dir / "results.json").read_text())
    assert not set(summary["eval_seeds"]) & set(results["collect"]["seeds"])
    # both policies played off on the same two tracks, after every collection seed and apart from the evaluation's;
    # the one kept has the best mean over its collection round's deterministic episode and its playoff episodes
    playoff = results["loop/playoff"]
    collected = {e.seed for e in Dataset.open(run_dir / "dataset").episodes}
    assert playoff["seeds"] == [8, 9] and not set(playoff["seeds"]) & (collected | set(summary["eval_seeds"]))
    assert sorted(playoff["policies"]) == ["0", "1"]
    combined = [
        np.mean(results[f"loop/{j + 1:02d}/collect"]["real_returns"] + playoff["policies"][str(j)]["returns"])
        for j in (0, 1)
    ]
    assert all(len(p["returns"]) == 2 and p["steps"] == 40 for p in playoff["policies"].values())
    assert results["loop/select"]["chosen"] == int(np.argmax(combined)) == summary["loop"]["chosen"]
    assert results["loop/select"]["playoff_scores"] == {
        "0": pytest.approx(combined[0]),
        "1": pytest.approx(combined[1]),
    }
    assert "loop playoff" in result.stdout and "(80 real steps)" in result.stdout
    # the loop round's PPO began with an update on the one episode its policy drove sampling (20 recorded steps)
    assert results["loop/01/policy"]["real_update_steps"] == 20
    assert (run_dir / "loop" / "01" / "policy_real.safetensors").is_file()
    # the run's report: written at its end, opened in a headless browser without a console error or a broken asset
    assert "report.html" in result.stdout
    page = (run_dir / "report.html").read_text()
    assert 'src="data:video/mp4;base64,' in page and "The dream-to-real loop" in page
    dom, console = open_in_chromium(run_dir / "report.html")
    assert console == [] and '<p id="missing"></p>' in dom


@pytest.mark.slow
def test_micro_run_rerun_skips_finished_stages(micro_run):
    runs, args, first = micro_run
    assert first.returncode == 0, first.stderr[-3000:]
    before = (runs / "smoke" / "tokenizer.safetensors").stat().st_mtime_ns
    result = worldmodel_cli(args, cwd=runs, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    finished = (
        "collect",
        "tokenizer",
        "dynamics",
        "policy",
        "loop/01/policy",
        "loop/playoff",
        "loop/select",
        "evaluate",
    )
    for stage in (*finished, "rollout"):
        assert f"[{stage}] already done, skipping" in result.stdout
    assert (runs / "smoke" / "tokenizer.safetensors").stat().st_mtime_ns == before
    assert json.loads((runs / "smoke" / "summary.json").read_text())["episodes_evaluated"] == 1


@pytest.mark.slow
def test_rerun_with_another_config_is_refused(micro_run):
    runs, args, first = micro_run
    assert first.returncode == 0, first.stderr[-3000:]
    result = worldmodel_cli([*args, "ppo.lr=0.5"], cwd=runs, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "config.yaml" in result.stderr and "ppo" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_corrupt_tokenizer_makes_rollout_exit_2(micro_run, tmp_path):
    runs, _, first = micro_run
    assert first.returncode == 0, first.stderr[-3000:]
    copy = tmp_path / "runs"
    shutil.copytree(runs / "smoke", copy / "smoke")
    weights = copy / "smoke" / "tokenizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = worldmodel_cli(
        ["rollout", "--name", "smoke", f"run.runs_dir={copy}", "--out", str(tmp_path / "video")], cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error:")
    assert "tokenizer.safetensors" in result.stderr and "corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "video.mp4").exists()


@pytest.mark.slow
def test_bench_baseline_scores_real_ppo_against_the_run(micro_run, tmp_path):
    runs, _, first = micro_run
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "smoke"
    shutil.copytree(runs / "smoke", run)
    # three updates of 32 steps, a snapshot after each: the steps end it, the minutes are there to spare
    args = ["bench", "baseline", "--run", str(run), "--minutes", "3", "--envs", "2", "--snapshot-minutes", "0.001"]
    args += ["--rollout-steps", "16", "--max-steps", "100"]
    result = worldmodel_cli(args, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((run / "real_ppo" / "baseline.json").read_text())
    real, dream = figures["real_ppo"], figures["dream_pipeline"]
    assert real["rollout_steps"] == 16 and real["real_steps"] == 96 and real["max_steps"] == 100
    assert [row["real_steps"] for row in real["curve"]] == [32, 64, 96]
    assert [row["wall_s"] for row in real["curve"]] == sorted(row["wall_s"] for row in real["curve"])
    # the dream pipeline's policies: the one before the loop, the round's, and the kept one at the end
    assert [row["policy"] for row in dream["curve"]] == [0, 1, "kept"]
    assert dream["curve"][-1]["mean"] == dream["score"]
    assert figures["time_ratio"]["bound"] in ("<=", ">") and figures["time_ratio"]["value"] > 0
    if figures["time_ratio"]["bound"] == ">":  # never reached it: the bound is the time it trained, not its 3 minutes
        trained = min(real["curve"][-1]["wall_s"], 180) / dream["wall_s"]
        assert figures["time_ratio"]["value"] == pytest.approx(trained)
    markdown = (run / "real_ppo" / "baseline.md").read_text()
    assert markdown.count("real-simulator PPO") >= 2 and "budget 3, at most 100 steps" in markdown
    assert (run / "real_ppo" / "baseline.png").stat().st_size > 0
    report = worldmodel_cli(["report", str(run)], cwd=tmp_path)
    assert report.returncode == 0 and "The baseline: PPO in the real simulator" in (run / "report.html").read_text()
    # scored policies are kept: a second call trains and evaluates nothing again
    before = (run / "real_ppo" / "scores.json").read_text()
    again = worldmodel_cli(args, cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and (run / "real_ppo" / "scores.json").read_text() == before


@pytest.mark.slow
def test_cli_errors_and_help(tmp_path):
    result = worldmodel_cli(["run", "--name", "x", f"run.runs_dir={tmp_path}", "ppo.nonsense=1"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "nonsense" in result.stderr
    result = worldmodel_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0 and "rollout" in result.stdout
    script = shutil.which("worldmodel") or str(Path(sys.executable).parent / "worldmodel")
    assert Path(script).is_file()
    result = subprocess.run([script, "rollout", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--out" in result.stdout
    assert not list(tmp_path.iterdir())  # nothing was written


@pytest.mark.slow
def test_highway_micro_run(tmp_path):
    args = [
        "run",
        "--source",
        "highway",
        "--name",
        "hw",
        *MICRO,
        *LIGHT,
        "collect.source.max_steps=null",
        "ppo.total_steps=512",
        f"run.runs_dir={tmp_path}",
    ]
    result = worldmodel_cli(args, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "hw" / "summary.json").read_text())
    assert summary["source"] == "highway"
    for section, key in SUMMARY_KEYS:
        assert isinstance(summary[section][key], float), (section, key)
    dataset = Dataset.open(tmp_path / "hw" / "dataset")
    assert dataset.frame_shape == (64, 64, 1)
    assert dataset.manifest.action_space == {"type": "discrete", "n": 5}
    assert Path(summary["rollout_video"]).stat().st_size > 0
    # the dream's verdict on each reference driver, driven on the evaluation's own seeds and steps: the same real
    # returns as the evaluation's, every real end either caught or missed by the dream
    verdict_json = tmp_path / "verdict.json"
    bench = ["bench", "verdict", "--run", str(tmp_path / "hw"), "--episodes", "1", "--workers", "1"]
    result = worldmodel_cli([*bench, "--json", str(verdict_json)], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| expert |" in result.stdout
    verdict = json.loads(verdict_json.read_text())
    assert set(verdict["drivers"]) == {"policy", "random", "expert", "steady"}
    for kind, row in verdict["drivers"].items():
        assert row["real_return"] == pytest.approx(summary[kind]["real_return_mean"], abs=1e-4), kind
        assert row["caught"] + row["missed"] == row["real_ends"] and len(row["lead"]) == row["caught"]
    from bench.verdict import VerdictConfig, bench_verdict

    collected = Dataset.open(tmp_path / "hw" / "dataset").episodes[0].seed
    with pytest.raises(ValueError, match="driven to make the run's data"):
        bench_verdict(tmp_path / "hw", VerdictConfig(episodes=1, seed=collected))
    # played by hand, side by side: the keys are highway's meta-actions, the grayscale frames drawn as they come
    from pipeline.play import Session

    session = Session(tmp_path / "hw", side_by_side=True)
    assert [session.step(frozenset(keys)) for keys in ((), ("left",), ("up",))] == [1, 0, 3]
    assert [panel.frame.shape for panel in session.panels] == [(64, 64, 1), (64, 64, 1)]
    session.close()


def test_a_resume_under_another_time_scale_is_refused_and_says_so(tmp_path):
    from pipeline.run import run_pipeline
    from worldmodel.run_dir import Results

    started = load_pipeline_config("tiny", [f"run.runs_dir={tmp_path}", "run.name=x"])
    run_dir = started.run_dir
    run_dir.mkdir(parents=True)
    RunDir(run_dir).config.write_text(yaml.safe_dump(to_dict(started), sort_keys=False))
    Results(run_dir).record("tokenizer", {"steps": 619})  # the tokenizer finished in its 2.5 minutes
    resumed = load_pipeline_config("tiny", [f"run.runs_dir={tmp_path}", "run.name=x", "run.time_scale=2.5"])
    with pytest.raises(ConfigError, match=r"other `tokenizer` settings than now, its minute budgets x1 then and x2.5"):
        run_pipeline(resumed)
    assert not (run_dir / "dataset").exists()  # refused before collecting
    Results(run_dir).record("collect", {"episodes": 100})  # settings without a minute budget: the scale is no cause
    other = load_pipeline_config("tiny", [f"run.runs_dir={tmp_path}", "run.name=x", "collect.episodes=50"])
    with pytest.raises(ConfigError, match=r"other `collect` settings than now \(see"):
        run_pipeline(other)
    recorded = yaml.safe_load(RunDir(run_dir).config.read_text())  # nor where the run did not record its scale
    del recorded["run"]["scaled_by"]
    RunDir(run_dir).config.write_text(yaml.safe_dump(recorded, sort_keys=False))
    resumed = load_pipeline_config("tiny", [f"run.runs_dir={tmp_path}", "run.name=x", "run.time_scale=2.5"])
    with pytest.raises(ConfigError, match=r"other `tokenizer` settings than now \(see"):
        run_pipeline(resumed)


def test_a_loop_added_to_a_run_evaluated_without_one_is_refused(tmp_path):
    from pipeline.run import run_pipeline
    from worldmodel.run_dir import Results

    overrides = [f"run.runs_dir={tmp_path}", "run.name=x"]
    started = load_pipeline_config("tiny", [*overrides, "loop.iterations=0"])
    run_dir = started.run_dir
    run_dir.mkdir(parents=True)
    RunDir(run_dir).config.write_text(yaml.safe_dump(to_dict(started), sort_keys=False))
    Results(run_dir).record("evaluate", {"policy": {"mean": 600.0}})  # the policy before any loop, scored
    # no loop stage ever ran, but the evaluation (and the video) would stay that policy's beside the loop's curve
    with pytest.raises(ConfigError, match=r"stage 'evaluate', after stage 'loop', finished with other `loop` settings"):
        run_pipeline(load_pipeline_config("tiny", overrides))
    assert not (run_dir / "dataset").exists()  # refused before any work


def test_a_collection_killed_midway_keeps_its_settings_for_the_resume(tmp_path, monkeypatch):
    # a run killed while collecting left episodes of 238 steps; resumed with other collect settings it would append
    # episodes of 200 beside them and rewrite config.yaml as if all were made so
    import pipeline.run
    from pipeline.run import run_pipeline
    from worldmodel.run_dir import Results

    class Reached(Exception):
        """The stage's work began: the settings were accepted."""

    def reached(*args, **kwargs):
        raise Reached

    for work in ("collect", "train_dynamics"):
        monkeypatch.setattr(pipeline.run, work, reached)
    overrides = [f"run.runs_dir={tmp_path}", "run.name=x", "collect.source.max_steps=238"]
    started = load_pipeline_config("tiny", overrides)
    run_dir = started.run_dir
    run_dir.mkdir(parents=True)
    RunDir(run_dir).config.write_text(yaml.safe_dump(to_dict(started), sort_keys=False))
    RunDir(run_dir).stage_clock.write_text(json.dumps({"stage": "collect", "seconds": 12.0}))  # killed in it
    kept = RunDir(run_dir).config.read_text()
    with pytest.raises(ConfigError, match=r"stage 'collect' started \(and was stopped\) with other `collect` setting"):
        run_pipeline(load_pipeline_config("tiny", overrides[:2]))
    assert RunDir(run_dir).config.read_text() == kept and not (run_dir / "dataset").exists()  # refused before work
    overrides += ["collect.workers=1", "eval.workers=1"]
    with pytest.raises(Reached):  # fewer workers make the same episodes: the collection goes on
        run_pipeline(load_pipeline_config("tiny", overrides))
    # a training stage killed midway goes on with other training settings (its trainer refuses a `_last`
    # checkpoint of another model config by itself)
    Results(run_dir).record("collect", {"episodes": 100})
    Results(run_dir).record("tokenizer", {"steps": 600})
    RunDir(run_dir).stage_clock.write_text(json.dumps({"stage": "dynamics", "seconds": 30.0}))
    overrides.append("dynamics.train.batch_size=16")  # config.yaml says so from now on
    with pytest.raises(Reached):
        run_pipeline(load_pipeline_config("tiny", overrides))
    # killed in a loop round's collection, after the loop's first round: the loop's settings are fixed
    Results(run_dir).record("dynamics", {"steps": 500})
    Results(run_dir).record("policy", {"steps": 500})
    Results(run_dir).record("loop/01/collect", {"episodes": 8})
    RunDir(run_dir).stage_clock.write_text(json.dumps({"stage": "loop/02/collect", "seconds": 3.0}))
    with pytest.raises(ConfigError, match=r"stage 'loop' started \(and was stopped\) with other `loop` settings"):
        run_pipeline(load_pipeline_config("tiny", [*overrides, "loop.episodes=4"]))


def _run_command(tmp_path, monkeypatch, preset="tiny", name="auto"):
    """`worldmodel run ... run.time_scale=auto`'s config as the pipeline would get it (the pipeline itself stubbed)."""
    import pipeline.run

    got = []
    monkeypatch.setattr(pipeline.run, "run_pipeline", got.append)
    cli_main(["run", "--preset", preset, "--name", name, f"run.runs_dir={tmp_path}", "run.time_scale=auto"])
    return got[0]


def test_time_scale_auto_measures_a_new_run_and_keeps_a_resumed_runs_scale(tmp_path, monkeypatch, capsys):
    import bench.train_step

    calls, measured = [], {"scale": 2.5}

    def machine_time_scale(preset, reference, seconds=3.0, device="cpu"):
        calls.append((preset, tuple(reference)))
        return {"scale": measured["scale"], "rates": [4.36, 2.16], "reference": list(reference)}

    monkeypatch.setattr(bench.train_step, "machine_time_scale", machine_time_scale)
    plain = load_pipeline_config("tiny")
    config = _run_command(tmp_path, monkeypatch)
    assert calls == [("tiny", (10.9, 5.4))]  # the preset's reference rates
    assert config.tokenizer.train.max_minutes == pytest.approx(2.5 * plain.tokenizer.train.max_minutes)
    assert (config.run.time_scale, config.run.scaled_by) == (1.0, 2.5)
    assert "at 4.36 and the dynamics model at 2.16 steps/s" in capsys.readouterr().out

    config.run_dir.mkdir(parents=True)  # the run started: its config.yaml records the scale, which a resume keeps
    RunDir(config.run_dir).config.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    measured["scale"] = 3.0
    assert _run_command(tmp_path, monkeypatch) == config and len(calls) == 1
    assert "started with its minute budgets x2.5" in capsys.readouterr().out

    saved = tmp_path / "scaled.yaml"  # a scaled run's config.yaml as the preset: the factor is the whole one, once
    shutil.copy(RunDir(config.run_dir).config, saved)
    again = _run_command(tmp_path, monkeypatch, str(saved), "again")
    assert again.run.scaled_by == pytest.approx(3.0)
    assert again.tokenizer.train.max_minutes == pytest.approx(3.0 * plain.tokenizer.train.max_minutes)

    measured["scale"] = 0.3  # a machine faster than the reference keeps the preset's minutes
    fast = _run_command(tmp_path, monkeypatch, "tiny", "fast")
    assert fast.run.scaled_by == 1.0 and fast.loop.max_minutes == plain.loop.max_minutes

    recorded = yaml.safe_load(RunDir(config.run_dir).config.read_text())  # a run from before runs kept their scale
    del recorded["run"]["scaled_by"]
    RunDir(config.run_dir).config.write_text(yaml.safe_dump(recorded, sort_keys=False))
    refusals = (
        (lambda: _run_command(tmp_path, monkeypatch), "resume it with the run.time_scale it started with"),
        (lambda: _run_command(tmp_path, monkeypatch, "base", "gpu"), "no run.reference_rates"),  # no reference
        (
            lambda: cli_main(["collect", "--name", "c", f"run.runs_dir={tmp_path}", "run.time_scale=auto"]),
            "auto is for `worldmodel run`, which measures the machine once for the run; give `worldmodel collect`",
        ),
    )
    for command, says in refusals:
        with pytest.raises(SystemExit):
            command()
        assert says in capsys.readouterr().err
    assert len(calls) == 3  # none of them measured


def test_a_setting_added_to_the_project_since_a_stage_finished_does_not_block_its_resume():
    from pipeline.run import _changed

    defaults = {"lr": 3e-4, "horizon": 32, "top_k": None, "model": {"layers": 3}}
    assert not _changed({"lr": 1e-3, "horizon": 32}, {"lr": 1e-3, "horizon": 32, "top_k": None}, defaults)
    assert _changed({"lr": 1e-3}, {"lr": 1e-3, "top_k": 8}, defaults)  # a new setting set otherwise than its default
    assert _changed({"lr": 1e-3}, {"lr": 2e-3, "top_k": None}, defaults)
    assert _changed({"model": {"layers": 3}}, {"model": {"layers": 4}}, defaults)
    assert _changed({"lr": 1e-3, "gone": 1}, {"lr": 1e-3}, defaults)


def test_evaluate_refuses_a_missing_policy_checkpoint_before_driving(tmp_path):
    missing = tmp_path / "runs" / "x" / "loop" / "01" / "policy.safetensors"
    missing.parent.mkdir(parents=True)  # the run is there; the policy asked for is not
    args = ["evaluate", "--name", "x", f"run.runs_dir={tmp_path / 'runs'}", "--policy", str(missing)]
    result = worldmodel_cli(args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{missing} not found" in result.stderr and "Traceback" not in result.stderr
