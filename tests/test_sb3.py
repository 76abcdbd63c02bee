"""Stable-Baselines3 trains on the dream environment as it is: a real outside client of the Gymnasium API.

With pixel observations the env goes to SB3 unchanged. Token observations are a 2-D MultiDiscrete grid, which
SB3 does not take (its issue 1836); wrap them in `gymnasium.wrappers.FlattenObservation` (one-hot) for it."""

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv

from envs.dream import DreamEnv


@pytest.mark.slow
@pytest.mark.parametrize("run", ["box_run", "discrete_run"])
def test_stable_baselines3_ppo_trains_on_the_dream(run, request, tmp_path):
    obs_mode = "pixels"
    checkpoint = request.getfixturevalue(run)
    sb3_check_env(DreamEnv(checkpoint, obs_mode=obs_mode, burn_in=2, horizon=16))
    envs = DummyVecEnv([lambda: DreamEnv(checkpoint, obs_mode=obs_mode, burn_in=2, horizon=16)] * 2)
    model = PPO("MlpPolicy", envs, n_steps=256, batch_size=128, n_epochs=2, seed=0, device="cpu", verbose=0)
    model.set_logger(configure(str(tmp_path), []))  # SB3's default logger makes a folder in /tmp on every run
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=2048)
    assert model.num_timesteps >= 2048
    after = list(model.policy.parameters())
    changed = [not np.allclose(a.numpy(), b.detach().numpy()) for a, b in zip(before, after, strict=True)]
    assert all(changed)  # every parameter was updated
    obs = envs.reset()
    action, _ = model.predict(obs, deterministic=True)
    space = envs.action_space
    assert isinstance(space, gym.spaces.Discrete) == (run == "discrete_run")
    assert space.contains(action[0])
