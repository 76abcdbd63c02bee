"""The baselines a user would compare with: PPO in the real simulator, and the pipeline over several seeds."""

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from conftest import write_synthetic_dataset

from agents.ppo import POLICY, PPOConfig, load_policy
from agents.real_ppo import RealPPOConfig, budget_spent, step_cap, train_real_ppo
from bench.baseline import BaselineConfig, time_ratio
from bench.baseline import format_markdown as baseline_markdown
from bench.reliability import (
    SEED_STRIDE,
    ReliabilityConfig,
    aggregate,
    format_markdown,
    reliability_command,
    seed_figures,
    seed_overrides,
)
from envs.sources import SourceConfig
from pipeline.cli import build_parser
from worldmodel.checkpoint import CheckpointError
from worldmodel.config import ConfigError
from worldmodel.dataset import DatasetError
from worldmodel.logger import RunLogger


def test_time_ratio_is_the_first_snapshot_that_reaches_the_score_or_a_lower_bound():
    curve = [{"wall_s": 60.0, "mean": -20.0}, {"wall_s": 120.0, "mean": 300.0}, {"wall_s": 180.0, "mean": 500.0}]
    assert time_ratio(curve, 250.0, 60.0, 600.0) == {"value": 2.0, "bound": "<="}
    assert time_ratio(curve, 800.0, 60.0, 600.0) == {"value": 10.0, "bound": ">"}


def _baseline_results(source: str) -> dict:
    kept = {"policy": "kept", "wall_s": 1680.0, "real_steps": 40_000, "mean": 22.4, "std": 3.1, "crashes": 3}
    snapshot = {"wall_s": 420.0, "real_steps": 30_000, "mean": 21.0, "std": 4.0, "crashes": 6}
    return {
        "run": "runs/x",
        "source": source,
        "dream_pipeline": {"score": 22.4, "wall_s": 1680.0, "curve": [kept]},
        "real_ppo": {
            "minutes": 7,
            "num_envs": 8,
            "real_steps": 30_000,
            "steps_per_second": 71.0,
            "curve": [snapshot, {**snapshot, "crashes": None}],
            "best": 21.0,
        },
        "time_ratio": {"value": 0.25, "bound": ">"},
        "eval_episodes": 50,
    }


def test_the_baseline_table_counts_crashes_where_the_source_has_them():
    table = baseline_markdown(_baseline_results("highway")).splitlines()
    assert table[2].endswith("| held-out return | crashes |") and table[3] == "|---|---|---|---|---|"
    assert table[4] == "| dream pipeline, kept policy | 28.0 min | 40,000 | 22.4 +- 3.1 | 3 |"
    assert table[5] == "| real-simulator PPO | 7.0 min | 30,000 | 21.0 +- 4.0 | 6 |"
    assert table[6].endswith("| 21.0 +- 4.0 | ? |")  # a score kept from before crashes were recorded
    carracing = baseline_markdown(_baseline_results("carracing"))
    assert (
        "crashes" not in carracing
        and "| dream pipeline, kept policy | 28.0 min | 40,000 | 22.4 +- 3.1 |\n" in carracing
    )


def _summary(policy: list[float], random: list[float], curve: list[float] | None = None) -> dict:
    loop = None
    if curve is not None:
        loop = {
            "rounds": len(curve) - 1,
            "chosen": int(np.argmax(curve)),
            "curve": [{"real_return_mean": x} for x in curve],
        }
    return {
        "run": "runs/x",
        "policy": {"real_return_mean": float(np.mean(policy)), "real_return_std": float(np.std(policy)), "crashes": 1},
        "random": {"real_return_mean": float(np.mean(random)), "real_return_std": 0.0, "crashes": 0},
        "expert": {"real_return_mean": 880.0, "real_return_std": 0.0, "crashes": 0},
        "policy_beats_random": int(sum(p > r for p, r in zip(policy, random, strict=True))),
        "episodes_evaluated": len(policy),
        "loop": loop,
        "timings_s": {"collect": 60.0, "tokenizer": 120.0},
    }


def test_reliability_table_over_seeds():
    rows = [
        seed_figures(_summary([600.0] * 10, [-30.0] * 10, [100.0, 400.0, 620.0])),
        seed_figures(_summary([700.0] * 9 + [-50.0], [-30.0] * 10, [-20.0, 300.0])),
        seed_figures(_summary([-80.0] * 10, [-30.0] * 10)),
    ]
    assert rows[0]["beats_random"] == 10 and rows[1]["beats_random"] == 9 and rows[2]["beats_random"] == 0
    assert rows[0]["loop_curve"] == [100.0, 400.0, 620.0] and rows[0]["loop_chosen"] == 2
    assert rows[2]["loop_rounds"] == 0 and rows[0]["stage_seconds"] == 180.0
    over = aggregate(rows)
    assert over["mean"] == pytest.approx((600 + 625 - 80) / 3) and over["median"] == 600.0 and over["worst"] == -80.0
    assert over["seeds_beating_random_on_9_of_10"] == 2 and over["worst_beats_random"] == 0
    results = {"command": "c", "source": "highway", "seeds": [0, 1, 2], "per_seed": rows, "over_seeds": over}
    table = format_markdown(results)
    assert "| 1 | 625.0" in table and "9 of 10" in table and "1 crashed" in table
    assert "2 of 3 seeds beat the random policy" in table
    assert "always" not in table  # no seed's summary holds a steady action
    rows[0]["steady"] = {"action": "SLOWER", "real_return_mean": 21.1, "real_return_std": 0.8, "crashes": 0}
    assert "1 crashed (expert 0); always SLOWER: 21.1, 0 crashed |" in format_markdown(results)
    assert "budgets x" not in table and rows[0]["scaled_by"] == 1.0
    rows[1]["scaled_by"] = 2.48  # a seed run with run.time_scale=auto on a slower machine says so
    assert format_markdown(results).splitlines()[5].endswith("| 3.0 min (budgets x2.48) |")
    one = {**results, "seeds": [0], "per_seed": rows[:1], "over_seeds": aggregate(rows[:1])}
    assert "Over 1 seed: mean 600.0" in format_markdown(one) and "1 of 1 seed beat" in format_markdown(one)


def test_reliability_with_time_scale_auto_measures_once_for_every_seed_it_starts(tmp_path, monkeypatch, capsys):
    import subprocess

    import bench.train_step
    from bench.reliability import bench_reliability

    measured, started = [], []

    def machine_time_scale(preset, reference, seconds=3.0, device="cpu"):
        measured.append(preset)
        return {"scale": 2.5 + len(measured), "rates": [3.0, 1.5], "reference": list(reference)}

    def run_seed(command, check=False):  # a seed's `worldmodel run`: its config.yaml records the factor it ran with
        run = tmp_path / command[command.index("--name") + 1]
        scale = next(item for item in command if item.startswith("run.time_scale="))
        started.append(scale)
        run.mkdir(exist_ok=True)
        factor = 3.5 if scale.endswith("auto") else float(scale.split("=")[1])
        (run / "config.yaml").write_text(yaml.safe_dump({"run": {"scaled_by": factor}}))
        summary = _summary([600.0] * 10, [-30.0] * 10)
        (run / "summary.json").write_text(json.dumps({**summary, "scaled_by": factor}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.train_step, "machine_time_scale", machine_time_scale)
    monkeypatch.setattr(subprocess, "run", run_seed)
    config = ReliabilityConfig(seeds=(0, 1, 2), runs_dir=str(tmp_path), overrides=["run.time_scale=auto"])
    results = bench_reliability(config, tmp_path / "out")
    assert measured == ["tiny"] and started == ["run.time_scale=3.5"] * 3  # one machine, one factor for every seed
    assert [row["scaled_by"] for row in results["per_seed"]] == [3.5] * 3
    assert "every seed to start now x3.5, measured once" in capsys.readouterr().out

    (tmp_path / "reliability-tiny-carracing-seed1" / "summary.json").unlink()  # a killed bench, seeds 1 and 3 to go
    shutil.rmtree(tmp_path / "reliability-tiny-carracing-seed2")
    started.clear()
    bench_reliability(ReliabilityConfig(**{**vars(config), "seeds": (0, 1, 2, 3)}), tmp_path / "out")
    # seeds 0 and 1 started before: `auto` reads their factor back; the new ones take seed 0's, measuring nothing
    assert (
        measured == ["tiny"] and started == ["run.time_scale=auto", "run.time_scale=auto"] + ["run.time_scale=3.5"] * 2
    )
    assert "every seed to start now x3.5, as seed 0's run" in capsys.readouterr().out


def test_the_recorded_command_reruns_the_bench_as_the_cli_reads_it():
    assert (
        reliability_command(ReliabilityConfig(seeds=(0, 1, 2, 3, 4)))
        == "worldmodel bench reliability --preset tiny --seeds 5"
    )
    config = ReliabilityConfig(
        source="highway", seeds=(3, 4), name="t2", runs_dir="elsewhere", overrides=["ppo.lr=1e-4"]
    )
    command = reliability_command(config)
    assert command == (
        "worldmodel bench reliability --preset tiny --source highway --seeds 2 --first-seed 3 --name t2"
        " --runs-dir elsewhere ppo.lr=1e-4"
    )
    args = build_parser().parse_args(command.split()[1:])
    assert (args.seeds, args.first_seed, args.name, args.runs_dir, args.overrides) == (
        2,
        3,
        "t2",
        "elsewhere",
        ["ppo.lr=1e-4"],
    )


def test_seeds_change_every_seed_and_never_reach_the_evaluation_tracks():
    assert seed_overrides(0) == ["collect.seed=0", "tokenizer.train.seed=0", "dynamics.train.seed=0", "ppo.seed=0"]
    assert seed_overrides(3)[0] == f"collect.seed={3 * SEED_STRIDE}"
    assert 99 * SEED_STRIDE + SEED_STRIDE <= 1_000_000  # the evaluation's first seed


@pytest.mark.slow
def test_real_ppo_trains_in_the_real_simulator_and_keeps_snapshots(box_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(box_run, run)  # its tokenizer reads 16x16 frames: CarRacing is drawn at that size here
    source = SourceConfig("carracing", frame_size=16)
    ppo = PPOConfig(num_envs=4, rollout_steps=4, epochs=1, minibatches=2, hidden=32)
    # three updates of 16 steps, a snapshot after each; minutes to spare on a slow machine, the steps end it
    real = RealPPOConfig(minutes=5.0, num_envs=2, snapshot_minutes=0.001, max_steps=50)
    figures = train_real_ppo(run, source, ppo, real, RunLogger(run))
    assert figures["rollout_steps"] == 8  # the dream's 4 x 4 steps an update, over 2 simulators
    assert figures["real_steps"] == 48  # the cap, in whole updates
    snapshots = json.loads((run / "real_ppo" / "snapshots.json").read_text())
    assert snapshots == figures["snapshots"] and len(snapshots) == 3
    assert snapshots[-1]["real_steps"] == figures["real_steps"]
    assert [s["wall_s"] for s in snapshots] == sorted(s["wall_s"] for s in snapshots)
    steps = [s["real_steps"] for s in snapshots]
    assert steps == sorted(set(steps))  # the end of training adds no second snapshot of its last update
    policy = load_policy(run / "real_ppo" / snapshots[-1]["checkpoint"])
    assert policy.config.grid_size == 4 and policy.config.action_dim == 3
    assert (run / "real_ppo" / f"{POLICY}-000.safetensors").is_file()


class Killed(Exception):
    """Stands for the process being killed."""


class KilledAtLog(RunLogger):
    """A logger whose `after`-th row never comes: the training dies just before it."""

    def __init__(self, run_dir, after: int):
        super().__init__(run_dir)
        self.left = after

    def log(self, metrics, step):
        self.left -= 1
        if self.left < 0:
            raise Killed
        super().log(metrics, step)


@pytest.mark.slow
def test_a_killed_real_ppo_resumes_at_its_last_snapshot_with_its_moments(box_run, tmp_path, monkeypatch):
    import agents.real_ppo
    from agents.policy import ActorCritic, PolicyConfig
    from worldmodel.checkpoint import load_module

    run = tmp_path / "run"
    shutil.copytree(box_run, run)
    folder = run / "real_ppo"
    source = SourceConfig("carracing", frame_size=16)
    ppo = PPOConfig(num_envs=4, rollout_steps=4, epochs=1, minibatches=2, hidden=32)
    # a snapshot after every update, 4 updates of 16 steps (the minutes to spare)
    real = RealPPOConfig(minutes=5.0, num_envs=2, snapshot_minutes=0.001, max_steps=64)
    with pytest.raises(Killed):  # killed in its third update, after two snapshots: the third's steps are lost
        train_real_ppo(run, source, ppo, real, KilledAtLog(run, after=2))
    snapshots = json.loads((folder / "snapshots.json").read_text())
    assert [s["real_steps"] for s in snapshots] == [16, 32]
    last = json.loads((folder / f"{POLICY}_last.json").read_text())
    assert not last["finished"] and last["snapshots"] == snapshots
    _, _, saved = load_module(folder / f"{POLICY}_last", POLICY, ActorCritic, PolicyConfig)

    other = RealPPOConfig(minutes=5.0, num_envs=2, snapshot_minutes=0.5, max_steps=64)
    with pytest.raises(ConfigError, match="training made with other real.snapshot_minutes"):
        train_real_ppo(run, source, ppo, other, RunLogger(run))
    assert json.loads((folder / "snapshots.json").read_text()) == snapshots  # refused before anything is touched

    started = {}
    optimise = agents.real_ppo.optimise

    def watched(envs, policy, config, logger, **kwargs):
        started["weights"] = {k: v.clone() for k, v in policy.state_dict().items()}
        moments = kwargs["optimizer"].state_dict()["state"]
        started["moments"] = {f"optim.{i}.{k}": v.clone() for i, m in moments.items() for k, v in m.items()}
        started["seed"], started["offset"] = config.seed, kwargs["step_offset"]
        return optimise(envs, policy, config, logger, **kwargs)

    monkeypatch.setattr(agents.real_ppo, "optimise", watched)
    figures = train_real_ppo(run, source, ppo, real, RunLogger(run))
    kept = load_policy(folder / snapshots[-1]["checkpoint"]).state_dict()
    assert all(torch.equal(started["weights"][k], kept[k]) for k in kept)  # from the last snapshot's weights
    assert started["moments"].keys() == {k for k in saved if k.startswith("optim.")}  # and its Adam's moments
    assert all(torch.equal(started["moments"][k].float(), saved[k].float()) for k in started["moments"])
    assert started["offset"] == 32 and started["seed"] == ppo.seed + agents.real_ppo.RESUME_SEED_STRIDE
    assert figures["resumed"] == [{"real_steps": 32, "wall_s": snapshots[-1]["wall_s"]}]
    after = json.loads((folder / "snapshots.json").read_text())
    assert after[:2] == snapshots and after == figures["snapshots"] and len(after) == 4
    assert [s["checkpoint"] for s in after] == [f"{POLICY}-{i:03d}" for i in range(len(after))]
    assert [s["real_steps"] for s in after] == [16, 32, 48, 64]  # the lost update is not
    assert [s["wall_s"] for s in after] == sorted(s["wall_s"] for s in after)  # counted; the clock goes on
    assert figures["real_steps"] == after[-1]["real_steps"]
    assert figures["steps_per_second"] == pytest.approx(after[-1]["real_steps"] / after[-1]["wall_s"])
    assert json.loads((folder / f"{POLICY}_last.json").read_text())["finished"]

    monkeypatch.setattr(agents.real_ppo, "optimise", lambda *a, **k: pytest.fail("trained again"))
    (folder / "snapshots.json").unlink()  # as if killed before its end was written: the figures stand
    assert train_real_ppo(run, source, ppo, real, RunLogger(run)) == figures
    assert json.loads((folder / "snapshots.json").read_text()) == after
    sidecar = folder / f"{POLICY}_last.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "finished": False}))  # killed past its budget
    assert train_real_ppo(run, source, ppo, real, RunLogger(run)) == figures  # nothing left to train
    assert json.loads(sidecar.read_text())["finished"] and load_policy(folder / f"{POLICY}_last")


def test_a_real_training_has_spent_its_budget_at_its_minutes_or_at_its_steps():
    def spent(last: dict, config: RealPPOConfig) -> bool:
        return budget_spent(last, config, step_cap(config, 16))  # updates of 16 steps

    last = {"real_steps": 64, "wall_s": 59.0}  # after 4 updates
    assert not spent(last, RealPPOConfig(minutes=1.0))
    assert spent({**last, "wall_s": 60.0}, RealPPOConfig(minutes=1.0))
    assert spent(last, RealPPOConfig(minutes=1.0, max_steps=64))
    assert spent(last, RealPPOConfig(minutes=1.0, max_steps=79))  # no whole update fits under the cap
    assert not spent(last, RealPPOConfig(minutes=1.0, max_steps=80))
    assert spent({"real_steps": 16, "wall_s": 1.0}, RealPPOConfig(max_steps=10))  # one update at least
    assert step_cap(RealPPOConfig(max_steps=79), 16) == 64 and step_cap(RealPPOConfig(), 16) is None


def test_the_real_ppo_flags_reach_its_config_and_only_its_commands(tmp_path):
    from pipeline.cli import _real_ppo, cmd_train

    parser = build_parser()
    args = parser.parse_args(["train", "policy", "--real", "--minutes", "2", "--max-steps", "500"])
    assert _real_ppo(args) == RealPPOConfig(minutes=2.0, max_steps=500)
    args = parser.parse_args(["bench", "baseline", "--run", "runs/x", "--max-steps", "64"])
    assert _real_ppo(args) == RealPPOConfig(max_steps=64)
    args = parser.parse_args(["train", "dynamics", f"run.runs_dir={tmp_path}", "--max-steps", "64"])
    with pytest.raises(ConfigError, match="--max-steps"):
        cmd_train(args)
    args = parser.parse_args(["train", "tokenizer", f"run.runs_dir={tmp_path}", "--real"])
    with pytest.raises(ConfigError, match="`train tokenizer` has no such mode"):
        cmd_train(args)
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_real_ppo_updates_on_as_many_steps_as_the_dreams_ppo_unless_told():
    dream = PPOConfig(num_envs=64, rollout_steps=32)
    assert RealPPOConfig(num_envs=8).steps_per_env(dream) == 256  # 8 x 256 = 64 x 32 steps an update
    assert RealPPOConfig(num_envs=3).steps_per_env(dream) == 683  # rounded: 2,049 steps, minibatches as large
    assert RealPPOConfig(num_envs=8, rollout_steps=32).steps_per_env(dream) == 32
    assert RealPPOConfig(num_envs=4096).steps_per_env(dream) == 1  # never none


def test_held_out_scores_are_kept_and_never_mixed_across_episode_counts(tmp_path, monkeypatch):
    import bench.scores
    from agents.evaluate import EvalConfig

    calls = []

    def fake_evaluate(run_dir, source, config, used, kinds, policy):
        calls.append((kinds, policy, config.episodes))
        return {kinds[0]: {"mean": float(len(calls)), "std": 0.0, "returns": [], "crashes": 0, "steps": 9}}

    monkeypatch.setattr(bench.scores, "evaluate", fake_evaluate)
    path = tmp_path / "scores.json"
    source = SourceConfig("highway")
    score = bench.scores.HeldOutScores(path, tmp_path, source, EvalConfig(episodes=5), [])
    assert score("a", tmp_path / "p")["mean"] == 1.0 and score("a")["mean"] == 1.0  # kept, not scored again
    assert score("b", kind="expert")["mean"] == 2.0 and calls[1][0] == ("expert",)
    assert "steps" not in json.loads(path.read_text())["a"]
    again = bench.scores.HeldOutScores(path, tmp_path, source, EvalConfig(episodes=5), [])
    assert again("a")["mean"] == 1.0 and len(calls) == 2  # a resumed bench reads the file
    other = bench.scores.HeldOutScores(path, tmp_path, source, EvalConfig(episodes=50), [])
    assert other("a")["mean"] == 3.0 and calls[-1][2] == 50  # scores over 5 episodes are not taken for 50


def test_real_ppo_never_overwrites_an_earlier_training_and_refuses_empty_budgets(box_run, tmp_path):
    shutil.copytree(box_run, tmp_path / "run")
    folder = tmp_path / "run" / "real_ppo"
    folder.mkdir(parents=True)
    (folder / "snapshots.json").write_text("[]")
    source, ppo = SourceConfig("carracing", frame_size=16), PPOConfig()
    with pytest.raises(ConfigError, match="earlier real-simulator training"):
        train_real_ppo(tmp_path / "run", source, ppo, RealPPOConfig(minutes=1.0), RunLogger(tmp_path))
    assert (folder / "snapshots.json").read_text() == "[]"
    bad_configs = (RealPPOConfig(minutes=-1.0), RealPPOConfig(snapshot_minutes=0.0), RealPPOConfig(num_envs=0))
    for bad in (*bad_configs, RealPPOConfig(rollout_steps=0), RealPPOConfig(max_steps=0)):
        with pytest.raises(ConfigError, match="positive minutes"):
            train_real_ppo(tmp_path / "other", source, ppo, bad, RunLogger(tmp_path))
    assert not (tmp_path / "other").exists()
    with pytest.raises(CheckpointError, match="tokenizer"):  # no tokenizer: no empty real_ppo folder left behind
        train_real_ppo(tmp_path / "other", source, ppo, RealPPOConfig(), RunLogger(tmp_path))
    assert not (tmp_path / "other").exists()


def test_baseline_checks_the_dataset_and_an_earlier_training_before_it_trains(tmp_path, monkeypatch):
    import bench.baseline

    run = tmp_path / "run"
    (run / "real_ppo").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"collect": {"source": {"name": "highway"}}}))
    (run / "summary.json").write_text("{}")
    monkeypatch.setattr(bench.baseline, "train_real_ppo", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(DatasetError):  # no dataset: refused before any training
        bench.baseline.bench_baseline(run, BaselineConfig(RealPPOConfig(minutes=5.0)))
    write_synthetic_dataset(run / "dataset", gym.spaces.Discrete(5), episodes=1, steps=3, size=16, channels=1)
    earlier = {"minutes": 29.7, "num_envs": 8, "rollout_steps": 256, "snapshots": []}
    (run / "real_ppo" / "training.json").write_text(json.dumps(earlier))
    with pytest.raises(ConfigError, match="minutes 29.7, not minutes 5.0"):  # another budget is not scored as this one
        bench.baseline.bench_baseline(run, BaselineConfig(RealPPOConfig(minutes=5.0)))
    # a training from before the flag took the dream's 32 steps per simulator: not scored as one on the dream's batch
    (run / "real_ppo" / "training.json").write_text(json.dumps({"minutes": 5.0, "num_envs": 8, "snapshots": []}))
    with pytest.raises(ConfigError, match="rollout_steps 32, not rollout_steps 256"):
        bench.baseline.bench_baseline(run, BaselineConfig(RealPPOConfig(minutes=5.0)))


def _finished_run(tmp_path, evaluated: int):
    """A finished run's folder as the baseline reads it: a loop of one round with a playoff, a trained baseline."""
    run = tmp_path / "run"
    (run / "real_ppo").mkdir(parents=True)
    config = {"collect": {"source": {"name": "highway"}}, "eval": {"episodes": evaluated}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    write_synthetic_dataset(run / "dataset", gym.spaces.Discrete(5), episodes=1, steps=3, size=16, channels=1)
    curve = [
        {"policy": 0, "wall_s": 60.0, "real_steps": 100, "round_steps": 20},
        {"policy": 1, "wall_s": 90.0, "real_steps": 120, "round_steps": 20},
    ]
    summary = {
        "timings_s": {"collect": 30.0, "policy": 30.0, "loop/02/collect": 40.0, "loop/playoff": 20.0, "evaluate": 9.0},
        "dataset": {"steps": 100},
        "loop": {"rounds": 1, "chosen": 1, "curve": curve, "playoff": {"seeds": [7, 8], "steps": 50}},
        "policy": {"real_return_mean": 20.0, "real_return_std": 1.0, "crashes": 2},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    snapshots = [  # the 17 minutes' first snapshot, and its last, past the budget
        {"checkpoint": "policy-000", "wall_s": 60.0, "real_steps": 512},
        {"checkpoint": "policy-001", "wall_s": 1025.0, "real_steps": 8704},
    ]
    training = {"minutes": 17.0, "num_envs": 8, "rollout_steps": 256, "real_steps": 8704, "steps_per_second": 8.5}
    (run / "real_ppo" / "training.json").write_text(json.dumps({**training, "snapshots": snapshots}))
    return run


@pytest.mark.parametrize("episodes", [None, 2])
def test_the_baseline_scores_the_kept_policy_on_the_tracks_of_every_other_row(tmp_path, monkeypatch, episodes):
    import bench.baseline
    import bench.scores

    # each policy's score says which policy and how many tracks: the kept one (the run's policy) scores 21 on 2
    def fake_evaluate(run_dir, source, config, used, kinds, policy):
        mean = {"policy": 21.0, "policy-000": 20.5}.get(policy.name, 10.0) + (0 if config.episodes == 2 else 100)
        return {"policy": {"mean": mean, "std": 0.0, "returns": [mean], "crashes": 0, "steps": 9}}

    monkeypatch.setattr(bench.scores, "evaluate", fake_evaluate)
    run = _finished_run(tmp_path, evaluated=5)
    figures = bench.baseline.bench_baseline(run, BaselineConfig(RealPPOConfig(minutes=17.0), episodes=episodes))
    kept = figures["dream_pipeline"]["curve"][-1]
    # the kept policy's real steps: the last policy's scoring round and the playoff's episodes included
    assert kept["policy"] == "kept" and kept["real_steps"] == 120 + 20 + 50
    if episodes is None:  # the run's own evaluation, on the same 5 tracks as the rest
        assert kept["mean"] == figures["dream_pipeline"]["score"] == 20.0 and kept["crashes"] == 2
        assert figures["time_ratio"] == {"value": 60.0 / 120.0, "bound": "<="}  # 120.5 on those 5 reaches it
    else:  # not the 5-track evaluation's 20.0, which the snapshot's 20.5 on 2 tracks would seem to pass
        assert kept["mean"] == figures["dream_pipeline"]["score"] == 21.0
        assert figures["time_ratio"] == {"value": 17 * 60 / 120.0, "bound": ">"}
    assert figures["eval_episodes"] == (episodes or 5)
