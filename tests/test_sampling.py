import pytest
import torch

from worldmodel.world_model import sample_tokens


def _logits() -> torch.Tensor:
    # 512 positions over 6 tokens, ranked 0 > 1 > 2 > ... everywhere, close enough that sampling spreads out
    return torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5]).expand(512, 6).clone()


def test_greedy_takes_the_most_likely_token():
    logits = torch.randn(4, 9, 7)
    assert torch.equal(sample_tokens(logits), logits.argmax(-1))
    assert torch.equal(sample_tokens(logits, temperature=2.0, top_k=1), logits.argmax(-1))


def test_temperature_sampling_spreads_and_top_k_restricts_it():
    g = torch.Generator().manual_seed(0)
    free = sample_tokens(_logits(), temperature=1.0, generator=g)
    assert set(free.unique().tolist()) == set(range(6))  # every token drawn at least once in 512 draws
    top = sample_tokens(_logits(), temperature=1.0, top_k=2, generator=g)
    assert set(top.unique().tolist()) == {0, 1}
    assert set(sample_tokens(_logits(), temperature=1.0, top_k=99, generator=g).unique().tolist()) == set(range(6))


def test_top_k_draws_among_exactly_k_tokens_when_logits_tie():
    tied = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, -5.0]).expand(2048, 6).clone()
    drawn = sample_tokens(tied, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert 0 in drawn and len(drawn.unique()) == 2  # the best and one of the four tied: never three tokens


def test_sampling_is_reproducible_with_a_seeded_generator():
    first = sample_tokens(_logits(), 1.5, 3, torch.Generator().manual_seed(7))
    second = sample_tokens(_logits(), 1.5, 3, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


@pytest.mark.parametrize(("temperature", "top_k", "message"), [(-1.0, None, "temperature"), (1.0, 0, "top_k")])
def test_bad_sampling_options_are_refused(temperature, top_k, message):
    with pytest.raises(ValueError, match=message):
        sample_tokens(_logits(), temperature, top_k)


@pytest.mark.parametrize("top_k", [None, 3])
def test_draws_follow_the_tempered_softmax(top_k):
    """Frequencies of 200,000 draws match the softmax at the temperature, renormalised over the top k."""
    logits = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5])
    draws = sample_tokens(logits.expand(200_000, 6), 2.0, top_k, torch.Generator().manual_seed(0))
    kept = logits if top_k is None else torch.where(torch.arange(6) < top_k, logits, float("-inf"))
    expected = torch.softmax(kept / 2.0, -1)
    frequencies = torch.bincount(draws, minlength=6).float() / len(draws)
    torch.testing.assert_close(frequencies, expected, atol=0.005, rtol=0)


def test_tokens_of_zero_probability_are_never_drawn():
    logits = torch.tensor([0.0, -float("inf"), 0.0, -float("inf")]).expand(10_000, 4)
    draws = sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) == {0, 2}
