import numpy as np
import pytest

from worldmodel.tokens import TokenizedDataset


def _tokenized(rewards_per_episode: list[list[float]], terminal: bool = False) -> TokenizedDataset:
    lengths = [len(r) for r in rewards_per_episode]
    steps = int(sum(lengths))
    return TokenizedDataset(
        tokens=np.zeros((steps + len(lengths), 2, 2), np.int16),
        actions=np.zeros((steps, 3), np.float32),
        rewards=np.concatenate([np.asarray(r, np.float32) for r in rewards_per_episode]),
        terminated=np.isin(np.arange(steps), np.cumsum(lengths) - 1) & terminal,
        frame_offsets=np.cumsum([0] + [n + 1 for n in lengths]),
        step_offsets=np.cumsum([0] + lengths),
        episode_ids=np.arange(len(lengths)),
        tokenizer_fingerprint="test",
    )


def test_smoothing_averages_within_each_episode_only():
    data = _tokenized([[0, 0, 3, 0, 0, 0], [-1, -1], [9]])
    smoothed = data.smoothed_rewards(3)
    # a burst is spread over its neighbours; the ends average over the steps that exist
    np.testing.assert_allclose(smoothed.rewards[:6], [0, 1, 1, 1, 0, 0], atol=1e-6)
    # a constant episode stays constant, and nothing leaks across the episode boundaries
    np.testing.assert_allclose(smoothed.rewards[6:8], [-1, -1])
    np.testing.assert_allclose(smoothed.rewards[8:], [9])
    np.testing.assert_array_equal(data.rewards[:6], [0, 0, 3, 0, 0, 0])  # the original is left alone


def test_smoothing_keeps_the_mean_of_a_long_episode_and_lowers_its_variance():
    rng = np.random.default_rng(0)
    bursts = np.where(rng.random(2000) < 0.2, 3.0, -0.4)
    data = _tokenized([bursts.tolist()])
    smoothed = data.smoothed_rewards(5).rewards
    assert abs(smoothed.mean() - bursts.mean()) < 0.01
    assert smoothed.var() < 0.4 * bursts.var()


def test_smoothing_of_one_step_is_the_identity_and_even_windows_are_refused():
    data = _tokenized([[1, 2, 3]])
    assert data.smoothed_rewards(1) is data
    with pytest.raises(ValueError, match="odd number"):
        data.smoothed_rewards(4)


def test_a_terminating_step_keeps_its_penalty_whole():
    data = _tokenized([[0, 0, 0, 0, -100], [3, 0, 0, 0, 0]], terminal=True)
    smoothed = data.smoothed_rewards(5).rewards
    assert smoothed[4] == -100  # CarRacing's penalty for leaving the playfield: not spread, not shrunk
    np.testing.assert_allclose(smoothed[:4], 0)  # and not leaked into the steps before it
    # the next episode (also ending terminated) smooths its first 4 steps only: the 3 is spread over 3, 4, 4 steps
    np.testing.assert_allclose(smoothed[5:9], [1, 0.75, 0.75, 0])


def test_foreseen_terminations_label_the_last_steps_of_terminated_episodes_only():
    data = _tokenized([[0] * 6, [0] * 2, [0] * 4], terminal=True)
    data.terminated[11] = False  # the third episode was cut off by a time limit: it keeps no label
    foreseen = data.foreseen_terminations(3).terminated
    np.testing.assert_array_equal(foreseen[:6], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(foreseen[6:8], [1, 1])  # an episode shorter than the lookahead: every step
    np.testing.assert_array_equal(foreseen[8:], [0, 0, 0, 0])
    assert data.terminated.sum() == 2  # the original is left alone
    np.testing.assert_array_equal(data.foreseen_terminations(3).rewards, data.rewards)


def test_a_lookahead_of_one_step_is_the_identity_and_zero_is_refused():
    data = _tokenized([[1, 2, 3]], terminal=True)
    assert data.foreseen_terminations(1) is data
    with pytest.raises(ValueError, match=">= 1"):
        data.foreseen_terminations(0)


def test_windows_past_the_end_pad_it_mark_it_and_hold_the_end_at_every_place():
    data = _tokenized([[0.0] * 3, [1.0] * 8], terminal=True)
    data.tokens[:, 0, 0] = np.arange(len(data.tokens))  # each frame says where it stands
    rng = np.random.default_rng(0)
    inside = data.sample(4, 2000, rng)
    assert "valid" not in inside and (inside["rewards"] == 1.0).all()  # the 3-step episode holds no 4-step window
    batch = data.sample(4, 2000, rng, past_end=True)
    frames, valid = batch["tokens"][:, :, 0, 0], batch["valid"]
    episode = (batch["rewards"][:, 0] == 1.0).astype(int)  # episode 1's rewards are 1
    first = frames[:, 0] - data.frame_offsets[episode]
    length = data.lengths[episode]
    np.testing.assert_array_equal(valid, first[:, None] + np.arange(4) < length[:, None])
    assert valid[:, 0].all()  # a window starts at one of its episode's steps, never past its end
    assert set(first[episode == 0]) == {0, 1, 2} and set(first[episode == 1]) == set(range(8))
    # the episode's own frames, then its last frame again; never a frame of another episode
    want = data.frame_offsets[episode][:, None] + np.minimum(first[:, None] + np.arange(5), length[:, None])
    np.testing.assert_array_equal(frames, want)
    # each end stands at every place of the window its episode reaches (the 3-step one's at the first three)
    ends = batch["terminated"] & valid
    assert (ends.sum(axis=1) <= 1).all()
    for e, places in ((0, {0, 1, 2}), (1, {0, 1, 2, 3})):
        assert set(np.argmax(ends[(episode == e) & ends.any(axis=1)], axis=1)) == places
