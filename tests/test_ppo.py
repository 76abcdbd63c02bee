import json
import math
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal

from agents.policy import (
    ActorCritic,
    PolicyConfig,
    TokenHistory,
    clipped_normal_log_prob,
    clipped_normal_mean,
    stack_history,
)
from agents.ppo import POLICY, PPOConfig, learn_from_episodes, train_ppo
from worldmodel.checkpoint import CheckpointError, load_module
from worldmodel.logger import RunLogger

SMALL = dict(num_envs=4, rollout_steps=8, total_steps=64, horizon=3, burn_in=2, epochs=2, minibatches=2, hidden=32)


def copy_run(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("which", ["box_run", "discrete_run"])
def test_train_ppo_writes_a_loadable_policy(which, request, tmp_path):
    run = copy_run(request.getfixturevalue(which), tmp_path)
    logger = RunLogger(run)
    figures = train_ppo(run, PPOConfig(**SMALL), logger)
    logger.close()
    assert figures["imagined_steps"] == 64  # two iterations of 4 envs x 8 steps
    assert figures["steps_per_second"] > 0
    # horizon 3 < 16 steps per env: episodes finished, so the dream return is a number
    assert math.isfinite(figures["dream_return"])

    policy, meta, _ = load_module(run / POLICY, POLICY, ActorCritic, PolicyConfig)
    assert meta["kind"] == "policy" and meta["imagined_steps"] == 64
    config = policy.config
    assert config.grid_size == 4 and config.levels == (4, 3) and config.hidden == 32
    assert config.discrete_actions == (which == "discrete_run")
    assert config.action_dim == (5 if which == "discrete_run" else 3)
    tokens = torch.randint(0, 12, (6, 4, 4))
    action, logp, entropy, value = policy.act(tokens)
    assert logp.shape == entropy.shape == value.shape == (6,)
    assert torch.isfinite(value).all()

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ppo_rows = [r for r in rows if "ppo/train/policy_loss" in r]
    assert [r["step"] for r in ppo_rows] == [32, 64]
    assert all(math.isfinite(r["ppo/train/value_loss"]) for r in ppo_rows)


def test_train_ppo_is_seeded(box_run, tmp_path):
    results = []
    for name in ("a", "b"):
        run = copy_run(box_run, tmp_path / name)
        train_ppo(run, PPOConfig(**SMALL), RunLogger(run))
        policy, _, _ = load_module(run / POLICY, POLICY, ActorCritic, PolicyConfig)
        results.append(policy.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key])


def test_a_fresh_policy_starts_at_the_set_spread_and_a_continued_one_keeps_its_own(box_run, tmp_path):
    run = copy_run(box_run, tmp_path)
    first = tmp_path / "first"
    train_ppo(run, PPOConfig(**SMALL, init_log_std=-1.5, lr=1e-9), RunLogger(run), out=first)
    policy, _, _ = load_module(first, POLICY, ActorCritic, PolicyConfig)
    assert policy.config.init_log_std == -1.5
    torch.testing.assert_close(policy.log_std.detach(), torch.full((3,), -1.5), atol=1e-4, rtol=0)

    # continued under another setting: the starting spread is not part of what must match, and is not reset
    second = tmp_path / "second"
    train_ppo(run, PPOConfig(**SMALL, init_log_std=-0.5, lr=1e-9), RunLogger(run), init=first, out=second)
    continued, _, _ = load_module(second, POLICY, ActorCritic, PolicyConfig)
    torch.testing.assert_close(continued.log_std.detach(), torch.full((3,), -1.5), atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match="this dream needs"):
        train_ppo(run, PPOConfig(**{**SMALL, "hidden": 16}), RunLogger(run), init=first, out=tmp_path / "third")


def test_train_ppo_dreams_in_bfloat16_when_asked(box_run, tmp_path, monkeypatch):
    import agents.ppo as ppo

    made = []

    class Recorded(ppo.DreamVectorEnv):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(ppo, "DreamVectorEnv", Recorded)
    run = copy_run(box_run, tmp_path)
    figures = train_ppo(run, PPOConfig(**SMALL, dtype="bfloat16"), RunLogger(run))
    assert figures["imagined_steps"] == 64 and math.isfinite(figures["dream_return"])
    assert next(made[0].model.dynamics.parameters()).dtype == torch.bfloat16
    policy, _, _ = load_module(run / POLICY, POLICY, ActorCritic, PolicyConfig)
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # the policy itself stays float32


def make_policy(discrete: bool, grid: int = 4) -> ActorCritic:
    torch.manual_seed(0)
    obs = gym.spaces.MultiDiscrete(np.full((grid, grid), 12))
    space = gym.spaces.Discrete(5) if discrete else gym.spaces.Box(-1, 1, (3,), np.float32)
    return ActorCritic.for_spaces(obs, space, (4, 3), hidden=32)


@pytest.mark.parametrize("grid", [4, 5, 8])
def test_actor_critic_continuous(grid):
    policy = make_policy(False, grid)
    assert not policy.config.discrete_actions and policy.config.action_dim == 3
    tokens = torch.randint(0, 12, (7, grid, grid))
    action, logp, entropy, value = policy.act(tokens)
    assert action.shape == (7, 3) and action.dtype == torch.float32
    assert logp.shape == entropy.shape == value.shape == (7,)
    dist = policy.distribution(policy.features(tokens))
    assert isinstance(dist, Normal)
    torch.testing.assert_close(logp, dist.log_prob(action).sum(-1))
    mean, *_ = policy.act(tokens, deterministic=True)
    torch.testing.assert_close(mean, dist.mean)
    # with a given action the log-prob is of that action
    given = torch.zeros(7, 3)
    _, logp_given, _, _ = policy.act(tokens, given)
    torch.testing.assert_close(logp_given, dist.log_prob(given).sum(-1))
    torch.testing.assert_close(policy.value(tokens), value)


def test_actor_critic_discrete():
    policy = make_policy(True)
    assert policy.config.discrete_actions and policy.config.action_dim == 5
    tokens = torch.randint(0, 12, (9, 4, 4))
    action, logp, entropy, value = policy.act(tokens)
    assert action.shape == (9,) and action.dtype == torch.int64
    assert ((action >= 0) & (action < 5)).all()
    dist = policy.distribution(policy.features(tokens))
    assert isinstance(dist, Categorical)
    torch.testing.assert_close(logp, dist.log_prob(action))
    greedy, *_ = policy.act(tokens, deterministic=True)
    assert torch.equal(greedy, dist.probs.argmax(-1))
    assert (entropy <= math.log(5) + 1e-5).all()


@pytest.mark.parametrize("discrete", [False, True])
def test_actor_critic_gradients(discrete):
    policy = make_policy(discrete)
    tokens = torch.randint(0, 12, (5, 4, 4))
    action = torch.randint(0, 5, (5,)) if discrete else torch.rand(5, 3)
    _, logp, entropy, value = policy.act(tokens, action)
    (logp.sum() + entropy.sum() + value.sum()).backward()
    assert policy.actor.weight.grad.abs().sum() > 0
    assert policy.critic.weight.grad.abs().sum() > 0
    assert policy.embedding.weight.grad.abs().sum() > 0
    if not discrete:
        assert policy.log_std.grad.abs().sum() > 0


def test_token_history_steps_as_stack_history_over_each_episode():
    # the plain path (a recorded episode's views, `stack_history`) and the stepping one (`TokenHistory`, as PPO and the
    # real simulator's driver see an episode) agree, episodes restarting at different steps in one batch
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7]
    episodes = [torch.randint(0, 12, (n, 4, 4), generator=g) for n in lengths]
    for frames in (1, 2, 3):
        stacked = [stack_history(e, frames) for e in episodes]
        assert stacked[0].shape == (5, frames, 4, 4)
        for e, views in zip(episodes, stacked, strict=True):
            for t in range(len(e)):  # each view ends at its own step and reaches back to the first frame, no further
                assert torch.equal(views[t, -1], e[t])
                assert torch.equal(views[t, 0], e[max(0, t - frames + 1)])
        history = TokenHistory(frames)
        step = [0, 0, 0]  # per row: which episode step its view is at; a finished row begins its episode again
        seen = history.start(torch.stack([e[0] for e in episodes]))
        for _ in range(12):
            for row in range(3):
                assert torch.equal(seen[row], stacked[row][step[row]])
            step = [(t + 1) % n for t, n in zip(step, lengths, strict=True)]
            grids = torch.stack([e[t] for e, t in zip(episodes, step, strict=True)])
            restarted = [row for row in range(3) if step[row] == 0]
            ahead = history.then(grids)
            seen = history.push(grids)
            assert torch.equal(ahead, seen)  # `then` is `push` without keeping it
            if restarted:
                seen = history.start(grids[restarted], np.array(restarted))
    with pytest.raises(ValueError, match="at least 1"):
        TokenHistory(0)


def test_a_policy_of_two_frames_sees_both_and_refuses_one():
    policy = ActorCritic.for_spaces(
        gym.spaces.MultiDiscrete(np.full((4, 4), 12)), gym.spaces.Discrete(5), (4, 3), hidden=32, frames=2
    )
    views = torch.randint(0, 12, (6, 2, 4, 4))
    older = views.clone()
    older[:, 0] = (older[:, 0] + 1) % 12  # the same current frame after another one
    assert not torch.allclose(policy.features(views), policy.features(older))
    with pytest.raises(ValueError, match=r"sees 2 token grid\(s\) a step: expected \(B, 2, h, w\)"):
        policy.act(views[:, 1])
    assert isinstance(policy.action_for(views[0], gym.spaces.Discrete(5)), int)
    # a one-frame policy takes a history of one as well as the bare grid, alike
    single = make_policy(True)
    grids = torch.randint(0, 12, (3, 4, 4))
    torch.testing.assert_close(single.features(grids), single.features(stack_history(grids, 1)))


def test_clipped_normal_mean_is_the_mean_of_the_executed_action():
    mean = torch.tensor([-0.2, 0.0, 0.5, 3.0, -0.05])
    std = torch.tensor([0.5, 0.1, 1.0, 0.3, 0.6])
    low, high = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    draws = mean + std * torch.randn(400_000, 5, generator=g)
    monte_carlo = torch.minimum(torch.maximum(draws, low), high).mean(0)
    torch.testing.assert_close(clipped_normal_mean(mean, std, low, high), monte_carlo, atol=3e-3, rtol=0)
    # a throttle whose mean sits just below 0: clip(mean) stands still, the trained policy drives
    assert clipped_normal_mean(mean, std, low, high)[4] > 0.2
    # an unbounded side adds nothing: with no bounds at all it is the plain mean
    inf = torch.tensor(float("inf"))
    torch.testing.assert_close(clipped_normal_mean(mean, std, -inf, inf), mean)
    # a narrow Gaussian well inside the bounds acts at its mean
    assert clipped_normal_mean(torch.tensor(0.3), torch.tensor(1e-4), torch.tensor(-1.0), torch.tensor(1.0)) == (
        pytest.approx(0.3, abs=1e-6)
    )


def test_clipped_normal_log_prob_is_the_probability_of_the_executed_action():
    mean = torch.tensor([-0.2, 0.9, 3.0, -0.05])
    std = torch.tensor([0.5, 0.3, 0.3, 0.6])
    low, high = torch.tensor([-1.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    dist = Normal(mean, std)
    g = torch.Generator().manual_seed(0)
    executed = torch.minimum(torch.maximum(mean + std * torch.randn(400_000, 4, generator=g), low), high)
    # on a bound: the share of the draws clipped to it
    for bound in (low, high):
        share = (executed == bound).float().mean(0)
        torch.testing.assert_close(clipped_normal_log_prob(dist, bound, low, high).exp(), share, atol=3e-3, rtol=0)
    # inside: the Gaussian's own density
    inside = torch.tensor([0.1, 0.5, 0.5, 0.2])
    torch.testing.assert_close(clipped_normal_log_prob(dist, inside, low, high), dist.log_prob(inside))
    # an unbounded side clips nothing, and a mean far past a bound still has a finite gradient
    inf = torch.tensor(float("inf"))
    torch.testing.assert_close(clipped_normal_log_prob(dist, inside, -inf, inf), dist.log_prob(inside))
    far = torch.tensor([9.0], requires_grad=True)
    logp = clipped_normal_log_prob(Normal(far, torch.tensor([0.05])), torch.tensor([1.0]), -inf, torch.tensor([1.0]))
    logp.sum().backward()
    assert logp.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(far.grad).all()


def test_learning_from_clipped_recorded_actions_stays_finite():
    # a throttle whose mean ran far past its bound with a narrow spread: every recorded throttle is the bound, whose
    # Gaussian density there is exp(-12,800); PPO's ratio of two such densities overflowed into NaN weights
    torch.manual_seed(0)
    space = gym.spaces.Box(np.array([-1.0, 0.0, 0.0], np.float32), np.ones(3, np.float32))
    policy = ActorCritic(PolicyConfig(grid_size=4, levels=(4, 3), action_dim=3, hidden=32))
    with torch.no_grad():
        policy.actor.bias.copy_(torch.tensor([0.0, 9.0, -9.0]))
        policy.log_std.fill_(-3.0)
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(8):
        actions = np.stack([rng.uniform(-0.5, 0.5, 6), np.ones(6), np.zeros(6)], 1).astype(np.float32)
        episodes.append(
            {
                "tokens": rng.integers(0, 12, (7, 4, 4)),
                "actions": actions,
                "rewards": rng.normal(size=6).astype(np.float32),
                "terminated": np.zeros(6, bool),
            }
        )
    config = PPOConfig(num_envs=8, rollout_steps=6, lr=3e-3, minibatches=4)
    figures = learn_from_episodes(policy, episodes, space, config, epochs=8)
    assert all(math.isfinite(v) for v in figures.values())
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_deterministic_action_within_bounds_uses_the_clipped_mean():
    torch.manual_seed(0)
    policy = ActorCritic(PolicyConfig(grid_size=4, levels=(4, 3), action_dim=3))
    tokens = torch.randint(0, 12, (5, 4, 4))
    low, high = torch.tensor([-1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])
    plain = policy.act(tokens, deterministic=True)[0]
    bounded = policy.act(tokens, deterministic=True, bounds=(low, high))[0]
    dist = policy.distribution(policy.features(tokens))
    torch.testing.assert_close(plain, dist.mean)
    torch.testing.assert_close(bounded, clipped_normal_mean(dist.mean, dist.stddev, low, high))
    assert (bounded[:, 1:] > 0).all()  # the initial policy (mean ~0, std 0.6) presses gas and brake a little
