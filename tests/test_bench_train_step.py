import json

import pytest
import torch

from bench.train_step import TrainStepBenchConfig, _models, bench_train_step, format_table, measure
from pipeline.cli import main
from worldmodel.config import ConfigError


def test_a_measured_step_trains_the_model_and_counts_forward_and_backward():
    """The timed step is the trainer's whole step: the weights move, and its FLOPs hold the backward pass (2 to 3
    times the forward's: the input's own gradient is not computed)."""
    torch.manual_seed(0)
    model, batch, _ = _models("tiny", torch.device("cpu"))["dynamics"]
    before = [p.detach().clone() for p in model.parameters()]
    figures = measure(model, batch, bf16=False, seconds=0.01, device=torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    forward = torch.utils.flop_counter.FlopCounterMode(display=False)
    with forward, torch.no_grad():
        model.forward_batch(batch())
    assert 2 < figures["flops_per_step"] / forward.get_total_flops() <= 3
    assert figures["steps_per_s"] > 0 and figures["ms_per_step"] == pytest.approx(1000 / figures["steps_per_s"])


def test_bench_train_step_writes_a_row_per_preset_component_and_dtype(tmp_path, capsys):
    path = tmp_path / "steps.json"
    main(
        [
            "bench",
            "train-step",
            "--presets",
            "tiny",
            "--dtypes",
            "float32,bfloat16",
            "--seconds",
            "0.01",
            "--device",
            "cpu",
            "--json",
            str(path),
        ]
    )
    figures = json.loads(path.read_text())
    cells = [(r["preset"], r["component"], r["dtype"]) for r in figures["rows"]]
    assert cells == [("tiny", c, d) for c in ("tokenizer", "dynamics") for d in ("float32", "bfloat16")]
    tokenizer, dynamics = figures["rows"][0], figures["rows"][2]
    assert tokenizer["frames_per_step"] == 8  # the tiny preset's tokenizer batch
    assert dynamics["frames_per_step"] == 32 * 6  # its dynamics batch of 32 windows of 6 frames
    assert format_table(figures) in capsys.readouterr().out


def test_bench_train_step_refuses_bad_settings_before_timing():
    with pytest.raises(ValueError, match="dtypes are float32 or bfloat16, got \\['float16'\\]"):
        bench_train_step(TrainStepBenchConfig(presets=("tiny",), dtypes=("float16",)))
    with pytest.raises(ConfigError, match="unknown preset 'nosuch'"):
        bench_train_step(TrainStepBenchConfig(presets=("tiny", "nosuch")))


def test_the_machine_time_scale_is_how_many_times_slower_the_preset_trains_here(monkeypatch):
    import bench.train_step
    from worldmodel.dynamics import DynamicsModel
    from worldmodel.tokenizer import Tokenizer

    timed = []

    def measure(model, batch, bf16, seconds, device):  # the timing itself is the test above's
        timed.append((type(model), bf16, seconds))
        return {"steps_per_s": {Tokenizer: 4.0, DynamicsModel: 2.5}[type(model)]}

    monkeypatch.setattr(bench.train_step, "measure", measure)
    measured = bench.train_step.machine_time_scale("tiny", (10.9, 5.4), seconds=2.0)
    assert timed == [(Tokenizer, False, 2.0), (DynamicsModel, False, 2.0)]  # the preset's two models, in float32
    assert measured == {"scale": 2.44, "rates": [4.0, 2.5], "reference": [10.9, 5.4]}  # (10.9/4 + 5.4/2.5) / 2
