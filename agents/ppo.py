"""PPO trained only in imagination: the policy never sees the real simulator while it learns.

Read top to bottom: `train_ppo` makes the dream vector env and the policy; `optimise` collects a rollout,
computes GAE advantages (`compute_gae`, bootstrapping through truncation with the value of the final
observation), then runs a few epochs of clipped updates, over any vector env of token observations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from agents.policy import ActorCritic, PolicyConfig, TokenHistory, action_bounds, stack_history
from envs.dream import DreamSettings, DreamVectorEnv
from worldmodel.checkpoint import CheckpointError, load_module, save_checkpoint
from worldmodel.logger import RunLogger
from worldmodel.run_dir import RunDir
from worldmodel.train import recent_weights, resolve_device
from worldmodel.world_model import WorldModel

POLICY = "policy"


@dataclass
class PPOConfig(DreamSettings):
    """PPO in the dream: the dream's settings (`DreamSettings`: horizon, burn-in, start fraction, sampling, dtype),
    here with PPO's defaults, then PPO's own."""

    horizon: int = 32
    burn_in: int | None = 4
    start_fraction: float = 0.25
    dtype: str | None = "float32"
    """The dream's precision: float32, or bfloat16 (docs/architecture.md has its speed); the policy and its
    updates stay float32."""
    num_envs: int = 64
    """Dreams stepped together in one batched forward pass."""
    rollout_steps: int = 32
    total_steps: int = 200_000
    """Imagined environment steps in all."""
    max_minutes: float | None = None
    """Wall-clock budget; training stops at total_steps or after this long."""
    gamma: float = 0.97
    gae_lambda: float = 0.95
    lr: float = 3e-4
    epochs: int = 4
    minibatches: int = 4
    clip: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    reward_scale: float = 1.0
    hidden: int = 256
    policy_frames: int = 1
    """How many of the latest token grids the policy sees, newest last: 1, the current frame alone; 2 or more show it
    motion, such as how fast the other cars close in on highway (`PolicyConfig.frames`)."""
    init_log_std: float = -0.5
    """A fresh continuous policy's log standard deviation on every action dimension (PPO learns it from there;
    a policy that is continued keeps its own)."""
    seed: int = 0


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    next_value: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """(T, N) advantages by generalised advantage estimation.

    `rewards[t]` is the reward of step t (for a step cut by a time limit, plus gamma times the value of the final
    observation), `values[t]` the value of the observation step t acted on, `dones[t]` 1 where step t ended its
    episode (terminated or truncated: nothing flows back across it), `next_value` (N,) the value of the
    observation after the last step."""
    advantages = torch.zeros_like(rewards)
    gae = torch.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        following = next_value if t == len(rewards) - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * following * not_done - values[t]
        gae = delta + gamma * gae_lambda * not_done * gae
        advantages[t] = gae
    return advantages


def load_policy(path: Path, device: torch.device | str = "cpu") -> ActorCritic:
    policy, _, _ = load_module(path, POLICY, ActorCritic, PolicyConfig, device)
    return policy


def train_ppo(
    run_dir: str | Path,
    config: PPOConfig,
    logger: RunLogger,
    device: str = "cpu",
    init: Path | None = None,
    out: Path | None = None,
    step_offset: int = 0,
    extra_meta: dict | None = None,
    recent: tuple[list[int], float] | None = None,
) -> dict[str, float]:
    """Train a policy in the dream of the world model in `run_dir`; writes `<run>/policy.safetensors` (or `out`).

    `init` continues from that policy checkpoint instead of fresh weights (the dream-to-real loop's later rounds);
    `step_offset` is added to the imagined steps that metrics are logged at. `recent` = (dataset indices, share)
    starts that share of the dreams from those episodes' real states (the states the current policy reached, in
    the loop), the rest from all training episodes."""
    run_dir = Path(run_dir)
    torch.manual_seed(config.seed)
    world = WorldModel.load(run_dir, resolve_device(device))
    envs = DreamVectorEnv(world, config.num_envs, "tokens", config.dream(), autoreset_mode="SameStep")
    if recent is not None:
        envs.context_weights = recent_weights(world.contexts, envs.burn_in - 1, *recent)
    fresh = ActorCritic.for_spaces(
        envs.single_observation_space,
        envs.single_action_space,
        world.tokenizer.config.levels,
        hidden=config.hidden,
        init_log_std=config.init_log_std,
        frames=config.policy_frames,
    )
    if init is None:
        policy = fresh
    else:
        policy = load_policy(init)
        # the starting spread is a fresh policy's only; a continued one brings its own
        expected = replace(fresh.config, init_log_std=policy.config.init_log_std)
        if policy.config != expected:
            raise CheckpointError(f"{init} is a policy for {policy.config}, this dream needs {expected}")
    done = optimise(envs, policy.to(world.device), config, logger, step_offset=step_offset)
    figures = {
        "imagined_steps": done["steps"],
        "dream_return": done["episode_return"],
        "steps_per_second": done["steps_per_second"],
    }
    meta = {
        "imagined_steps": figures["imagined_steps"],
        "imagined_steps_total": step_offset + figures["imagined_steps"],
        "dream_return": figures["dream_return"],
        **(extra_meta or {}),
    }
    save_checkpoint(out or RunDir(run_dir).policy, policy, POLICY, meta)
    return figures


def ppo_optimizer(policy: ActorCritic, config: PPOConfig) -> torch.optim.Adam:
    """The optimizer of PPO's clipped updates."""
    return torch.optim.Adam(policy.parameters(), lr=config.lr, eps=1e-5)


def clipped_updates(
    policy: ActorCritic,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    config: PPOConfig,
    minibatch: int,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """`config.epochs` passes of PPO's clipped update over `batch` (obs, act, logp (the behaviour's), adv, ret), in
    shuffled minibatches of `minibatch` steps; the figures of the last minibatch. `bounds`: the actions are the
    executed ones, clipped to these (`ActorCritic.act`)."""
    size = len(batch["adv"])
    for _ in range(config.epochs):
        order = torch.randperm(size, device=batch["adv"].device)
        for start in range(0, size, minibatch):
            idx = order[start : start + minibatch]
            action = batch["act"][idx].long() if policy.config.discrete_actions else batch["act"][idx]
            _, logp, entropy, value = policy.act(batch["obs"][idx], action, bounds=bounds)
            ratio = (logp - batch["logp"][idx]).exp()
            adv = batch["adv"][idx]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - config.clip, 1 + config.clip)).mean()
            value_loss = 0.5 * (value - batch["ret"][idx]).pow(2).mean()
            loss = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy.mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
    return {
        "policy_loss": policy_loss.item(),
        "value_loss": value_loss.item(),
        "entropy": entropy.mean().item(),
        "clip_fraction": ((ratio - 1).abs() > config.clip).float().mean().item(),
    }


def learn_from_episodes(
    policy: ActorCritic,
    episodes: list[dict[str, np.ndarray]],
    action_space: gym.Space,
    config: PPOConfig,
    epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """PPO's clipped updates on recorded episodes that `policy` itself drove sampling its actions (the loop's real
    collection), updating it in place. Each episode is a dict of `tokens` (T + 1, h, w) from its first frame, `actions`,
    `rewards` and `terminated` (T, ...); one whose last step did not terminate was cut by a time limit and bootstraps
    from the value of its final frame. Advantages come from the policy's own critic, as in `optimise`. The actions are
    those the environment executed in `action_space`: a Box's are the policy's samples clipped to its bounds, and their
    probabilities are the clipped Gaussian's (`clipped_normal_log_prob`).

    A caller that updates on several batches in turn passes one `optimizer` to every call: a fresh Adam's first steps
    move every weight by about `lr` whatever its gradient, and restarting it at each batch of a few updates left a toy
    policy unsettled on 9 of 20 seeds where one Adam throughout settled on all 20."""
    if not episodes:
        raise ValueError("no episodes to learn from")
    dev = next(policy.parameters()).device
    bounds = action_bounds(action_space, dev)
    parts: dict[str, list[torch.Tensor]] = {"obs": [], "act": [], "logp": [], "adv": [], "ret": []}
    with torch.no_grad():
        for episode in episodes:
            tokens = torch.as_tensor(np.asarray(episode["tokens"], dtype=np.int64), device=dev)
            actions = torch.as_tensor(np.asarray(episode["actions"]), device=dev)
            actions = actions.long() if policy.config.discrete_actions else actions.float()
            tokens = stack_history(tokens, policy.config.frames)
            values = policy.value(tokens)  # (T + 1,)
            _, logp, _, _ = policy.act(tokens[:-1], actions, bounds=bounds)
            rewards = torch.as_tensor(np.asarray(episode["rewards"]), device=dev, dtype=torch.float32)
            rewards = rewards * config.reward_scale
            if not bool(episode["terminated"][-1]):
                rewards[-1] += config.gamma * values[-1]
            dones = torch.zeros_like(rewards)
            dones[-1] = 1.0
            advantages = compute_gae(
                rewards[:, None], values[:-1, None], dones[:, None], values[-1:], config.gamma, config.gae_lambda
            )[:, 0]
            found = (tokens[:-1], actions, logp, advantages, advantages + values[:-1])
            for key, value in zip(parts, found, strict=True):
                parts[key].append(value)
    batch = {key: torch.cat(value) for key, value in parts.items()}
    optimizer = ppo_optimizer(policy, config) if optimizer is None else optimizer
    minibatch = config.num_envs * config.rollout_steps // config.minibatches
    figures = clipped_updates(policy, optimizer, batch, replace(config, epochs=epochs), minibatch, bounds=bounds)
    return {"steps": float(len(batch["adv"])), **figures}


def first_grids(info: dict, seen: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
    """What the episodes of `rows` (all when None) began from, for `TokenHistory.start`: the dream env's
    `info["context_tokens"]` (the real grids before its first observation), else the token grids `seen` of their
    first observations (a real simulator's episode begins there)."""
    if "context_tokens" in info:
        context = info["context_tokens"] if rows is None else info["context_tokens"][rows]
        return torch.as_tensor(context, device=seen.device)
    return seen if rows is None else seen[torch.as_tensor(rows, device=seen.device)]


class Rollout:
    """PPO's experience of one iteration: `steps` steps of every env, what the policy saw and did, the reward it got
    (plus, where a time limit cut an episode, the discounted value of its final observation), and the returns of the
    episodes that finished."""

    def __init__(self, envs: gym.vector.VectorEnv, obs: torch.Tensor, steps: int):
        n, dev = envs.num_envs, obs.device
        self.obs = torch.zeros((steps, n, *obs.shape[1:]), dtype=torch.long, device=dev)
        self.act = torch.zeros((steps, n, *envs.single_action_space.shape), device=dev)
        self.logp, self.rew, self.done, self.val = (torch.zeros(steps, n, device=dev) for _ in range(4))
        self.episode_returns = np.zeros(n)
        self.finished: list[float] = []

    def collect(
        self,
        envs: gym.vector.VectorEnv,
        policy: ActorCritic,
        obs: torch.Tensor,
        config: PPOConfig,
        observe: Callable[[np.ndarray], torch.Tensor],
        history: TokenHistory,
    ) -> tuple[torch.Tensor, float]:
        """Step `envs` from `obs` (the policy's view, `history`'s grids) for the buffer's length; returns the next
        view and the mean reward per step."""
        dev = obs.device
        step_rewards = []
        for t in range(len(self.obs)):
            with torch.no_grad():
                action, logp, _, value = policy.act(obs)
            self.obs[t], self.act[t], self.logp[t], self.val[t] = obs, action, logp, value
            next_obs, env_reward, terminated, truncated, info = envs.step(action.cpu().numpy())
            self.episode_returns += env_reward
            step_rewards.append(float(np.mean(env_reward)))
            reward = torch.as_tensor(env_reward, device=dev, dtype=torch.float32) * config.reward_scale
            cut = truncated & ~terminated
            if cut.any():
                # bootstrap through time-limit truncation with the value of the observation before the reset
                final = history.then(observe(np.stack(info["final_obs"][cut])), np.flatnonzero(cut))
                with torch.no_grad():
                    reward[torch.as_tensor(cut, device=dev)] += config.gamma * policy.value(final)
            self.rew[t] = reward
            self.done[t] = torch.as_tensor(terminated | truncated, device=dev, dtype=torch.float32)
            ended = np.flatnonzero(terminated | truncated)
            for i in ended:
                self.finished.append(float(self.episode_returns[i]))
                self.episode_returns[i] = 0
            seen = observe(next_obs)
            obs = history.push(seen)
            if len(ended):  # autoreset: those envs' observations are their next episodes' first
                obs = history.start(first_grids(info, seen, ended), ended)
        return obs, float(np.mean(step_rewards))

    def batch(self, policy: ActorCritic, next_obs: torch.Tensor, config: PPOConfig) -> dict[str, torch.Tensor]:
        """The flattened steps with their GAE advantages and returns, for `clipped_updates`."""
        with torch.no_grad():
            next_value = policy.value(next_obs)
        advantages = compute_gae(self.rew, self.val, self.done, next_value, config.gamma, config.gae_lambda)
        return {
            "obs": self.obs.flatten(0, 1),
            "act": self.act.flatten(0, 1),
            "logp": self.logp.flatten(),
            "adv": advantages.flatten(),
            "ret": (advantages + self.val).flatten(),
        }


def optimise(
    envs: gym.vector.VectorEnv,
    policy: ActorCritic,
    config: PPOConfig,
    logger: RunLogger,
    observe: Callable[[np.ndarray], torch.Tensor] | None = None,
    step_offset: int = 0,
    after_update: Callable[[int, dict[str, float]], None] | None = None,
    log_prefix: str = "ppo/train",
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """PPO on `envs` for `config.total_steps` steps or `config.max_minutes`, updating `policy` in place: a rollout, its
    advantages, the clipped updates, over and over.

    `envs` must autoreset in SAME_STEP mode (Gymnasium 1.x), reporting a finished episode's last observation in
    `info["final_obs"]`; `observe` turns a batch of its observations into token grids (default: they are token grids
    already), and the policy sees the latest `policy.config.frames` of them (`TokenHistory`). `after_update(steps,
    figures)` is called after every update, with its figures (`episode_return`, the losses). `optimizer` (default: a
    fresh `ppo_optimizer`) lets a resumed training keep its Adam's moments. Returns the environment steps taken
    (`steps`), their rate and the mean return of the last 100 finished episodes (`episode_return`)."""
    dev = next(policy.parameters()).device
    observe = observe or (lambda batch: torch.as_tensor(batch, device=dev))
    optimizer = ppo_optimizer(policy, config) if optimizer is None else optimizer
    history = TokenHistory(policy.config.frames)
    obs, info = envs.reset(seed=config.seed)
    obs = history.start(first_grids(info, observe(obs)))
    rollout = Rollout(envs, obs, config.rollout_steps)
    batch = envs.num_envs * config.rollout_steps
    iterations = max(1, config.total_steps // batch)
    began = time.monotonic()
    logs: dict[str, float] = {}
    step = 0
    # a wall-clock budget shows as seconds of it (a step count of 10**12 would show an ETA of centuries)
    timed = config.max_minutes is not None
    progress = tqdm(
        total=round(60 * config.max_minutes) if timed else iterations,
        unit="s" if timed else "it",
        desc="ppo",
        dynamic_ncols=True,
    )
    for iteration in range(iterations):
        obs, reward_per_step = rollout.collect(envs, policy, obs, config, observe, history)
        update = clipped_updates(
            policy, optimizer, rollout.batch(policy, obs, config), config, batch // config.minibatches
        )
        step = (iteration + 1) * batch
        recent = rollout.finished[-100:]
        logs = {
            "episode_return": float(np.mean(recent)) if recent else float("nan"),
            "reward_per_step": reward_per_step,
            **update,
        }
        logger.log({f"{log_prefix}/{k}": v for k, v in logs.items()}, step_offset + step)
        if after_update is not None:
            after_update(step, logs)
        progress.set_postfix(steps=step, ret=f"{logs['episode_return']:.1f}", r=f"{logs['reward_per_step']:.3f}")
        progress.update(min(round(time.monotonic() - began), progress.total) - progress.n if timed else 1)
        if config.max_minutes is not None and time.monotonic() - began > 60 * config.max_minutes:
            tqdm.write(f"ppo: stopping after {step} steps at the {config.max_minutes:g}-minute budget")
            break
    progress.close()
    return {
        "steps": float(step),
        "episode_return": logs["episode_return"],
        "steps_per_second": step / (time.monotonic() - began),
    }
