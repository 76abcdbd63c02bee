import json
import shutil

import pytest
import torch
from torch import nn

from worldmodel.checkpoint import (
    CheckpointError,
    checkpoint_exists,
    clean_state_dict,
    config_matches,
    fingerprint,
    load_module,
    read_checkpoint,
    save_checkpoint,
)
from worldmodel.dynamics import DynamicsConfig, DynamicsModel
from worldmodel.tokenizer import Tokenizer, TokenizerConfig
from worldmodel.train import load_dynamics, load_tokenizer


def tiny_tokenizer(seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    return Tokenizer(TokenizerConfig(image_size=16, channels=3, widths=(8, 16), levels=(4, 3)))


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip(tmp_path):
    tokenizer = tiny_tokenizer()
    state = {"moment": torch.arange(4.0)}
    written = save_checkpoint(tmp_path / "tok", tokenizer, "tokenizer", {"step": 3}, state)
    assert written == tmp_path / "tok.safetensors" and written.is_file()
    meta = json.loads((tmp_path / "tok.json").read_text())
    assert meta["kind"] == "tokenizer" and meta["step"] == 3
    assert meta["config"]["widths"] == [8, 16]
    loaded, meta2, extra = load_module(tmp_path / "tok", "tokenizer", Tokenizer, TokenizerConfig)
    assert isinstance(loaded, Tokenizer)
    assert loaded.config == tokenizer.config
    assert meta2["step"] == 3
    assert torch.equal(extra["moment"], state["moment"])
    assert_same_weights(loaded, tokenizer)
    assert fingerprint(loaded) == fingerprint(tokenizer)
    assert fingerprint(tiny_tokenizer(seed=1)) != fingerprint(tokenizer)
    # no temporary files are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json", "tok.safetensors"]
    # load_tokenizer returns the model in eval mode
    again, _ = load_tokenizer(tmp_path / "tok")
    assert not again.training
    assert_same_weights(again, tokenizer)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, damage):
    save_checkpoint(tmp_path / "tok", tiny_tokenizer(), "tokenizer")
    weights = tmp_path / "tok.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00garbage" * 100)
    else:
        weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_tokenizer(tmp_path / "tok")
    assert str(weights) in str(info.value)


def test_corrupt_or_missing_sidecar(tmp_path):
    save_checkpoint(tmp_path / "tok", tiny_tokenizer(), "tokenizer")
    (tmp_path / "tok.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(tmp_path / "tok", "tokenizer")
    (tmp_path / "tok.json").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "tok", "tokenizer")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nothing", "tokenizer")


def test_wrong_kind(tmp_path):
    save_checkpoint(tmp_path / "tok", tiny_tokenizer(), "tokenizer")
    with pytest.raises(CheckpointError, match="expected 'dynamics'"):
        read_checkpoint(tmp_path / "tok", "dynamics")
    with pytest.raises(CheckpointError):
        load_dynamics(tmp_path / "tok")


def test_weights_that_do_not_match_the_config(tmp_path):
    save_checkpoint(tmp_path / "tok", tiny_tokenizer(), "tokenizer")
    meta = json.loads((tmp_path / "tok.json").read_text())
    meta["config"]["widths"] = [16, 16]
    (tmp_path / "tok.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        load_tokenizer(tmp_path / "tok")


def test_dynamics_with_another_tokenizer_fingerprint(tmp_path):
    torch.manual_seed(0)
    model = DynamicsModel(DynamicsConfig(vocab_size=12, tokens_per_frame=4, context_frames=2, d_model=16, heads=2))
    save_checkpoint(tmp_path / "dyn", model, "dynamics", {"tokenizer_fingerprint": "aaaa"})
    loaded, meta = load_dynamics(tmp_path / "dyn", "aaaa")
    assert not loaded.training
    assert_same_weights(loaded, model)
    loaded, _ = load_dynamics(tmp_path / "dyn")  # no fingerprint given: no check
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_dynamics(tmp_path / "dyn", "bbbb")


def test_dynamics_of_a_run_refuses_another_runs_tokenizer(box_run, tmp_path):
    tokenizer, _ = load_tokenizer(box_run / "tokenizer")
    load_dynamics(box_run / "dynamics", fingerprint(tokenizer))
    other = tiny_tokenizer(seed=5)
    with pytest.raises(CheckpointError, match="same run"):
        load_dynamics(box_run / "dynamics", fingerprint(other))
    # a run folder whose tokenizer was replaced cannot be loaded as a world model
    from worldmodel.world_model import WorldModel

    copy = tmp_path / "run"
    shutil.copytree(box_run, copy)
    torch.manual_seed(7)
    replaced = Tokenizer(tokenizer.config)
    save_checkpoint(copy / "tokenizer", replaced, "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer"):
        WorldModel.load(copy)


class _Compiled(nn.Module):
    """What torch.compile returns: a wrapper holding the real module as `_orig_mod`."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self._orig_mod = inner


def test_clean_state_dict_strips_orig_mod(tmp_path):
    tokenizer = tiny_tokenizer()
    wrapped = _Compiled(tokenizer)
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    cleaned = clean_state_dict(wrapped)
    assert cleaned.keys() == tokenizer.state_dict().keys()
    assert not any("_orig_mod" in k for k in cleaned)
    # also when the prefix sits in a nested submodule
    holder = nn.Module()
    holder.inner = _Compiled(nn.Linear(2, 2))
    assert set(clean_state_dict(holder)) == {"inner.weight", "inner.bias"}
    # a checkpoint saved from the wrapper loads into a plain module
    wrapped.config = tokenizer.config
    save_checkpoint(tmp_path / "tok", wrapped, "tokenizer")
    loaded, _ = load_tokenizer(tmp_path / "tok")
    assert_same_weights(loaded, tokenizer)
    assert fingerprint(wrapped) == fingerprint(tokenizer)


def test_an_older_checkpoint_without_newer_fields_still_matches_and_resumes(tmp_path):
    # a tokenizer saved before `image_width` and `vit_stem` existed: those fields count as their defaults
    from worldmodel.logger import RunLogger
    from worldmodel.trainer import TrainConfig, train

    tokenizer = tiny_tokenizer()
    save_checkpoint(tmp_path / "tok_last", tokenizer, "tokenizer", {"step": 1})
    sidecar = tmp_path / "tok_last.json"
    meta = json.loads(sidecar.read_text())
    for field in ("image_width", "vit_stem"):
        del meta["config"][field]
    sidecar.write_text(json.dumps(meta))
    assert config_matches(meta["config"], tokenizer.config)
    other = TokenizerConfig(image_size=16, channels=3, widths=(8, 16), levels=(4, 4))
    assert not config_matches(meta["config"], other)
    assert not config_matches({**meta["config"], "gone_field": 1}, tokenizer.config)
    assert not config_matches(None, tokenizer.config)
    frames = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, log_every=1, eval_every=100, checkpoint_every=100)
    train(tiny_tokenizer(), lambda step: {"frames": frames}, config, tmp_path / "tok", "tokenizer", RunLogger(tmp_path))
    assert json.loads((tmp_path / "tok.json").read_text())["step"] == 2  # resumed from step 1, not refused


def test_weights_without_their_sidecar_count_as_no_checkpoint_and_a_training_starts_afresh(tmp_path):
    # a kill between the two files of a training's first `_last` save leaves the weights alone: the stage must start
    # again, not stop at "tok_last.json not found" until someone deletes the file
    from worldmodel.logger import RunLogger
    from worldmodel.trainer import TrainConfig, train

    save_checkpoint(tmp_path / "tok_last", tiny_tokenizer(), "tokenizer", {"step": 1})
    assert checkpoint_exists(tmp_path / "tok_last")
    (tmp_path / "tok_last.json").unlink()
    assert not checkpoint_exists(tmp_path / "tok_last")
    frames = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    config = TrainConfig(steps=3, batch_size=2, warmup_steps=1, log_every=1, eval_every=100, checkpoint_every=100)
    figures = train(
        tiny_tokenizer(), lambda step: {"frames": frames}, config, tmp_path / "tok", "tokenizer", RunLogger(tmp_path)
    )
    assert figures["steps"] == 3 and json.loads((tmp_path / "tok_last.json").read_text())["step"] == 3
