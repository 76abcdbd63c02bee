"""The learning-rate schedule every trained component uses: a linear warm-up, then constant or a cosine decay."""

import math

import pytest

from agents.config import load_pipeline_config
from worldmodel.config import ConfigError
from worldmodel.trainer import TrainConfig, lr_factor


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


def test_a_preset_takes_the_schedule_and_refuses_a_floor_outside_zero_to_one():
    config = load_pipeline_config("tiny", ["tokenizer.train.schedule=cosine", "tokenizer.train.min_lr_ratio=0.05"])
    assert config.tokenizer.train.schedule == "cosine" and config.tokenizer.train.min_lr_ratio == 0.05
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        load_pipeline_config("tiny", ["dynamics.train.min_lr_ratio=1.5"])
    with pytest.raises(ConfigError, match="schedule"):
        load_pipeline_config("tiny", ["tokenizer.train.schedule=linear"])
