"""The learning-rate schedule every trained component uses: a linear warm-up, then constant or a cosine decay."""

import json
import math
from dataclasses import replace

import pytest
import torch

from agents.config import load_pipeline_config
from worldmodel.checkpoint import save_checkpoint
from worldmodel.config import ConfigError
from worldmodel.logger import RunLogger
from worldmodel.tokenizer import Tokenizer, TokenizerConfig
from worldmodel.trainer import TrainConfig, lr_factor, train


def tiny_tokenizer() -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(TokenizerConfig(image_size=16, channels=3, widths=(8, 16), levels=(4, 3)))


def test_constant_is_the_warm_up_then_one():
    config = TrainConfig(steps=100, warmup_steps=4)
    assert [lr_factor(s, config) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(10_000, config) == 1.0  # past `steps` too (a wall-clock run may go on to `steps` only)
    assert lr_factor(0, TrainConfig(warmup_steps=0)) == 1.0


def test_cosine_warms_up_then_decays_to_its_floor_at_the_last_step():
    config = TrainConfig(steps=104, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    factors = [lr_factor(s, config) for s in range(3, 104)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))  # never rises after the warm-up
    assert lr_factor(53, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway
    assert lr_factor(103, config) == pytest.approx(0.1) and lr_factor(500, config) == pytest.approx(0.1)
    assert lr_factor(103, TrainConfig(steps=104, warmup_steps=4, schedule="cosine")) == pytest.approx(0.0)


def test_under_a_budget_the_cosine_follows_whichever_is_further_the_steps_or_the_clock():
    config = TrainConfig(steps=10_004, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1, max_minutes=2.0)
    assert lr_factor(10, config, seconds=0.0) == pytest.approx(lr_factor(10, replace(config, max_minutes=None)))
    assert lr_factor(10, config, seconds=60.0) == pytest.approx(0.1 + 0.9 * 0.5)  # half the budget: halfway down
    assert lr_factor(10, config, seconds=120.0) == pytest.approx(0.1)  # the budget spent: at the floor
    assert lr_factor(9_000, config, seconds=1.0) == lr_factor(9_000, replace(config, max_minutes=None))  # steps ahead
    assert lr_factor(10, replace(config, schedule="constant"), seconds=120.0) == 1.0  # the clock moves only the cosine


def test_a_resumed_run_gets_what_is_left_of_its_budget(tmp_path, capsys):
    # a `_last` written at step 5 after 90 s of a 1-minute budget: resumed, it takes one step and stops there
    tokenizer = tiny_tokenizer()
    save_checkpoint(tmp_path / "tok_last", tokenizer, "tokenizer", {"step": 5, "seconds": 90.0})
    frames = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    # a minute with the float noise run.time_scale leaves (1.1 x 6 is 6.6000000000000005) prints as '1-minute'
    config = TrainConfig(
        steps=1000,
        batch_size=2,
        warmup_steps=1,
        eval_every=100,
        checkpoint_every=100,
        max_minutes=1 + 1e-12,
    )
    logger = RunLogger(tmp_path)
    metrics = train(tokenizer, lambda step: {"frames": frames}, config, tmp_path / "tok", "tokenizer", logger)
    assert metrics["steps"] == 6  # what the summary prints: the clock, not `steps`, stopped it
    assert "tokenizer: stopping at step 6 after the 1-minute budget" in capsys.readouterr().out
    assert json.loads((tmp_path / "tok.json").read_text())["step"] == 6
    last = json.loads((tmp_path / "tok_last.json").read_text())
    assert last["step"] == 6 and last["seconds"] >= 90.0  # the clock goes on from where the earlier run left it


def test_a_kill_between_the_last_checkpoint_s_two_files_resumes_at_the_weights_step(tmp_path, capsys):
    frames = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    config = TrainConfig(steps=4, batch_size=2, warmup_steps=1, eval_every=100, checkpoint_every=2)
    logger, trained = RunLogger(tmp_path), []

    def run(steps: int) -> dict:
        batch = lambda step: trained.append(step) or {"frames": frames}  # noqa: E731
        return train(tiny_tokenizer(), batch, replace(config, steps=steps), tmp_path / "tok", "tokenizer", logger)

    sidecar = tmp_path / "tok_last.json"
    run(4)
    older = sidecar.read_text()  # the sidecar of step 4
    run(6)
    assert json.loads(sidecar.read_text())["step"] == 6
    sidecar.write_text(older)  # as if killed after the step-6 weights were written, before their sidecar
    capsys.readouterr()
    trained.clear()
    assert run(8)["steps"] == 8
    out = capsys.readouterr().out
    assert "its weights are of step 6, its .json of step 4" in out and "resuming tokenizer training from step 6" in out
    assert trained == [6, 7] and json.loads(sidecar.read_text())["step"] == 8  # steps 4 and 5 are not trained again
    # torn at the last step: nothing is left to train, so no save would mend the sidecar; the resume does
    sidecar.write_text(older)
    trained.clear()
    assert run(8)["steps"] == 8 and trained == []
    assert json.loads(sidecar.read_text())["step"] == 8


def test_a_preset_takes_the_schedule_and_refuses_a_floor_outside_zero_to_one():
    config = load_pipeline_config("tiny", ["tokenizer.train.schedule=cosine", "tokenizer.train.min_lr_ratio=0.05"])
    assert config.tokenizer.train.schedule == "cosine" and config.tokenizer.train.min_lr_ratio == 0.05
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        load_pipeline_config("tiny", ["dynamics.train.min_lr_ratio=1.5"])
    with pytest.raises(ConfigError, match="schedule"):
        load_pipeline_config("tiny", ["tokenizer.train.schedule=linear"])
