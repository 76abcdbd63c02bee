import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

from envs.dream import DreamEnv, DreamVectorEnv, check_actions
from worldmodel.world_model import Sampling

BURN_IN = 2


def with_termination(world, always: bool, logit: float | None = None):
    """A copy of the world model whose termination head always (or never) fires, or says `logit` everywhere."""
    world = copy.deepcopy(world)
    last = world.dynamics.termination_head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(logit if logit is not None else 10.0 if always else -10.0)
    return world


@pytest.fixture(scope="module")
def never_ends(box_world):
    return with_termination(box_world, always=False)


@pytest.fixture(scope="module")
def always_ends(box_world):
    return with_termination(box_world, always=True)


def context_grids(world) -> set[bytes]:
    return {grid.astype(np.int64).tobytes() for grid in world.contexts.tokens}


def rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    trace = [np.array(obs, copy=True)]
    rewards = []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        trace.append(np.array(obs, copy=True))
        rewards.append(np.array(reward, copy=True))
    return np.stack(trace), np.stack(rewards)


@pytest.mark.parametrize("obs_mode", ["tokens", "pixels"])
def test_check_env_passes(never_ends, obs_mode):
    env = DreamEnv(never_ends, obs_mode=obs_mode, burn_in=BURN_IN, horizon=16)
    check_env(env, skip_render_check=True)


def test_check_env_passes_from_a_checkpoint_folder(box_run):
    env = DreamEnv(box_run, obs_mode="pixels", burn_in=BURN_IN, horizon=8)
    check_env(env.unwrapped, skip_render_check=True)


def test_spaces(box_world):
    env = DreamEnv(box_world, obs_mode="tokens", burn_in=BURN_IN)
    assert isinstance(env.observation_space, gym.spaces.MultiDiscrete)
    assert env.observation_space.shape == (4, 4)
    assert (env.observation_space.nvec == 12).all()
    assert isinstance(env.action_space, gym.spaces.Box) and env.action_space.shape == (3,)
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space and obs.dtype == np.int64
    pixels = DreamEnv(box_world, obs_mode="pixels", burn_in=BURN_IN, render_mode="rgb_array")
    assert pixels.observation_space == gym.spaces.Box(0, 255, (16, 16, 3), np.uint8)
    obs, _ = pixels.reset(seed=0)
    assert obs.shape == (16, 16, 3) and obs.dtype == np.uint8
    assert pixels.render().shape == (16, 16, 3)


def test_gym_make(box_run):
    env = gym.make("WorldModel/Dream-v0", checkpoint=box_run, burn_in=BURN_IN, horizon=5)
    assert isinstance(env.unwrapped, DreamEnv)
    obs, _ = env.reset(seed=3)
    assert obs in env.observation_space
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs in env.observation_space
    assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)
    env.close()


def test_gym_make_vec(box_run):
    envs = gym.make_vec("WorldModel/Dream-v0", num_envs=3, checkpoint=box_run, burn_in=BURN_IN, horizon=5)
    assert isinstance(envs, DreamVectorEnv)
    assert envs.num_envs == 3
    assert envs.single_observation_space.shape == (4, 4)
    assert envs.observation_space.shape == (3, 4, 4)
    assert envs.single_action_space.shape == (3,)
    assert envs.action_space.shape == (3, 3)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (3, 4, 4) and obs in envs.observation_space
    obs, rewards, terminated, truncated, _ = envs.step(envs.action_space.sample())
    assert obs in envs.observation_space
    assert rewards.shape == terminated.shape == truncated.shape == (3,)
    assert rewards.dtype == np.float32 and terminated.dtype == bool
    pixels = gym.make_vec("WorldModel/Dream-v0", num_envs=2, checkpoint=box_run, burn_in=BURN_IN, obs_mode="pixels")
    assert pixels.observation_space.shape == (2, 16, 16, 3)
    assert pixels.reset(seed=0)[0].shape == (2, 16, 16, 3)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_same_seed_same_rollout(box_world, temperature):
    actions = np.random.default_rng(0).uniform(-1, 1, size=(6, 3, 3)).astype(np.float32)
    runs = []
    for _ in range(2):
        envs = DreamVectorEnv(box_world, 3, burn_in=BURN_IN, horizon=4, temperature=temperature)
        runs.append(rollout(envs, 11, actions))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    # the same env reset with the same seed repeats itself too
    envs = DreamVectorEnv(box_world, 3, burn_in=BURN_IN, horizon=4, temperature=temperature)
    rollout(envs, 5, actions)
    again = rollout(envs, 11, actions)
    np.testing.assert_array_equal(again[0], runs[0][0])


def test_sampling_depends_on_the_seed(box_world):
    actions = np.zeros((3, 4, 3), np.float32)
    a = rollout(DreamVectorEnv(box_world, 4, burn_in=BURN_IN, horizon=10, temperature=5.0), 1, actions)[0]
    b = rollout(DreamVectorEnv(box_world, 4, burn_in=BURN_IN, horizon=10, temperature=5.0), 2, actions)[0]
    assert not np.array_equal(a[1:], b[1:])


def test_different_seeds_different_contexts(box_world):
    envs = DreamVectorEnv(box_world, 4, burn_in=BURN_IN)
    first = np.array(envs.reset(seed=0)[0], copy=True)
    second = np.array(envs.reset(seed=1)[0], copy=True)
    assert not np.array_equal(first, second)
    grids = context_grids(box_world)
    assert all(grid.tobytes() in grids for grid in np.concatenate([first, second]))
    single = DreamEnv(box_world, burn_in=BURN_IN)
    starts = {single.reset(seed=s)[0].tobytes() for s in range(6)}
    assert len(starts) > 1


BAD_BOX_ACTIONS = {
    "wrong batch": np.zeros((3, 3), np.float32),
    "wrong width": np.zeros((2, 2), np.float32),
    "flat": np.zeros(6, np.float32),
    "extra dim": np.zeros((2, 3, 1), np.float32),
    "strings": np.array([["a", "b", "c"]] * 2),
    "complex": np.zeros((2, 3), np.complex64),
    "bool": np.zeros((2, 3), bool),
    "object": np.array([[None] * 3] * 2, dtype=object),
    "nan": np.array([[0.0, np.nan, 0.0], [0.0, 0.0, 0.0]], np.float32),
    "inf": np.array([[0.0, 0.0, 0.0], [np.inf, 0.0, 0.0]], np.float32),
    "-inf": np.array([[0.0, 0.0, 0.0], [-np.inf, 0.0, 0.0]], np.float64),
}


@pytest.mark.parametrize("name", list(BAD_BOX_ACTIONS))
def test_bad_box_actions_raise(box_world, name):
    envs = DreamVectorEnv(box_world, 2, burn_in=BURN_IN)
    envs.reset(seed=0)
    with pytest.raises(ValueError, match="expected float actions of shape \\(2, 3\\)"):
        envs.step(BAD_BOX_ACTIONS[name])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_envs": 0}, "num_envs: expected an integer >= 1"),
        ({"num_envs": -1}, "num_envs: expected an integer >= 1"),
        ({"num_envs": True}, "num_envs: expected an integer >= 1"),
        ({"horizon": 0}, "horizon: expected an integer >= 1"),
        ({"horizon": 2.5}, "horizon: expected an integer >= 1"),
        ({"max_episode_steps": 0}, "max_episode_steps: expected None or an integer >= 1"),
        ({"burn_in": 2.5}, "burn_in: expected None or an integer"),
        ({"top_k": 2.5, "temperature": 1.0}, "top_k: expected None or an integer"),
        ({"temperature": "hot"}, "temperature: expected a number"),
        ({"start_fraction": 2}, "start_fraction: expected a fraction"),
        ({"sample_ends": "no"}, "sample_ends: expected True or False"),
        ({"render_mode": "human"}, "render_mode: expected None or one of"),
    ],
)
def test_settings_no_dream_could_run_with_are_refused_at_construction(box_world, kwargs, message):
    kwargs = {"num_envs": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        DreamVectorEnv(box_world, kwargs.pop("num_envs"), **kwargs)


@pytest.mark.parametrize("action", [np.zeros(2), np.zeros((1, 3)), "abc", np.array([0.0, np.nan, 0.0]), [0, 0j, 0]])
def test_bad_single_box_actions_raise(box_world, action):
    env = DreamEnv(box_world, burn_in=BURN_IN)
    env.reset(seed=0)
    # the single env's own shape, not the batch of one it steps inside
    with pytest.raises(ValueError, match=r"expected a float action of shape \(3,\) within \[-1\.0, 0\.0, 0\.0\]"):
        env.step(action)


def test_integer_box_actions_are_accepted(box_world):
    space = box_world.action_space
    out = check_actions(np.array([[1, 0, 1]]), space, 1)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1.0, 0.0, 1.0]])


def test_out_of_bounds_box_actions_are_clipped(never_ends):
    wild = np.array([[5.0, -3.0, 2.0], [-9.0, 0.5, -1.0]], np.float32)
    clipped = np.array([[1.0, 0.0, 1.0], [-1.0, 0.5, 0.0]], np.float32)
    np.testing.assert_array_equal(check_actions(wild, never_ends.action_space, 2), clipped)
    a = rollout(DreamVectorEnv(never_ends, 2, burn_in=BURN_IN), 4, [wild, wild])
    b = rollout(DreamVectorEnv(never_ends, 2, burn_in=BURN_IN), 4, [clipped, clipped])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # and in the single env: a wild action steps exactly as its clipped value
    stepped = []
    for action in ([100.0, 100.0, -100.0], [1.0, 1.0, 0.0]):
        single = DreamEnv(never_ends, burn_in=BURN_IN)
        single.reset(seed=0)
        stepped.append([single.step(np.array(action))[:2] for _ in range(3)])
    for (obs_wild, reward_wild), (obs_clipped, reward_clipped) in zip(*stepped, strict=True):
        np.testing.assert_array_equal(obs_wild, obs_clipped)
        assert reward_wild == reward_clipped


def test_truncation_at_horizon(never_ends):
    env = DreamEnv(never_ends, burn_in=BURN_IN, horizon=3)
    env.reset(seed=0)
    flags = [env.step(np.zeros(3, np.float32))[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    envs = DreamVectorEnv(never_ends, 2, burn_in=BURN_IN, horizon=2)
    envs.reset(seed=0)
    assert not envs.step(np.zeros((2, 3), np.float32))[3].any()
    assert envs.step(np.zeros((2, 3), np.float32))[3].all()
    # max_episode_steps overrides horizon
    env = DreamEnv(never_ends, burn_in=BURN_IN, horizon=50, max_episode_steps=1)
    env.reset(seed=0)
    assert env.step(np.zeros(3, np.float32))[3] is True


def test_termination_from_the_model(always_ends):
    env = DreamEnv(always_ends, burn_in=BURN_IN, horizon=10)
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step(np.zeros(3, np.float32))
    assert terminated is True and truncated is False


def test_sampled_ends_end_dreams_with_the_heads_probability(box_world):
    """A head that says 30% everywhere never ends a dream at the one-half threshold; with `sample_ends` it ends
    about 30% of the steps (each restarts in the same step), the same ones again for the same seed."""
    risky = with_termination(box_world, always=False, logit=float(np.log(0.3 / 0.7)))
    actions = np.zeros((64, 3), np.float32)

    def ends(sample_ends: bool, seed: int) -> np.ndarray:
        envs = DreamVectorEnv(
            risky, 64, burn_in=BURN_IN, horizon=100, sample_ends=sample_ends, autoreset_mode=AutoresetMode.SAME_STEP
        )
        envs.reset(seed=seed)
        return np.stack([envs.step(actions)[2] for _ in range(5)])

    assert not ends(False, 0).any()
    # the step's prediction carries the head's probability itself, whether the end is drawn or thresholded
    tokens = torch.as_tensor(risky.contexts.tokens[:4]).long()
    for sampling in (Sampling(), Sampling(sample_ends=True)):
        prediction = risky.imagine(risky.dynamics.new_cache(4), tokens, torch.zeros(4, 3), sampling=sampling)
        np.testing.assert_allclose(prediction.end_probability.numpy(), 0.3, rtol=1e-5)
    sampled = ends(True, 0)
    assert 0.2 < sampled.mean() < 0.4  # 320 draws at p = 0.3: a standard deviation of 0.026
    np.testing.assert_array_equal(sampled, ends(True, 0))
    assert not np.array_equal(sampled, ends(True, 1))


def test_next_step_autoreset(never_ends):
    envs = DreamVectorEnv(never_ends, 3, burn_in=BURN_IN, horizon=2)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    grids = context_grids(never_ends)
    zeros = np.zeros((3, 3), np.float32)
    envs.reset(seed=0)
    _, r1, _, trunc1, _ = envs.step(zeros)
    obs2, r2, _, trunc2, _ = envs.step(zeros)
    assert not trunc1.any() and trunc2.all()
    assert (r1 != 0).all() and (r2 != 0).all()
    obs3, r3, term3, trunc3, _ = envs.step(zeros)
    # the step after a done only resets: reset observation, zero reward, no flags
    assert (r3 == 0).all() and not term3.any() and not trunc3.any()
    assert all(grid.tobytes() in grids for grid in obs3)
    obs4, r4, _, trunc4, _ = envs.step(zeros)
    assert (r4 != 0).all() and not trunc4.any()
    assert envs.step(zeros)[3].all()


def test_next_step_autoreset_of_one_row(never_ends):
    envs = DreamVectorEnv(never_ends, 3, burn_in=BURN_IN, horizon=3)
    zeros = np.zeros((3, 3), np.float32)
    envs.reset(seed=0)
    envs.step(zeros)
    envs._steps[1] = 2  # row 1 reaches the horizon one step early
    _, _, _, truncated, _ = envs.step(zeros)
    assert truncated.tolist() == [False, True, False]
    _, rewards, _, truncated, _ = envs.step(zeros)
    assert rewards[1] == 0 and rewards[0] != 0 and rewards[2] != 0
    assert truncated.tolist() == [True, False, True]


def test_next_step_partial_reset_matches_undisturbed_rows(never_ends):
    """Rows that are not reset evolve exactly as in an env where no row is ever reset."""
    actions = np.random.default_rng(1).uniform(-1, 1, size=(5, 3, 3)).astype(np.float32)
    reference = rollout(DreamVectorEnv(never_ends, 3, burn_in=BURN_IN, horizon=100), 8, actions)
    envs = DreamVectorEnv(never_ends, 3, burn_in=BURN_IN, horizon=100)
    obs, _ = envs.reset(seed=8)
    trace = [np.array(obs, copy=True)]
    for t, action in enumerate(actions):
        if t == 1:
            envs._steps[1] = 99
        obs, *_ = envs.step(action)
        trace.append(np.array(obs, copy=True))
    trace = np.stack(trace)
    np.testing.assert_array_equal(trace[:, [0, 2]], reference[0][:, [0, 2]])


@pytest.mark.parametrize("obs_mode", ["tokens", "pixels"])
def test_same_step_autoreset_gives_final_obs(never_ends, obs_mode):
    self_check_same_step(never_ends, obs_mode)


def self_check_same_step(world, obs_mode):
    actions = np.zeros((2, 3), np.float32)
    reference = DreamVectorEnv(world, 2, obs_mode=obs_mode, burn_in=BURN_IN, horizon=1)
    reference.reset(seed=2)
    predicted = np.array(reference.step(actions)[0], copy=True)  # NEXT_STEP: the final obs itself

    envs = DreamVectorEnv(world, 2, obs_mode=obs_mode, burn_in=BURN_IN, horizon=1, autoreset_mode="SameStep")
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    envs.reset(seed=2)
    obs, rewards, terminated, truncated, info = envs.step(actions)
    assert truncated.all() and (rewards != 0).all()
    assert "final_obs" in info and info["_final_obs"].all()
    assert info["final_obs"].dtype == object and info["final_obs"].shape == (2,)  # Gymnasium 1.x layout
    final = np.stack(info["final_obs"])
    np.testing.assert_array_equal(final, predicted)
    assert not np.array_equal(obs, final)  # obs is already the next episode's start
    # no pending reset: the following step is a real step
    _, rewards, _, truncated, info = envs.step(actions)
    assert (rewards != 0).all() and truncated.all()


@pytest.mark.parametrize("obs_mode", ["tokens", "pixels"])
def test_same_step_autoreset_of_some_envs_observes_each_once(never_ends, obs_mode):
    """Only the restarted dreams are observed again: the others' observations are the step's, the restarted
    ones' their new start, and the final observation is the one before the restart."""
    actions = np.zeros((3, 3), np.float32)
    reference = DreamVectorEnv(never_ends, 3, obs_mode=obs_mode, burn_in=BURN_IN, horizon=5)
    reference.reset(seed=4)
    predicted = np.array(reference.step(actions)[0], copy=True)
    envs = DreamVectorEnv(never_ends, 3, obs_mode=obs_mode, burn_in=BURN_IN, horizon=5, autoreset_mode="SameStep")
    envs.reset(seed=4)
    envs._steps[1] = 4  # env 1 reaches the horizon on this step
    obs, _, _, truncated, info = envs.step(actions)
    assert truncated.tolist() == [False, True, False]
    np.testing.assert_array_equal(obs[[0, 2]], predicted[[0, 2]])
    np.testing.assert_array_equal(info["final_obs"][1], predicted[1])
    assert info["final_obs"][0] is None and info["final_obs"][2] is None
    np.testing.assert_array_equal(obs, envs._observe())  # the restarted env shows its new start


def test_returned_observations_are_not_mutated_later(never_ends):
    """Observations must not be views of the env's internal token buffer (which is written in place)."""
    env = DreamEnv(never_ends, burn_in=BURN_IN)
    obs, _ = env.reset(seed=0)
    kept = obs.copy()
    for seed in range(1, 4):
        env.reset(seed=seed)
    np.testing.assert_array_equal(obs, kept)
    envs = DreamVectorEnv(never_ends, 3, burn_in=BURN_IN, horizon=3)
    obs, _ = envs.reset(seed=0)
    kept = obs.copy()
    envs._steps[1] = 2
    step_obs = envs.step(np.zeros((3, 3), np.float32))[0]  # row 1 truncates
    step_kept = step_obs.copy()
    envs.step(np.zeros((3, 3), np.float32))  # partial step: rows 0 and 2 advance, row 1 resets
    envs.reset(seed=5)
    np.testing.assert_array_equal(obs, kept)
    np.testing.assert_array_equal(step_obs, step_kept)


def test_single_env_returns_the_final_frame_when_done(never_ends):
    actions = [np.full(3, 0.3, np.float32)] * 2
    short = rollout(DreamEnv(never_ends, obs_mode="pixels", burn_in=BURN_IN, horizon=2), 7, actions)[0]
    long = rollout(DreamEnv(never_ends, obs_mode="pixels", burn_in=BURN_IN, horizon=20), 7, actions)[0]
    np.testing.assert_array_equal(short, long)


def test_single_env_matches_vector_env(never_ends):
    actions = np.random.default_rng(3).uniform(-1, 1, size=(4, 3)).astype(np.float32)
    single = rollout(DreamEnv(never_ends, burn_in=BURN_IN, horizon=50), 5, list(actions))
    vector = rollout(DreamVectorEnv(never_ends, 1, burn_in=BURN_IN, horizon=50), 5, list(actions[:, None]))
    np.testing.assert_array_equal(single[0], vector[0][:, 0])
    np.testing.assert_allclose(single[1], vector[1][:, 0], rtol=1e-6)


def test_invalid_arguments(box_world):
    with pytest.raises(ValueError, match="burn_in"):
        DreamVectorEnv(box_world, 2, burn_in=4)  # the tiny model has 3 context frames
    with pytest.raises(ValueError, match="burn_in"):
        DreamVectorEnv(box_world, 2, burn_in=0)
    with pytest.raises(ValueError, match="obs_mode"):
        DreamVectorEnv(box_world, 2, obs_mode="latents", burn_in=BURN_IN)


# --- discrete actions ------------------------------------------------------------------------------------------


def test_discrete_dream_check_env(discrete_world):
    env = DreamEnv(discrete_world, burn_in=3, horizon=8)
    assert env.action_space == gym.spaces.Discrete(5)
    check_env(DreamEnv(discrete_world, obs_mode="pixels", burn_in=3, horizon=8), skip_render_check=True)
    obs, _ = env.reset(seed=0)
    for action in (0, 4, np.int64(2), np.int32(1)):
        obs, reward, terminated, truncated, _ = env.step(action)
        assert obs in env.observation_space
        if terminated or truncated:  # the untrained head ends some dreams
            env.reset()
    pixels = DreamEnv(discrete_world, obs_mode="pixels", burn_in=3)
    assert pixels.reset(seed=0)[0].shape == (16, 16, 1)


def test_discrete_dream_make_vec(discrete_run):
    envs = gym.make_vec("WorldModel/Dream-v0", num_envs=3, checkpoint=discrete_run, burn_in=2)
    assert envs.action_space == gym.spaces.MultiDiscrete([5, 5, 5])
    envs.reset(seed=0)
    obs, rewards, *_ = envs.step(np.array([0, 3, 4]))
    assert obs.shape == (3, 4, 4) and rewards.shape == (3,)
    a = rollout(envs, 1, [np.array([1, 2, 3])] * 3)
    b = rollout(envs, 1, [np.array([1, 2, 3])] * 3)
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize(
    "actions",
    [
        np.array([1.0, 2.0, 0.0]),  # floats
        np.array([1.5, 2.0, 0.0]),
        np.array([5, 0, 0]),  # out of range
        np.array([0, -1, 0]),
        np.array([[1], [2], [3]]),  # wrong shape
        np.array([1, 2]),
        np.array(["1", "2", "3"]),
        np.array([True, False, True]),
    ],
)
def test_bad_discrete_vector_actions(discrete_world, actions):
    envs = DreamVectorEnv(discrete_world, 3, burn_in=2)
    envs.reset(seed=0)
    with pytest.raises(ValueError, match="integer action"):
        envs.step(actions)


@pytest.mark.parametrize("action", [1.0, 2.5, 5, -1, np.array([1]), "2", None])
def test_bad_discrete_single_actions(discrete_world, action):
    env = DreamEnv(discrete_world, burn_in=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected one integer action in \[0, 5\)"):
        env.step(action)


def test_dreams_from_episode_starts_begin_at_the_first_frame_with_no_context(never_ends):
    world = never_ends
    first_frames = {world.contexts.tokens[o].astype(np.int64).tobytes() for o in world.contexts.frame_offsets[:-1]}
    env = DreamVectorEnv(world, num_envs=6, burn_in=3, horizon=4, start_fraction=1.0)
    obs, _ = env.reset(seed=3)
    assert all(grid.astype(np.int64).tobytes() in first_frames for grid in obs)
    assert not env._cache.valid.any()  # the policy acts from the first frame on, as in the real simulator
    mid = DreamVectorEnv(world, num_envs=6, burn_in=3, horizon=4, start_fraction=0.0)
    mid.reset(seed=3)
    assert mid._cache.valid.sum(1).tolist() == [2] * 6  # burn_in - 1 real steps of context per dream


def _is_a_real_window(world, context: np.ndarray) -> bool:
    """Whether the grids `context` (C, h, w) follow each other in one of the run's context episodes."""
    tokens = world.contexts.tokens.astype(np.int64)
    for begin, end in zip(world.contexts.frame_offsets[:-1], world.contexts.frame_offsets[1:], strict=True):
        for at in range(begin, end - len(context) + 1):
            if np.array_equal(tokens[at : at + len(context)], context):
                return True
    return False


def test_every_start_reports_the_real_grids_the_dream_began_from(never_ends):
    # `info["context_tokens"]`: what a policy of several frames looks back on; a dream from an episode's first frame
    # repeats it, one started further in holds its burn-in's real grids, padded with the oldest
    world = never_ends
    length = world.dynamics.config.context_frames
    env = DreamVectorEnv(world, 8, burn_in=3, horizon=2, start_fraction=0.5, autoreset_mode="SameStep")
    obs, info = env.reset(seed=1)
    context = info["context_tokens"]
    assert context.shape == (8, length, *obs.shape[1:])
    np.testing.assert_array_equal(context[:, -1], obs)
    at_start = [bool((c == c[-1]).all()) for c in context]
    assert 0 < sum(at_start) < 8  # both kinds on this seed
    for c, first in zip(context, at_start, strict=True):
        if not first:
            assert (c[: length - 3] == c[length - 3]).all() and _is_a_real_window(world, c[-3:])
    actions = np.zeros((8, 3), np.float32)
    _, _, _, truncated, info = env.step(actions)
    assert not truncated.any() and "context_tokens" not in info
    obs, _, _, truncated, info = env.step(actions)
    assert truncated.all() and info["_context_tokens"].all()
    np.testing.assert_array_equal(info["context_tokens"][:, -1], obs)
    np.testing.assert_array_equal(info["context_tokens"], env.context_tokens())
    # NEXT_STEP: the restarted rows' context comes with the step that restarts them, masked to those rows
    later = DreamVectorEnv(world, 3, burn_in=3, horizon=5, start_fraction=0.0)
    later.reset(seed=2)
    later._steps[1] = 4
    _, _, _, truncated, info = later.step(np.zeros((3, 3), np.float32))
    assert truncated.tolist() == [False, True, False] and "context_tokens" not in info
    obs, _, _, _, info = later.step(np.zeros((3, 3), np.float32))
    assert info["_context_tokens"].tolist() == [False, True, False]
    np.testing.assert_array_equal(info["context_tokens"][1, -1], obs[1])
    # a caller's own frames: theirs, the oldest repeated
    frames, actions = real_context(world, 2)
    _, info = DreamEnv(world, burn_in=BURN_IN, horizon=10).reset(options={"frames": frames, "actions": actions})
    with torch.no_grad():
        tokens = world.tokenizer.encode(torch.as_tensor(frames)).tokens.numpy()
    np.testing.assert_array_equal(info["context_tokens"], np.concatenate([tokens[:1]] * (length - 3) + [tokens]))


# --- contexts given at reset, pickling, unbounded dreams -------------------------------------------------------


def real_context(world, steps: int, episode: int = 0):
    """`steps + 1` frames decoded from a context episode's tokens, and the actions taken between them."""
    tokens = torch.as_tensor(world.contexts.tokens[: steps + 1].astype(np.int64))
    frames = world.tokenizer.tokens_to_frames(tokens).numpy()
    return frames, world.contexts.actions[:steps]


def test_reset_from_given_frames_dreams_from_them(never_ends):
    frames, actions = real_context(never_ends, 2)
    env = DreamVectorEnv(never_ends, 2, burn_in=BURN_IN, horizon=10)
    obs, _ = env.reset(seed=0, options={"frames": frames, "actions": actions})
    with torch.no_grad():
        tokens = never_ends.tokenizer.encode(torch.as_tensor(frames)).tokens
    np.testing.assert_array_equal(obs, np.stack([tokens[-1].numpy()] * 2))
    action = np.full((2, 3), 0.4, np.float32)
    stepped = env.step(action)[0]
    # the same step by hand: feed the encoded context, then imagine one step
    cache = never_ends.dynamics.new_cache(2)
    rows = torch.arange(2)
    context_actions = torch.as_tensor(actions)[None].expand(2, -1, -1)
    never_ends.burn_in(cache, tokens[None].expand(2, -1, -1, -1), context_actions, rows)
    expected = never_ends.imagine(cache, tokens[-1][None].expand(2, -1, -1), torch.as_tensor(action))
    np.testing.assert_array_equal(stepped, expected.tokens.numpy())
    single = DreamEnv(never_ends, burn_in=BURN_IN, horizon=10)
    assert np.array_equal(single.reset(options={"frames": frames, "actions": actions})[0], obs[0])


def test_reset_takes_one_context_per_env_each_dreamed_as_if_alone(never_ends):
    """A (num_envs, C, H, W, ch) context gives each env its own frames and actions: every env's first observation
    and first step match a one-env dream reset from its context alone."""
    frames, actions = real_context(never_ends, 2)
    per_env = np.stack([frames, frames[::-1]])  # (2, 3, H, W, ch)
    per_env_actions = np.stack([actions, actions[::-1] * 0.5])
    env = DreamVectorEnv(never_ends, 2, burn_in=BURN_IN, horizon=10)
    obs, _ = env.reset(seed=0, options={"frames": per_env, "actions": per_env_actions})
    assert not np.array_equal(obs[0], obs[1])
    step = np.array([[0.5, 0.3, 0.0], [-0.5, 0.0, 0.2]], np.float32)
    stepped = env.step(step)[0]
    for i in range(2):
        alone = DreamVectorEnv(never_ends, 1, burn_in=BURN_IN, horizon=10)
        first, _ = alone.reset(seed=0, options={"frames": per_env[i], "actions": per_env_actions[i]})
        np.testing.assert_array_equal(first[0], obs[i])
        np.testing.assert_array_equal(alone.step(step[i : i + 1])[0][0], stepped[i])


def test_reset_from_a_single_frame_needs_no_actions(never_ends):
    frames, _ = real_context(never_ends, 2)
    env = DreamVectorEnv(never_ends, 3, burn_in=BURN_IN, horizon=10)
    obs, _ = env.reset(seed=0, options={"frames": frames[:1]})  # C = 1: no actions taken yet
    with torch.no_grad():
        expected = never_ends.tokenizer.encode(torch.as_tensor(frames[:1])).tokens[0].numpy()
    for row in obs:
        np.testing.assert_array_equal(row, expected)
    assert not env._cache.valid.any()  # nothing before the frame: the cache holds no context yet
    obs, reward, terminated, truncated, _ = env.step(np.zeros((3, 3), np.float32))
    assert env.observation_space.contains(obs) and np.isfinite(reward).all()
    assert env._cache.valid.sum(1).tolist() == [1, 1, 1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f, a: (np.repeat(np.repeat(f, 2, 1), 2, 2), a), "context frames of shape"),  # twice the size
        (lambda f, a: (f.astype(np.float32), a), "uint8"),
        (lambda f, a: (np.concatenate([f, f]), np.concatenate([a, a, a[:1]])), "C <= 3"),  # longer than the context
        (lambda f, a: (f, a[:1]), "the 2 action"),
        (lambda f, a: (f, a[:, :2]), r"shaped \(2, 3\)"),  # actions of the wrong width
        (lambda f, a: (f, np.full_like(a, np.nan)), "NaN"),
    ],
)
def test_a_bad_context_at_reset_says_what_was_expected(never_ends, change, message):
    frames, actions = change(*real_context(never_ends, 2))
    env = DreamVectorEnv(never_ends, 2, burn_in=BURN_IN)
    with pytest.raises(ValueError, match=message):
        env.reset(options={"frames": frames, "actions": actions})


def test_reset_options_that_would_be_ignored_are_refused(never_ends):
    frames, actions = real_context(never_ends, 2)
    env = DreamVectorEnv(never_ends, 2, burn_in=BURN_IN)
    for options, message in (
        ({"frame": frames}, r"unknown reset option\(s\) \['frame'\]"),  # a typo dreamed from random context
        ({"actions": actions}, r"pass options\['frames'\] too"),
        ([frames], "expected None or a dict"),
    ):
        with pytest.raises(ValueError, match=message):
            env.reset(options=options)
    env.reset(seed=0, options={})  # nothing asked: the run's own context


def test_ragged_frames_or_actions_say_what_was_expected(never_ends):
    frames, actions = real_context(never_ends, 2)
    env = DreamVectorEnv(never_ends, 2, burn_in=BURN_IN)
    with pytest.raises(ValueError, match=r"expected context frames of shape .*got a ragged sequence"):
        env.reset(options={"frames": [frames[0], frames[1][:-1]]})
    with pytest.raises(ValueError, match=r"expected the 2 action\(s\) .*got a ragged sequence"):
        env.reset(options={"frames": frames, "actions": [actions[0], actions[1][:2]]})
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected float actions of shape \(2, 3\).*ragged"):
        env.step([[0.0, 0.0, 0.0], [0.0, 0.0]])


def test_a_wrong_context_shape_is_reported_as_given(never_ends):
    frames, _ = real_context(never_ends, 2)
    env = DreamVectorEnv(never_ends, 2, burn_in=BURN_IN)
    wide = np.repeat(frames, 2, axis=2)  # one context for every env, twice as wide
    with pytest.raises(ValueError, match=rf"got uint8 \({', '.join(map(str, wide.shape))}\)$"):
        env.reset(options={"frames": wide, "actions": np.zeros((2, 3), np.float32)})


def test_a_step_before_the_first_reset_is_refused(never_ends):
    for env, action in (
        (DreamVectorEnv(never_ends, 2, burn_in=BURN_IN), np.zeros((2, 3), np.float32)),
        (DreamEnv(never_ends, burn_in=BURN_IN), np.zeros(3, np.float32)),
    ):
        with pytest.raises(gym.error.ResetNeeded, match=r"call reset\(\) before step\(\)"):
            env.step(action)
        env.reset(seed=0)
        env.step(action)
    env = DreamVectorEnv(never_ends, 2, burn_in=BURN_IN)
    env.reset(seed=0, options={"reset_mask": np.array([True, False])})  # row 1 would dream from zero tokens
    with pytest.raises(gym.error.ResetNeeded, match=r"dream\(s\) \[1\] never started"):
        env.step(np.zeros((2, 3), np.float32))


def test_a_single_dream_that_ended_must_be_reset(never_ends):
    env = DreamEnv(never_ends, burn_in=BURN_IN, horizon=2)
    env.reset(seed=0)
    action = np.zeros(3, np.float32)
    assert env.step(action)[3] is False and env.step(action)[3] is True
    with pytest.raises(gym.error.ResetNeeded, match=r"the dream ended: call reset\(\)$"):
        env.step(action)  # it would have dreamed on past its horizon
    env.reset(seed=1)
    assert env.step(action)[3] is False
    with pytest.raises(ValueError, match="a DreamEnv has one"):
        env.reset(options={"reset_mask": np.array([True])})


def test_reset_mask_restarts_only_the_dreams_it_names(never_ends):
    """Autoreset disabled, as Gymnasium's vector envs: the ended dreams wait for `reset(options={"reset_mask": ...})`,
    which restarts those alone and leaves the others' observations and steps as they were."""
    env = DreamVectorEnv(never_ends, 2, burn_in=BURN_IN, horizon=2, autoreset_mode=AutoresetMode.DISABLED)
    action = np.full((2, 3), 0.2, np.float32)
    env.reset(seed=4)
    env.step(action)
    obs, _, _, truncated, _ = env.step(action)
    assert truncated.all()
    with pytest.raises(gym.error.ResetNeeded, match=r"\[0, 1\] ended"):
        env.step(action)
    restarted, info = env.reset(options={"reset_mask": np.array([False, True])})
    np.testing.assert_array_equal(restarted[0], obs[0])  # row 0 untouched
    assert info["_context_tokens"].tolist() == [False, True]
    np.testing.assert_array_equal(info["context_tokens"][1][-1], restarted[1])
    with pytest.raises(gym.error.ResetNeeded, match=r"\[0\] ended"):
        env.step(action)
    frames, actions = real_context(never_ends, 2)
    before = env._observe()
    restarted, _ = env.reset(options={"reset_mask": np.array([True, False]), "frames": frames, "actions": actions})
    with torch.no_grad():
        first = never_ends.tokenizer.encode(torch.as_tensor(frames)).tokens[-1].numpy()
    np.testing.assert_array_equal(restarted[0], first)
    np.testing.assert_array_equal(restarted[1], before[1])  # the frames start row 0 alone
    assert env.step(action)[3].tolist() == [False, False]  # both restarted: each at its first step again
    for bad, error, message in (  # the errors Gymnasium's own vector envs raise
        ([True, False], TypeError, "expected a bool numpy array of shape \\(2,\\), got list"),
        (np.array([1, 0]), TypeError, "got a int64 array"),
        (np.array([True]), ValueError, r"got shape \(1,\)"),
        (np.array([False, False]), ValueError, "names no dream"),
    ):
        with pytest.raises(error, match=message):
            env.reset(options={"reset_mask": bad})


def test_a_discrete_dream_resets_from_a_single_frame_with_no_actions(discrete_world):
    frames, _ = real_context(discrete_world, 1)
    env = DreamVectorEnv(discrete_world, 2, burn_in=2, horizon=5)
    obs, _ = env.reset(seed=0, options={"frames": frames[:1]})  # numpy's min of no actions raised here
    assert env.observation_space.contains(obs)
    obs, reward, *_ = env.step(np.array([1, 3]))
    assert env.observation_space.contains(obs) and np.isfinite(reward).all()


def test_a_pickled_dream_goes_on_where_it_was(never_ends):
    import pickle

    env = DreamVectorEnv(never_ends, 3, burn_in=BURN_IN, horizon=6, temperature=1.0, top_k=4)
    env.reset(seed=11)
    rng = np.random.default_rng(0)
    for _ in range(4):
        env.step(rng.uniform(-1, 1, (3, 3)).astype(np.float32))
    copy_ = pickle.loads(pickle.dumps(env))
    actions = rng.uniform(-1, 1, (5, 3, 3)).astype(np.float32)  # crosses the horizon: autoresets too
    for action in actions:
        a, b = env.step(action), copy_.step(action)
        for x, y in zip(a[:4], b[:4], strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_a_ten_thousand_step_dream_stays_finite_in_bounded_memory(never_ends):
    env = DreamVectorEnv(never_ends, 2, burn_in=BURN_IN, horizon=10**9, temperature=1.0)
    env.reset(seed=0)
    cache = env._cache
    storage = [cache.keys.data_ptr(), cache.values.data_ptr(), cache.keys.shape]
    actions = np.random.default_rng(0).uniform(-1, 1, (10_000, 2, 3)).astype(np.float32)
    rewards = np.empty((10_000, 2), np.float32)
    for t, action in enumerate(actions):
        obs, rewards[t], terminated, truncated, _ = env.step(action)
    assert not terminated.any() and not truncated.any()
    assert np.isfinite(rewards).all() and rewards.std() > 0  # sampled dreams that kept changing, never NaN
    assert int(env._cache.position.min()) == 10_000 + BURN_IN - 1
    # the ring was written in place all along: the same buffers, the same size as at the first step
    assert env._cache is cache and [cache.keys.data_ptr(), cache.values.data_ptr(), cache.keys.shape] == storage


# --- the bf16 fast path against the float32 plain path ---------------------------------------------------------


def test_bfloat16_dream_agrees_with_the_float32_dream(never_ends):
    fast = never_ends.with_dtype("bfloat16")
    assert never_ends.with_dtype("float32") is never_ends
    assert next(never_ends.dynamics.parameters()).dtype == torch.float32  # the plain model is left alone
    frames = real_context(never_ends, 2)[0]
    grids = never_ends.tokenizer.encode(torch.as_tensor(frames)).tokens
    cache32, cache16 = never_ends.dynamics.new_cache(3), fast.dynamics.new_cache(3)
    assert cache16.keys.dtype == torch.bfloat16
    action = torch.tensor([[0.3, 0.5, 0.0]])
    with torch.no_grad():
        plain = never_ends.dynamics(grids.flatten(1)[:, None], action.expand(3, -1)[:, None], cache32)
        quick = fast.dynamics(grids.flatten(1)[:, None], action.expand(3, -1)[:, None].bfloat16(), cache16)
    # bf16 keeps about 3 significant digits: the logits agree to a few hundredths
    torch.testing.assert_close(quick.logits.float(), plain.logits, atol=0.1, rtol=0.02)
    decoded32, decoded16 = never_ends.frames(grids), fast.frames(grids)
    assert decoded16.dtype == torch.uint8 and (decoded16.int() - decoded32.int()).abs().max() <= 8
    env = DreamVectorEnv(never_ends, 2, obs_mode="pixels", burn_in=BURN_IN, dtype="bf16", horizon=2)
    obs, _ = env.reset(seed=0, options={"frames": frames, "actions": real_context(never_ends, 2)[1]})
    for _ in range(3):  # crosses the horizon: an autoreset from the run's contexts in bf16 too
        obs, reward, *_ = env.step(np.zeros((2, 3), np.float32))
        assert obs.dtype == np.uint8 and reward.dtype == np.float32 and np.isfinite(reward).all()
    assert fast.dynamics.transition_reward.embedding.weight.dtype == torch.float32
    assert next(fast.with_dtype("float32").dynamics.parameters()).dtype == torch.float32  # and back
    # an env given a bf16 model steps it as it is (a default of float32 once turned it back, unasked)
    assert DreamVectorEnv(fast, 2, burn_in=BURN_IN).model is fast
    assert DreamVectorEnv(fast, 2, burn_in=BURN_IN, dtype="float32").model.decode_dtype == torch.float32
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        never_ends.with_dtype("float16")


def test_decoding_in_chunks_gives_the_frames_of_one_pass(never_ends, monkeypatch):
    grids = torch.as_tensor(never_ends.contexts.tokens[:10].astype(np.int64))
    whole = never_ends.tokenizer.tokens_to_frames(grids)
    monkeypatch.setattr(never_ends, "decode_chunk", 3)  # 4 chunks, the last one short
    chunked = never_ends.frames(grids)
    assert chunked.shape == whole.shape and (chunked.int() - whole.int()).abs().max() <= 1
