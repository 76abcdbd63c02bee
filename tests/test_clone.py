"""The imitation baseline: the dream policy's network fitted to the scripted driver's recorded decisions."""

import shutil

import numpy as np
import pytest
import torch

from agents.clone import CloneConfig, train_clone
from agents.policy import ActorCritic, PolicyConfig, action_bounds
from agents.ppo import POLICY, load_policy
from bench.clone import bench_clone, format_markdown
from pipeline.cli import build_parser
from worldmodel.checkpoint import save_checkpoint
from worldmodel.config import ConfigError
from worldmodel.dataset import Dataset, DatasetError
from worldmodel.tokens import TokenizedDataset

FAST = CloneConfig(minutes=5.0, max_steps=200, batch_size=32, lr=1e-2, eval_every=20)  # the steps end it


def _run_with_labels(trained_run, tmp_path, label, frames: int = 2):
    """A copy of a trained run whose dataset (inside it, as `worldmodel run` keeps it) labels every step with
    `label(actions)`, and a fresh policy checkpoint of `frames` frames for the clone to copy the network of."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copytree(trained_run.parent / "dataset", run / "dataset")
    dataset = Dataset.open(run / "dataset")
    for index in range(len(dataset)):
        if label is not None:
            np.save(dataset.episode_dir(index) / "expert_actions.npy", label(dataset.load(index, mmap=False).actions))
    grids = TokenizedDataset.load(run / "tokens.npz").tokens
    space = dataset.action_space
    discrete = not hasattr(space, "low")
    config = PolicyConfig(
        grid_size=grids.shape[-1],
        levels=(4, 3),
        action_dim=int(space.n) if discrete else int(space.shape[0]),
        discrete_actions=discrete,
        frames=frames,
        hidden=32,
    )
    save_checkpoint(run / POLICY, ActorCritic(config), POLICY, {})
    return run, dataset


def test_a_clone_learns_the_recorded_decisions_not_the_executed_actions(discrete_run, tmp_path):
    # the executed actions are random; the scripted driver always chose 2
    run, _ = _run_with_labels(discrete_run, tmp_path, lambda actions: np.full_like(actions, 2))
    figures = train_clone(run, FAST, run / "clone" / "policy")
    assert figures["val_accuracy"] == 1.0 and figures["labelled_episodes"] == 4 and figures["unlabelled_episodes"] == 0
    assert figures["steps"] == 200  # the cap, well inside the minutes
    assert figures["train_steps"] + figures["val_steps"] == 4 * 12
    clone = load_policy(run / "clone" / "policy")  # a policy checkpoint, as evaluation loads it
    assert clone.config.frames == 2 and clone.config.discrete_actions
    grids = torch.as_tensor(TokenizedDataset.load(run / "tokens.npz").tokens[:6].astype(np.int64))
    action, *_ = clone.act(grids.view(3, 2, *grids.shape[1:]), deterministic=True)
    assert action.tolist() == [2, 2, 2]


def test_a_clone_of_continuous_decisions_acts_them_as_the_environment_clips_them(box_run, tmp_path):
    target = np.array([0.5, 0.8, 0.0], np.float32)  # the brake on its bound, as the scripted driver leaves it
    run, dataset = _run_with_labels(box_run, tmp_path, lambda actions: np.broadcast_to(target, actions.shape).copy())
    figures = train_clone(run, FAST, run / "clone" / "policy")
    assert max(figures["val_squared_error"]) < 0.01
    clone = load_policy(run / "clone" / "policy")
    grids = torch.as_tensor(TokenizedDataset.load(run / "tokens.npz").tokens[:2].astype(np.int64))
    action, *_ = clone.act(grids[None], deterministic=True, bounds=action_bounds(dataset.action_space))
    np.testing.assert_allclose(action[0].detach().numpy(), target, atol=0.1)


def test_a_dataset_without_decisions_is_refused_before_training(box_run, tmp_path):
    run, _ = _run_with_labels(box_run, tmp_path, None)
    with pytest.raises(ConfigError, match="max_steps"):
        train_clone(run, CloneConfig(max_steps=0), run / "clone" / "policy")
    with pytest.raises(DatasetError, match="expert_actions"):
        train_clone(run, FAST, run / "clone" / "policy")
    assert not (run / "clone").exists()


def _results(source: str, fit: dict) -> dict:
    row = {"mean": 22.4, "std": 3.1, "returns": [], "crashes": 3}
    return {
        "run": "runs/x",
        "source": source,
        "eval_episodes": 50,
        "clone": {"train_steps": 20_000, "labelled_episodes": 120, "unlabelled_episodes": 0, "steps": 900, **fit},
        "scores": {"clone": row, "dream policy": {**row, "mean": 21.0, "crashes": 1}, "scripted driver": row},
    }


def test_the_clone_table_counts_crashes_where_the_source_has_them():
    table = format_markdown(_results("highway", {"step": 400, "val_accuracy": 0.9071})).splitlines()
    assert table[2] == "| what | held-out return | crashes |"
    assert table[4:7] == [
        "| clone | 22.4 +- 3.1 | 3 |",
        "| dream policy | 21.0 +- 3.1 | 1 |",
        "| scripted driver | 22.4 +- 3.1 | 3 |",
    ]
    assert table[-1].endswith("at update 400: held-out accuracy 0.907.")
    carracing = format_markdown(_results("carracing", {"step": 1200, "val_squared_error": [0.118, 0.034, 0.007]}))
    assert "crashes" not in carracing and "| clone | 22.4 +- 3.1 |\n" in carracing
    assert carracing.endswith("held-out squared error per action part 0.118, 0.034, 0.007.")


def test_the_clone_command_refuses_a_budget_that_is_not_a_positive_number(capsys):
    parser = build_parser()
    args = parser.parse_args(["bench", "clone", "--run", "runs/x", "--minutes", "1.5"])
    assert (args.run, args.minutes, args.episodes) == ("runs/x", 1.5, None)
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "clone", "--run", "runs/x", "--minutes", bad])
        assert "expected a positive number" in capsys.readouterr().err


def test_a_kept_clone_is_scored_only_with_the_budget_it_was_fitted_with(discrete_run, tmp_path):
    run, _ = _run_with_labels(discrete_run, tmp_path, lambda actions: np.full_like(actions, 2))
    figures = train_clone(run, FAST, run / "clone" / "policy")
    assert figures["budget"] == {"minutes": 5.0, "max_steps": 200}
    kept = (run / "clone" / "policy.json").read_bytes()
    for other, asked in (
        (CloneConfig(minutes=5.0, max_steps=300), "not --minutes 5.0 and --max-steps 300"),
        (CloneConfig(minutes=3.0), "not --minutes 3.0 and no --max-steps"),
    ):
        with pytest.raises(ConfigError, match=f"holds a clone fitted with --minutes 5.0 and --max-steps 200, {asked}"):
            bench_clone(run, other)
    assert (run / "clone" / "policy.json").read_bytes() == kept  # refused before any work: the clone is as it was
    assert not (run / "clone" / "scores.json").exists()
