"""MaskGIT-style refinement of imagined frames: the schedule, the sampler, the refiner's training and the dream env."""

import dataclasses

import numpy as np
import pytest
import torch

from bench.imagination import step_flops
from envs.dream import DreamVectorEnv
from worldmodel.dynamics import DynamicsConfig, DynamicsModel
from worldmodel.world_model import WorldModel, hidden_after, refine_tokens, sample_tokens


def test_schedule_shrinks_to_a_few_tokens_and_never_hides_more_than_before():
    for steps in (1, 2, 4, 8):
        hidden = [hidden_after(step, steps, 64) for step in range(1, steps + 1)]
        assert hidden == sorted(hidden, reverse=True)
        assert hidden[-1] > 0 and hidden[0] < 64
    assert hidden_after(1, 1, 64) == 45  # floor(64 cos(pi / 4))


def test_no_refinement_is_one_shot_sampling():
    logits = torch.randn(5, 16, 9)
    called = []
    tokens = refine_tokens(logits, lambda draft, known: called.append(1), steps=0)
    assert torch.equal(tokens, sample_tokens(logits)) and not called


def test_a_refiner_that_ignores_the_known_tokens_changes_nothing_when_greedy():
    logits = torch.randn(5, 16, 9)
    tokens = refine_tokens(logits, lambda draft, known: logits, steps=3)
    assert torch.equal(tokens, logits.argmax(-1))


def test_kept_tokens_stay_and_the_rest_are_redrawn():
    """A refiner that always prefers token 0 replaces exactly the tokens hidden in the first round: the most
    confident ones of the one-shot prediction are kept (and stay kept), the others become 0."""
    count, vocab, steps = 16, 9, 3
    logits = torch.randn(4, count, vocab)
    logits[..., 0] = -10.0  # the one-shot prediction never picks token 0
    prefer_zero = torch.full((4, count, vocab), -5.0)
    prefer_zero[..., 0] = 5.0
    seen_known = []

    def repredict(draft, known):
        seen_known.append(known.clone())
        return prefer_zero

    tokens = refine_tokens(logits, repredict, steps=steps)
    kept = count - hidden_after(1, steps, count)
    confidence = logits.log_softmax(-1).amax(-1)
    most_confident = confidence.argsort(-1, descending=True)[:, :kept]
    for row in range(4):
        expected = torch.zeros(count, dtype=torch.long)
        expected[most_confident[row]] = logits[row].argmax(-1)[most_confident[row]]
        assert torch.equal(tokens[row], expected)
    for before, after in zip(seen_known, seen_known[1:], strict=False):
        assert (after | ~before).all()  # a token once known stays known
    assert [int(k.sum(-1)[0]) for k in seen_known] == [count - hidden_after(s, steps, count) for s in (1, 2, 3)]


def _toy_model(refine_layers: int) -> DynamicsModel:
    torch.manual_seed(0)
    config = DynamicsConfig(
        vocab_size=8,
        tokens_per_frame=16,
        action_dim=2,
        context_frames=2,
        d_model=32,
        layers=1,
        heads=2,
        patch=2,
        reward_from="action",
        refine_layers=refine_layers,
    )
    return DynamicsModel(config)


def _toy_batch(batch: int, generator: torch.Generator):
    """Every next frame is one random token repeated: unpredictable from the past, but any one of its tokens
    tells the others."""
    first = torch.randint(0, 8, (batch, 1, 16), generator=generator)
    value = torch.randint(0, 8, (batch, 1, 1), generator=generator)
    tokens = torch.cat([first, value.expand(-1, -1, 16)], 1)
    return tokens, torch.zeros(batch, 1, 2), torch.zeros(batch, 1), torch.zeros(batch, 1)


def test_refined_frames_agree_with_themselves_where_one_shot_draws_do_not():
    """The point of refinement: at temperature 1 one-shot tokens are drawn independently, so a frame that must
    be one repeated token almost never is; refined draws condition on the tokens already decided."""
    model = _toy_model(refine_layers=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, figures = model.loss(*_toy_batch(64, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert {"refine_ce", "refine_accuracy"} <= set(figures)
    model.eval()
    tokens, actions, _, _ = _toy_batch(256, generator)
    with torch.no_grad():
        out = model(tokens[:, :1], actions)
        logits, hidden = out.logits[:, 0], out.hidden[:, 0]
        draw = torch.Generator().manual_seed(1)
        one_shot = sample_tokens(logits, temperature=1.0, generator=draw)
        refined = refine_tokens(
            logits, lambda draft, known: model.refine(hidden, draft, known), 4, temperature=1.0, generator=draw
        )

    def uniform(frames):
        return (frames == frames[:, :1]).all(-1).float().mean().item()

    assert uniform(one_shot) < 0.05
    assert uniform(refined) > 0.8


def test_a_model_without_refiner_trains_and_loads_as_before():
    model = _toy_model(refine_layers=0)
    assert model.refiner is None
    _, figures = model.loss(*_toy_batch(4, torch.Generator().manual_seed(0)))
    assert "refine_ce" not in figures
    tokens, actions, _, _ = _toy_batch(2, torch.Generator())
    out = model(tokens[:, :1], actions)
    with pytest.raises(ValueError, match="refine_layers"):
        model.refine(out.hidden, torch.zeros(2, 1, 16, dtype=torch.long), torch.zeros(2, 1, 16, dtype=torch.bool))


@pytest.fixture(scope="module")
def refined_world(box_world) -> WorldModel:
    """The box run's world model with an untrained dynamics model of the same shape plus a refiner."""
    config = dataclasses.replace(box_world.dynamics.config, refine_layers=1)
    torch.manual_seed(0)
    dynamics = DynamicsModel(config).eval()
    return WorldModel(box_world.tokenizer, dynamics, box_world.action_space, box_world.contexts, box_world.meta)


def test_dream_env_refines_reproducibly(refined_world):
    def rollout(refine_steps: int, temperature: float = 1.0) -> np.ndarray:
        env = DreamVectorEnv(refined_world, 3, burn_in=2, horizon=5, temperature=temperature, refine_steps=refine_steps)
        obs, _ = env.reset(seed=3)
        frames = [obs]
        for _ in range(4):
            obs, *_ = env.step(np.zeros((3, 3), np.float32))
            frames.append(obs)
        assert env.observation_space.contains(obs)
        return np.stack(frames)

    assert np.array_equal(rollout(2), rollout(2))
    # greedy, so any difference is the refiner's: its (untrained) logits are not the one-shot head's
    assert not np.array_equal(rollout(2, temperature=0.0), rollout(0, temperature=0.0))


def test_dream_env_refuses_refinement_without_a_refiner_or_bad_steps(box_world, refined_world):
    with pytest.raises(ValueError, match="refine_layers"):
        DreamVectorEnv(box_world, 2, burn_in=2, refine_steps=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="refine_steps"):
            DreamVectorEnv(refined_world, 2, burn_in=2, refine_steps=bad)


def test_each_refinement_round_costs_the_same_flops(refined_world):
    flops = [step_flops(refined_world, refine_steps)["latent"] for refine_steps in (0, 1, 2)]
    assert flops[1] > flops[0] and flops[2] - flops[1] == flops[1] - flops[0]


@pytest.mark.parametrize(
    ("target", "args", "message"),
    [
        ("dynamics", ["--refine-steps", "2"], "refine_layers > 0"),
        ("imagination", ["--refine-steps", "2", "--real-envs", "0"], "refine_layers > 0"),
        ("dynamics", ["--temperature", "-1"], "temperature must be"),
    ],
)
def test_benches_refuse_sampling_the_model_cannot_do(box_run, target, args, message, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", target, "--run", str(box_run), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
