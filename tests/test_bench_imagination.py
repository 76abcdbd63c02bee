import json
import math
import shutil

import pytest
import yaml

from bench.imagination import ImaginationBenchConfig, bench_imagination, run_source, step_flops
from pipeline.cli import main
from worldmodel.dynamics import DynamicsConfig


def cached_step_flops(config: DynamicsConfig) -> int:
    """Matmul FLOPs of one cached single-frame step of one environment, from the config alone."""
    d, block = config.d_model, config.block_size
    keys = config.context_frames * block  # the ring's context_frames - 1 blocks and the new one
    per_layer = 24 * block * d * d  # qkv 6, attention output 2, MLP 16 (per position, times d^2)
    per_layer += 4 * block * keys * d  # queries against keys, weights against values
    per_layer += 2 * d * d if config.action_every_layer else 0
    merge = 2 * config.positions_per_frame * config.patch**2 * d * d if config.patch > 1 else 0
    action = 0 if config.discrete_actions else 2 * config.action_dim * d
    token_head = 2 * config.positions_per_frame * d * config.patch**2 * config.vocab_size
    termination = 2 * d * d + 2 * d
    return merge + action + config.layers * per_layer + token_head + termination


def test_step_flops_count_the_attention(box_world):
    flops = step_flops(box_world)
    # the cached step's attention is two batched matmuls on the CPU; without them counted, the attention
    # term would be missing and this would not match
    assert flops["dynamics"] == cached_step_flops(box_world.dynamics.config)
    assert flops["latent"] > flops["dynamics"]  # the transition reward head's convolutions
    assert flops["decoder"] > 0 and flops["pixels"] == flops["latent"] + flops["decoder"]


def test_bench_imagination_writes_the_figures(box_run, tmp_path):
    out = tmp_path / "imagination.json"
    config = ImaginationBenchConfig(
        batch_sizes=(1, 3), seconds=0.05, rounds=2, real_envs=1, preset_shapes=("tiny",), matmul_size=64
    )
    figures = bench_imagination(box_run, config, out)
    written = json.loads(out.read_text())
    assert written["device"] == "cpu" and written["threads"] >= 1
    for key in ("real_steps_per_s", "real_recorded_steps_per_s"):
        assert math.isfinite(written[key]) and written[key] > 0
    for mode in ("latent", "pixels"):
        rates = written["dream_steps_per_s"][mode]
        assert set(rates) == {"1", "3"} and all(math.isfinite(v) and v > 0 for v in rates.values())
        # each speedup is the median of the rounds' own ratios (of two rounds: their mean)
        for key, real in (
            (f"speedup_{mode}_b3", "real_steps_per_s"),
            (f"speedup_{mode}_b3_vs_recorded", "real_recorded_steps_per_s"),
        ):
            ratios = [r["dream_steps_per_s"][mode]["3"] / r[real] for r in written["rounds"]]
            assert written[key] == pytest.approx(sum(ratios) / 2)
        flops = written["dream_flops_per_step"][mode]
        assert written["dream_gflops"][mode] == pytest.approx(flops * rates["3"] / 1e9)
        assert written["fraction_of_peak"][mode] == pytest.approx(
            written["dream_gflops"][mode] / written["matmul_peak_gflops"]["fp32"]
        )
    assert all(v > 0 for v in written["matmul_peak_gflops"].values())
    assert written["dream_settings"]["autoreset_mode"] == "SameStep"
    # the preset's shape on the run's tokenizer: the tiny preset's width, the run's 12-token vocabulary
    tiny = written["by_preset"]["tiny"]
    assert tiny["dynamics_config"]["d_model"] == 128 and written["dynamics_config"]["d_model"] == 32
    assert tiny["dynamics_config"]["vocab_size"] == written["dynamics_config"]["vocab_size"] == 12
    assert tiny["dream_flops_per_step"]["latent"] > written["dream_flops_per_step"]["latent"]
    assert all(v > 0 for v in tiny["dream_steps_per_s"]["pixels"].values())
    assert figures["dream_steps_per_s"] == written["dream_steps_per_s"]
    # the rates are the medians of the rounds (of two: their mean), and each round keeps its own ratio
    rounds = written["rounds"]
    assert len(rounds) == 2
    for key in ("real_steps_per_s", "real_recorded_steps_per_s"):
        assert written[key] == pytest.approx((rounds[0][key] + rounds[1][key]) / 2)
    for mode in ("latent", "pixels"):
        both = [r["dream_steps_per_s"][mode]["3"] for r in rounds]
        assert written["dream_steps_per_s"][mode]["3"] == pytest.approx(sum(both) / 2)
        for measured in rounds:
            ratio = measured["dream_steps_per_s"][mode]["3"] / measured["real_steps_per_s"]
            assert measured[f"speedup_{mode}_b3"] == pytest.approx(ratio)


def test_bench_imagination_command_prints_a_table(box_run, tmp_path, capsys):
    out = tmp_path / "imagination.json"
    args = ["--run", str(box_run), "--json", str(out), "--batch-sizes", "2", "--seconds", "0.01", "--real-envs", "0"]
    main(["bench", "imagination", *args, "--temperature", "1.0", "--top-k", "3"])
    printed = capsys.readouterr().out
    assert "latent" in printed and "pixels" in printed and "temperature 1.0, top-k 3" in printed
    written = json.loads(out.read_text())
    assert written["dream_settings"]["temperature"] == 1.0 and written["dream_settings"]["top_k"] == 3
    assert written["real_steps_per_s"] is None and written["speedup_latent_b2"] is None  # real simulator skipped
    assert written["dream_steps_per_s"]["latent"]["2"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "not a run folder"),
        (["--batch-sizes", "4,0"], "positive integers"),
        (["--rounds", "0"], "a positive integer"),
        (["--real-envs", "-2"], "an integer >= 0"),
        (["--seconds", "-1"], "a positive number"),
        (["--device", "foo"], "expected cpu, cuda"),
    ],
)
def test_bench_imagination_command_refuses_bad_input(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "imagination", "--run", str(tmp_path / "missing"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_highway_run_is_timed_against_highway_not_carracing(discrete_run, tmp_path):
    run = tmp_path / "highway-run"
    shutil.copytree(discrete_run, run)
    (run / "config.yaml").write_text(yaml.safe_dump({"collect": {"source": {"name": "highway"}}}))
    assert run_source(run).name == "highway" and run_source(tmp_path).name == "carracing"  # a run that says none
    config = ImaginationBenchConfig(batch_sizes=(2,), seconds=0.05, rounds=1, real_envs=1, matmul_size=64)
    figures = bench_imagination(run, config)
    assert figures["real_simulator"] == "highway-fast-v0" and figures["real_action_repeat"] == 1
    assert math.isfinite(figures["real_steps_per_s"]) and figures["real_steps_per_s"] > 0
