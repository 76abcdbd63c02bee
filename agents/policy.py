"""Actor-critic over token-grid observations: Gaussian actions for Box spaces, categorical for Discrete."""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from einops import rearrange
from torch import nn
from torch.distributions import Categorical, Normal

from worldmodel.fsq import FSQ
from worldmodel.tokens import latest_grids


@dataclass
class PolicyConfig:
    grid_size: int = 8
    levels: tuple[int, ...] = (8, 6, 5)
    """The tokenizer's FSQ levels: each token is fed to the policy as its code vector plus a learned embedding."""
    action_dim: int = 3
    discrete_actions: bool = False
    frames: int = 1
    """How many of the latest token grids the policy sees, newest last (`TokenHistory`): 1 is the current frame
    alone; 2 or more show motion, such as how fast the other cars close in on highway."""
    embedding_dim: int = 16
    hidden: int = 256
    init_log_std: float = -0.5

    @property
    def vocab_size(self) -> int:
        return int(np.prod(self.levels))


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """E[clip(a, low, high)] for a ~ Normal(mean, std), elementwise.

    PPO trains the Gaussian whose samples the environment clips, so this, not clip(mean), is what the trained
    policy does on average. The two differ most where it matters: a policy that learned to press the throttle
    often but with a mean just below 0 drives when sampled, and stands still forever at clip(mean) = 0.
    """
    like = {"dtype": mean.dtype, "device": mean.device}
    low, high = torch.as_tensor(low, **like), torch.as_tensor(high, **like)
    unit = torch.distributions.Normal(torch.zeros((), **like), torch.ones((), **like))
    a, b = (low - mean) / std, (high - mean) / std
    below, above = unit.cdf(a), 1 - unit.cdf(b)
    density = unit.log_prob(a).exp() - unit.log_prob(b).exp()
    # an unbounded side contributes nothing (its probability mass is 0; avoid inf * 0)
    ends = torch.where(torch.isfinite(low), low * below, 0) + torch.where(torch.isfinite(high), high * above, 0)
    return ends + mean * (1 - below - above) + std * density


def action_bounds(space: gym.Space, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
    """A Box's (low, high) as tensors, the bounds the environment clips the policy's actions to; None for others."""
    if not isinstance(space, gym.spaces.Box):
        return None
    return torch.as_tensor(space.low, device=device), torch.as_tensor(space.high, device=device)


def clipped_normal_log_prob(dist: Normal, action: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """log-probability, elementwise, of `action` as the environment executed it: clip(a, low, high) for a ~ `dist`.

    Inside the bounds that is the Gaussian's density; on a bound it is the Gaussian's mass beyond the bound (the
    clipped Gaussian's point mass there). A recorded action is the clipped one, and a mean that ran past the bound
    puts its density there far out in a tail: PPO's ratio of two such tails overflowed and turned a toy policy's
    weights to NaN (on 2 of 10 seeds, after 8 and 31 rounds of updates). Where one bound is unbounded nothing is
    clipped on that side."""
    like = {"dtype": dist.mean.dtype, "device": dist.mean.device}
    low, high = torch.as_tensor(low, **like), torch.as_tensor(high, **like)
    mean, std = dist.mean, dist.stddev
    at_low, at_high = action <= low, action >= high
    # each branch sees a harmless argument where it is not chosen, so that no inf reaches the gradient
    below = torch.special.log_ndtr(torch.where(at_low, (low - mean) / std, 0.0))
    above = torch.special.log_ndtr(torch.where(at_high, (mean - high) / std, 0.0))
    return torch.where(at_low, below, torch.where(at_high, above, dist.log_prob(action)))


class ActorCritic(nn.Module):
    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.quantizer = FSQ(config.levels)
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        if config.frames < 1:
            raise ValueError(f"a policy sees at least 1 frame, got frames={config.frames}")
        channels = (self.quantizer.dim + config.embedding_dim) * config.frames
        side = (config.grid_size + 1) // 2
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * side * side, config.hidden),
            nn.SiLU(),
        )
        self.actor = nn.Linear(config.hidden, config.action_dim)
        self.critic = nn.Linear(config.hidden, 1)
        nn.init.orthogonal_(self.actor.weight, 0.01)
        nn.init.zeros_(self.actor.bias)
        nn.init.orthogonal_(self.critic.weight, 1.0)
        self.log_std = nn.Parameter(torch.full((config.action_dim,), config.init_log_std))

    @classmethod
    def for_spaces(
        cls, observation_space: gym.Space, action_space: gym.Space, levels: tuple[int, ...], **kwargs
    ) -> ActorCritic:
        discrete = isinstance(action_space, gym.spaces.Discrete)
        return cls(
            PolicyConfig(
                grid_size=int(observation_space.shape[-1]),
                levels=tuple(levels),
                action_dim=int(action_space.n) if discrete else int(action_space.shape[0]),
                discrete_actions=discrete,
                **kwargs,
            )
        )

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, frames, h, w) token grids, oldest first (or (B, h, w) for a policy of one frame) -> (B, hidden)."""
        tokens = tokens.long()
        if tokens.dim() == 3 and self.config.frames == 1:
            tokens = tokens[:, None]
        if tokens.dim() != 4 or tokens.shape[1] != self.config.frames:
            raise ValueError(
                f"this policy sees {self.config.frames} token grid(s) a step: expected (B, {self.config.frames}, h, w)"
                f" tokens, got shape {tuple(tokens.shape)}"
            )
        x = torch.cat([self.quantizer.indices_to_codes(tokens), self.embedding(tokens)], dim=-1)
        return self.trunk(rearrange(x, "b k h w d -> b (k d) h w"))

    def distribution(self, hidden: torch.Tensor) -> Categorical | Normal:
        out = self.actor(hidden)
        if self.config.discrete_actions:
            return Categorical(logits=out)
        return Normal(out, self.log_std.exp().expand_as(out))

    def value(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.critic(self.features(tokens)).squeeze(-1)

    @torch.no_grad()
    def action_for(self, tokens: torch.Tensor, space: gym.Space, deterministic: bool = True) -> np.ndarray | int:
        """The action one observation ((frames, h, w) token grids, or (h, w) for one frame) asks of `space`, as an
        environment takes it: an int, or a clipped float32 array (deterministic: the likeliest, or the mean of the
        clipped Gaussian)."""
        discrete = isinstance(space, gym.spaces.Discrete)
        bounds = action_bounds(space)
        action, *_ = self.act(tokens[None], deterministic=deterministic, bounds=bounds)
        if discrete:
            return int(action[0])
        return np.clip(action[0].cpu().numpy(), space.low, space.high).astype(np.float32)

    def act(
        self,
        tokens: torch.Tensor,
        action: torch.Tensor | None = None,
        deterministic: bool = False,
        bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """(action, log_prob, entropy, value); samples unless `action` is given or `deterministic`.

        The deterministic action is the most likely one (categorical), or the Gaussian's mean; with the Box's
        `bounds` (low, high) it is the mean of the action the environment executes, which clips what the
        policy samples (`clipped_normal_mean`), and a given `action` is one the environment executed, whose
        log-probability counts the Gaussian's mass beyond a bound it lies on (`clipped_normal_log_prob`). A sampled
        action stays the Gaussian's own, unclipped, with its density."""
        hidden = self.features(tokens)
        dist = self.distribution(hidden)
        executed = action is not None and bounds is not None and not self.config.discrete_actions
        if action is None:
            if deterministic and self.config.discrete_actions:
                action = dist.probs.argmax(-1)
            elif deterministic:
                action = dist.mean if bounds is None else clipped_normal_mean(dist.mean, dist.stddev, *bounds)
            else:
                action = dist.sample()
        log_prob = clipped_normal_log_prob(dist, action, *bounds) if executed else dist.log_prob(action)
        entropy = dist.entropy()
        if not self.config.discrete_actions:
            log_prob, entropy = log_prob.sum(-1), entropy.sum(-1)
        return action, log_prob, entropy, self.critic(hidden).squeeze(-1)


class TokenHistory:
    """What a policy of `frames` frames sees in each of a batch of episodes: their latest token grids, (B, frames,
    h, w), oldest first. Before an episode has that many, its first grid stands in for the ones it has not seen yet
    (as Gymnasium's `FrameStackObservation` pads with the reset's observation): at a real episode's first frame, in
    `stack_history` over a recorded episode, and in a dream started there. A dream started further into a real
    episode starts from the real grids before it instead (the dream env's `info["context_tokens"]`)."""

    def __init__(self, frames: int):
        if frames < 1:
            raise ValueError(f"a history holds at least 1 frame, got frames={frames}")
        self.frames = frames
        self.grids: torch.Tensor | None = None

    def start(self, tokens: torch.Tensor, rows: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Begin the episodes of `rows` (all when None) at their first grids `tokens` (len(rows), h, w), or at the
        grids up to it, oldest first (len(rows), C, h, w), whose oldest stands in for any more the history holds;
        returns the whole batch's history."""
        if tokens.dim() == 3:
            tokens = tokens[:, None]
        filled = latest_grids(tokens, self.frames)
        if rows is None:
            self.grids = filled.clone()
        elif self.grids is None:
            raise ValueError("the first start of a history covers every episode (rows=None)")
        else:
            self.grids[torch.as_tensor(rows, device=self.grids.device)] = filled
        return self.grids

    def then(self, tokens: torch.Tensor, rows: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """The history of `rows` (all when None) with `tokens` seen next, without keeping it (an episode's final
        observation, whose history PPO bootstraps from after the env has already restarted it)."""
        if self.grids is None:
            raise ValueError("start the history before stepping it")
        before = self.grids if rows is None else self.grids[torch.as_tensor(rows, device=self.grids.device)]
        return torch.cat([before[:, 1:], tokens[:, None]], dim=1)

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every episode saw its next grid, `tokens` (B, h, w); returns the history."""
        self.grids = self.then(tokens)
        return self.grids


def stack_history(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """(T, h, w) grids of one episode from its first frame -> (T, frames, h, w): at each step what a policy of
    `frames` frames saw there (`TokenHistory`)."""
    steps = torch.arange(len(tokens), device=tokens.device)
    back = torch.arange(1 - frames, 1, device=tokens.device)
    return tokens[(steps[:, None] + back[None]).clamp(min=0)]
