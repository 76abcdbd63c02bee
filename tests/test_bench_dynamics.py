import json

import numpy as np
import pytest

from bench.dynamics import DynamicsBenchConfig, bench_dynamics, frame_psnr, training_windows
from pipeline.cli import main
from worldmodel.world_model import Sampling


def test_frame_psnr_per_frame():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 255
    psnr = frame_psnr(a, b)
    assert psnr[0] == pytest.approx(100.0)  # identical frames hit the 1e-10 MSE floor
    assert psnr[1] == pytest.approx(0.0)


def test_teacher_forced_windows_stay_inside_their_episode():
    """A window of 6 steps needs 7 frames of one episode: a highway episode that crashed after 3 steps has none
    (it once read the next episode's frames, and past the last episode's end an IndexError)."""
    assert training_windows([3, 6, 13, 5], 6) == [(1, 0), (2, 0), (2, 6)]
    for episode, first in training_windows([3, 6, 13, 5], 6):
        assert first + 6 <= [3, 6, 13, 5][episode]
    assert training_windows([2, 5], 6) == []


def test_bench_dynamics_writes_the_figures(box_run, box_data, tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "psnr.png"
    figures = bench_dynamics(box_run, box_data, DynamicsBenchConfig(horizons=(1, 4, 16)), out, plot)
    written = json.loads(out.read_text())
    assert plot.stat().st_size > 0
    for key in (
        "token_accuracy",
        "token_cross_entropy",
        "reward_mae",
        "termination_precision",
        "termination_recall",
        "psnr_by_horizon",
        "action_faithfulness",
    ):
        assert key in written
    assert 0 <= written["token_accuracy"] <= 1
    psnr = written["psnr_by_horizon"]
    assert set(psnr) == {"model", "copy_last", "copy_last_decoded", "tokenizer"}
    # the synthetic episodes have 12 steps and the dream 2 context frames: horizon 16 does not fit
    assert psnr["model"]["1"] is not None and psnr["model"]["16"] is None
    assert written["rollouts_by_horizon"]["16"] == 0 and written["rollouts_by_horizon"]["1"] > 0
    # the baselines never look at the dream: a sampled dream changes the model's row, not theirs. Token
    # agreement over the few tokens of these frames is too coarse to tell two dreams apart (CI once saw
    # 0.125 both times), so the model's PSNR, a continuous figure of the decoded frames, is compared.
    hot = DynamicsBenchConfig(horizons=(1, 4, 16), sampling=Sampling(temperature=5.0))
    sampled = bench_dynamics(box_run, box_data, hot)
    for baseline in ("copy_last", "copy_last_decoded", "tokenizer"):
        assert sampled["psnr_by_horizon"][baseline] == figures["psnr_by_horizon"][baseline]
    assert sampled["psnr_by_horizon"]["model"]["1"] != figures["psnr_by_horizon"]["model"]["1"]
    assert "skipped" in written["action_faithfulness"]  # synthetic data: no simulator to restore states in
    # the held-out episode (the 4th of 4) ends terminated, and the windows cover every one of its steps
    assert written["terminations"] == 1 and written["windows"] == 4


def test_bench_command_reports_a_run_without_held_out_episodes(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "dynamics", "--run", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "not a run folder" in capsys.readouterr().err


def test_an_exported_model_is_refused_with_where_its_held_out_episodes_are(tmp_path):
    from envs.dream import SHIPPED_MODEL
    from worldmodel.dataset import DatasetError

    with pytest.raises(DatasetError, match="is an exported model .*bench the run folder it was exported from"):
        bench_dynamics(SHIPPED_MODEL, json_path=tmp_path / "fidelity.json")
    assert not (tmp_path / "fidelity.json").exists()
