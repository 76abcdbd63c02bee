import dataclasses

import pytest
import torch

from worldmodel.dynamics import DynamicsConfig, DynamicsModel

ATOL = 1e-5


def make_model(discrete: bool = False, context: int = 3, layers: int = 2, seed: int = 0) -> DynamicsModel:
    torch.manual_seed(seed)
    config = DynamicsConfig(
        vocab_size=12,
        tokens_per_frame=4,
        action_dim=5 if discrete else 3,
        discrete_actions=discrete,
        context_frames=context,
        d_model=32,
        layers=layers,
        heads=2,
        reward_from="action",  # the reward head then shares the transformer, so the cache tests cover it too
    )
    return DynamicsModel(config).eval()


def make_inputs(model: DynamicsModel, batch: int, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    tokens = torch.randint(0, c.vocab_size, (batch, steps, c.tokens_per_frame), generator=g)
    if c.discrete_actions:
        actions = torch.randint(0, c.action_dim, (batch, steps), generator=g)
    else:
        actions = torch.rand(batch, steps, c.action_dim, generator=g) * 2 - 1
    return tokens, actions


def other_actions(actions: torch.Tensor, discrete: bool, steps: slice | int) -> torch.Tensor:
    """A copy of `actions` with the given steps replaced by different valid actions."""
    changed = actions.clone()
    if discrete:
        changed[:, steps] = (changed[:, steps] + 2) % 5
    else:
        changed[:, steps] = torch.tensor([1.0, -1.0, 0.5]) - changed[:, steps]
    return changed


def cached_rollout(model, tokens, actions, cache=None, rows=None):
    cache = cache if cache is not None else model.new_cache(tokens.shape[0])
    outs = [model(tokens[:, t : t + 1], actions[:, t : t + 1], cache, rows) for t in range(tokens.shape[1])]
    return (
        torch.cat([o.logits for o in outs], 1),
        torch.cat([o.reward for o in outs], 1),
        torch.cat([o.termination_logit for o in outs], 1),
    )


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize(("context", "steps"), [(3, 3), (3, 8), (4, 2), (2, 7), (1, 4)])
@torch.no_grad()
def test_kv_cache_matches_teacher_forcing(discrete, context, steps):
    model = make_model(discrete, context)
    tokens, actions = make_inputs(model, 3, steps)
    full = model(tokens, actions)
    assert full.logits.shape == (3, steps, 4, 12)
    assert full.reward.shape == full.termination_logit.shape == (3, steps)
    logits, reward, term = cached_rollout(model, tokens, actions)
    torch.testing.assert_close(logits, full.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(reward, full.reward, atol=ATOL, rtol=0)
    torch.testing.assert_close(term, full.termination_logit, atol=ATOL, rtol=0)


@torch.no_grad()
def test_context_window_limits_attention():
    """Beyond the window, a one-layer model's outputs for frame t depend only on frames t - C + 1 .. t."""
    model = make_model(context=3, layers=1)
    tokens, actions = make_inputs(model, 2, 7)
    full = model(tokens, actions)
    changed_tokens, changed_actions = tokens.clone(), actions.clone()
    changed_tokens[:, :2] = (changed_tokens[:, :2] + 1) % 12
    changed_actions[:, :2] = -changed_actions[:, :2]
    other = model(changed_tokens, changed_actions)
    # frames 4.. only see frames 2.. (context 3), so they are unaffected
    torch.testing.assert_close(other.logits[:, 4:], full.logits[:, 4:], atol=ATOL, rtol=0)
    assert not torch.allclose(other.logits[:, 2], full.logits[:, 2], atol=1e-4)


@pytest.mark.parametrize("discrete", [False, True])
@torch.no_grad()
def test_block_causal_mask_hides_the_future(discrete):
    model = make_model(discrete, context=4)
    tokens, actions = make_inputs(model, 2, 4)
    full = model(tokens, actions)
    t = 1
    future_tokens = tokens.clone()
    future_tokens[:, t + 1 :] = (future_tokens[:, t + 1 :] + 5) % 12
    future_actions = other_actions(actions, discrete, slice(t + 1, None))
    changed = model(future_tokens, future_actions)
    torch.testing.assert_close(changed.logits[:, : t + 1], full.logits[:, : t + 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(changed.reward[:, : t + 1], full.reward[:, : t + 1], atol=ATOL, rtol=0)
    assert not torch.allclose(changed.logits[:, t + 1 :], full.logits[:, t + 1 :], atol=1e-4)


@pytest.mark.parametrize("discrete", [False, True])
@torch.no_grad()
def test_action_of_frame_t_changes_its_predictions(discrete):
    model = make_model(discrete, context=4)
    tokens, actions = make_inputs(model, 2, 4)
    full = model(tokens, actions)
    t = 2
    changed = model(tokens, other_actions(actions, discrete, t))
    torch.testing.assert_close(changed.logits[:, :t], full.logits[:, :t], atol=ATOL, rtol=0)
    # the next-frame token logits (which see action t within the block) and the reward of step t change
    assert (changed.logits[:, t] - full.logits[:, t]).abs().max() > 1e-4
    assert (changed.reward[:, t] - full.reward[:, t]).abs().max() > 1e-5


@torch.no_grad()
def test_batch_rows_are_independent():
    model = make_model()
    tokens, actions = make_inputs(model, 3, 5)
    full = model(tokens, actions)
    single = model(tokens[1:2], actions[1:2])
    torch.testing.assert_close(single.logits, full.logits[1:2], atol=ATOL, rtol=0)


@pytest.mark.parametrize("discrete", [False, True])
@torch.no_grad()
def test_row_reset_equals_fresh_cache(discrete):
    model = make_model(discrete, context=3)
    tokens, actions = make_inputs(model, 4, 6, seed=3)
    cache = model.new_cache(4)
    cached_rollout(model, tokens[:, :4], actions[:, :4], cache)  # fill and wrap the ring

    rows = torch.tensor([0, 2])
    new_tokens, new_actions = make_inputs(model, 2, 5, seed=9)
    cache.reset_rows(rows)
    assert cache.position[rows].tolist() == [0, 0]
    assert cache.position[[1, 3]].tolist() == [4, 4]
    logits, reward, term = cached_rollout(model, new_tokens, new_actions, cache, rows)
    fresh_logits, fresh_reward, fresh_term = cached_rollout(model, new_tokens, new_actions)
    torch.testing.assert_close(logits, fresh_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(reward, fresh_reward, atol=ATOL, rtol=0)
    torch.testing.assert_close(term, fresh_term, atol=ATOL, rtol=0)
    expected = model(new_tokens, new_actions)
    torch.testing.assert_close(logits, expected.logits, atol=ATOL, rtol=0)

    # the rows that were not reset carry on as if nothing happened
    untouched = torch.tensor([1, 3])
    rest = [model(tokens[untouched, t : t + 1], actions[untouched, t : t + 1], cache, untouched) for t in (4, 5)]
    full = model(tokens[untouched], actions[untouched])
    torch.testing.assert_close(torch.cat([o.logits for o in rest], 1), full.logits[:, 4:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_takes_one_frame_at_a_time():
    model = make_model()
    tokens, actions = make_inputs(model, 2, 2)
    with pytest.raises(ValueError, match="one frame"):
        model(tokens, actions, model.new_cache(2))


def test_loss_and_gradients():
    for discrete in (False, True):
        model = make_model(discrete).train()
        tokens, actions = make_inputs(model, 2, 4)
        rewards = torch.randn(2, 3)
        terminated = torch.zeros(2, 3, dtype=torch.bool)
        loss, logs = model.forward_batch(
            {"tokens": tokens, "actions": actions[:, :3], "rewards": rewards, "terminated": terminated}
        )
        assert set(logs) >= {"loss", "token_ce", "reward_mse", "termination_bce", "token_accuracy"}
        assert 0 <= logs["token_accuracy"] <= 1
        loss.backward()
        assert model.token_embedding.weight.grad.abs().sum() > 0
        assert next(model.action_embedding.parameters()).grad.abs().sum() > 0


def test_config_validation():
    with pytest.raises(ValueError):
        DynamicsModel(DynamicsConfig(d_model=30, heads=4))
    with pytest.raises(ValueError):
        DynamicsModel(DynamicsConfig(d_model=36, heads=4))  # odd head width cannot be rotated


def test_transition_reward_reads_the_frames_not_the_action():
    import dataclasses

    torch.manual_seed(0)
    config = dataclasses.replace(make_model().config, reward_from="transition", tokens_per_frame=16)
    model = DynamicsModel(config).eval()
    assert model.reward_head is None
    tokens, actions = make_inputs(model, 2, 4)
    out = model(tokens[:, :-1], actions[:, :-1])
    assert out.reward is None
    reward = model.step_reward(out, tokens[:, :-1], tokens[:, 1:])
    assert reward.shape == (2, 3)
    other = model(tokens[:, :-1], other_actions(actions[:, :-1], False, slice(None)))
    torch.testing.assert_close(model.step_reward(other, tokens[:, :-1], tokens[:, 1:]), reward)
    # a different next frame does change it
    shifted = model.step_reward(out, tokens[:, :-1], torch.roll(tokens[:, 1:], 1, dims=-1))
    assert (shifted - reward).abs().max() > 1e-6
    # and the loss trains it
    model.train()
    loss, logs = model.loss(tokens, actions[:, :-1], torch.randn(2, 3), torch.zeros(2, 3))
    loss.backward()
    assert model.transition_reward.embedding.weight.grad.abs().sum() > 0
    assert logs["reward_mse"] > 0


@pytest.mark.parametrize("start", [10_000, 1_000_000])
@torch.no_grad()
def test_far_positions_predict_as_near_ones(start):
    """Attention sees only relative positions, so a dream a million frames in predicts as one just begun."""
    model = make_model(context=3)
    tokens, actions = make_inputs(model, 2, 5)
    near = cached_rollout(model, tokens, actions)
    cache = model.new_cache(2)
    cache.position += start
    far = cached_rollout(model, tokens, actions, cache)
    for a, b in zip(near, far, strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


@pytest.mark.parametrize("reward_from", ["action", "transition"])
@torch.no_grad()
def test_a_window_padded_past_its_end_has_the_loss_of_the_window_cut_there(reward_from):
    # the steps after the end are left out, and the causal attention keeps them from the steps before: the padded
    # window's loss and figures are those of its first 2 steps alone
    model = make_model(context=4)
    if reward_from == "transition":
        model = DynamicsModel(dataclasses.replace(model.config, reward_from="transition")).eval()
    tokens, actions = make_inputs(model, 1, 5)
    rewards, terminated = torch.tensor([[0.5, -1.0, 9.0, 9.0]]), torch.tensor([[False, True, True, True]])
    padded = {
        "tokens": tokens.clone(),
        "actions": actions[:, :-1].clone(),
        "rewards": rewards,
        "terminated": terminated,
    }
    padded["tokens"][:, 3:] = 7  # whatever stands after the end
    padded["valid"] = torch.tensor([[True, True, False, False]])
    loss, figures = model.forward_batch(padded)
    cut, cut_figures = model.loss(tokens[:, :3], actions[:, :2], rewards[:, :2], terminated[:, :2])
    torch.testing.assert_close(loss, cut)
    assert figures == pytest.approx(cut_figures)
    # and every step valid is the plain loss
    padded["valid"] = torch.ones(1, 4, dtype=torch.bool)
    plain, _ = model.loss(padded["tokens"], padded["actions"], rewards, terminated)
    torch.testing.assert_close(model.forward_batch(padded)[0], plain)
