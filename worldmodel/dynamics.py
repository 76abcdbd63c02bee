"""Transformer dynamics: from past token grids and actions, predict every token of the next frame at once,
plus the reward and whether the episode terminates.

The sequence is one block of K + 1 positions per frame: the frame's K tokens, then the action taken after it.
Attention is block-causal: a position sees every position of its own frame's block and of earlier blocks,
so the outputs at frame t's token positions (which see action t) predict the tokens of frame t + 1, and the
output at the action position predicts termination (and the reward, with `reward_from="action"`; by default
a small head reads the reward from the token grids of frame t and t + 1). Time enters through rotary
embeddings over the frame index, so a sliding key/value cache stays valid as old frames drop out.

Predicting every token at once draws each token on its own: at a temperature above 0 neighbouring tokens need
not agree. An optional refiner (`refine_layers > 0`) re-predicts a frame's tokens given some of them, MaskGIT
style: a few layers of attention within the predicted frame, over the transformer's outputs for it plus the
embeddings of the tokens already decided (a mask embedding for the others). It trains on the same windows, with
a random fraction of the target frame's tokens revealed; `worldmodel.world_model.refine_tokens` samples with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class DynamicsConfig:
    vocab_size: int = 240
    tokens_per_frame: int = 64
    action_dim: int = 3
    """Width of a continuous action, or the number of discrete actions."""
    discrete_actions: bool = False
    patch: int = 1
    """Side of the square of neighbouring tokens that share one transformer position (1: one token each).
    Merging 2x2 tokens makes a frame 4x fewer positions, so training and imagination cost about 4x less."""
    context_frames: int = 8
    """Frames a position may attend to (its own and the previous ones): the training window and the cache size."""
    d_model: int = 128
    layers: int = 3
    heads: int = 4
    dropout: float = 0.0
    action_every_layer: bool = True
    """Also add a per-layer projection of the action to every position of its frame's block before each layer,
    so the next-frame predictions are conditioned on the action directly, not only by attending to it."""
    reward_from: Literal["action", "transition"] = "transition"
    """Where the reward is read: at the action position (it sees the frames so far and the action), or by a
    small convolutional head over the token grids of the frame and the next one, so that the reward can follow
    only from what the transition shows. The second takes away a shortcut of confounded data: if the expert
    steers one way more often while on the road, the action itself looks rewarding."""
    reward_width: int = 48
    """Channels of the transition reward head's token embedding and convolutions."""
    reward_weight: float = 1.0
    termination_weight: float = 0.1
    refine_layers: int = 0
    """Layers of the MaskGIT-style refiner over one predicted frame (0: none; sampling is one shot)."""
    refine_weight: float = 1.0

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.tokens_per_frame)

    @property
    def positions_per_frame(self) -> int:
        return self.tokens_per_frame // self.patch**2

    @property
    def block_size(self) -> int:
        return self.positions_per_frame + 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def validate(self) -> None:
        if self.d_model % self.heads or self.head_dim % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.heads} heads of even width")
        if self.grid_size**2 != self.tokens_per_frame or self.grid_size % self.patch:
            raise ValueError(
                f"tokens_per_frame {self.tokens_per_frame} must be a square grid whose side is "
                f"divisible by patch {self.patch}"
            )
        if self.refine_layers < 0:
            raise ValueError(f"refine_layers must be >= 0, got {self.refine_layers}")


def to_positions(x: torch.Tensor, config: DynamicsConfig) -> torch.Tensor:
    """(..., K, D) per-token features -> (..., K / patch^2, patch^2 * D): each patch's tokens side by side."""
    p, side = config.patch, config.grid_size // config.patch
    return rearrange(x, "... (h p1 w p2) d -> ... (h w) (p1 p2 d)", p1=p, p2=p, h=side)


def to_tokens(x: torch.Tensor, config: DynamicsConfig) -> torch.Tensor:
    """(..., K / patch^2, patch^2 * V) per-position outputs -> (..., K, V) per token; the inverse of `to_positions`."""
    p, side = config.patch, config.grid_size // config.patch
    return rearrange(x, "... (h w) (p1 p2 v) -> ... (h p1 w p2) v", p1=p, p2=p, h=side)


class TransitionReward(nn.Module):
    """The reward of a step from the token grids of its frame and of the next frame."""

    def __init__(self, config: DynamicsConfig):
        super().__init__()
        width = config.reward_width
        self.side = config.grid_size
        self.embedding = nn.Embedding(config.vocab_size, width)
        reduced = (self.side + 1) // 2
        self.net = nn.Sequential(
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(width * reduced * reduced, 1),
        )

    def forward(self, tokens: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """(..., K) tokens of a frame and of the next one -> (...) rewards."""
        lead = tokens.shape[:-1]
        pair = torch.cat([self.embedding(tokens), self.embedding(next_tokens)], dim=-1)  # (..., K, 2W)
        grid = rearrange(pair.reshape(-1, *pair.shape[-2:]), "n (h w) c -> n c h w", h=self.side)
        return self.net(grid).view(lead)


@dataclass
class DynamicsOutput:
    logits: torch.Tensor  # (B, T, K, V) next-frame token logits
    reward: torch.Tensor | None  # (B, T); None when the reward is read from the transition (`step_reward`)
    termination_logit: torch.Tensor  # (B, T)
    hidden: torch.Tensor  # (B, T, K / patch^2, D) the outputs the token logits were read from (for the refiner)


class KVCache:
    """Keys and values of the last `context_frames` frame blocks of each environment, as a ring of slots.

    A cached step writes its own block into the ring first and then attends to the ring as it stands, so no
    step copies the cache: the ring holds the new frame and the `context_frames - 1` before it, and the oldest
    frame's slot is the one overwritten. Each batch row keeps its own frame counter and validity mask, so rows
    can be reset independently. Keys are stored (layers, B, heads, slots, block, head_dim): one row's slot is
    one contiguous piece, and a layer's ring is a (B, heads, slots * block, head_dim) view for attention.
    """

    def __init__(self, config: DynamicsConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        self.config = config
        slots = config.context_frames
        shape = (config.layers, batch_size, config.heads, slots, config.block_size, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, slots, dtype=torch.bool, device=device)  # (B, S)
        self.position = torch.zeros(batch_size, dtype=torch.long, device=device)  # frame index of the next block
        self.slots = slots

    def reset_rows(self, rows: torch.Tensor) -> None:
        self.valid[rows] = False
        self.position[rows] = 0


class CachedStep:
    """One cached step of some rows of a `KVCache` (all of them when `rows` is None): making it claims each
    row's slot for the new block, `attend_to` stores a layer's new keys and values there and gives back what
    the layer attends to, `close` advances the rows' frame counters."""

    def __init__(self, cache: KVCache, rows: torch.Tensor | None):
        self.cache, self.rows = cache, rows
        position = cache.position if rows is None else cache.position[rows]
        self.positions = position
        self.slot = position % cache.slots  # (b,)
        self.index = torch.arange(len(position), device=position.device) if rows is None else rows
        cache.valid[self.index, self.slot] = True
        valid = cache.valid if rows is None else cache.valid[rows]
        block = cache.config.block_size
        self.mask = valid.repeat_interleave(block, dim=1)[:, None, None, :]  # (b, 1, 1, S * block)
        self._bias: torch.Tensor | None = None

    def bias(self, heads: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask as a (b * heads, 1, S * block) additive bias (0 or -inf), made once for all layers."""
        if self._bias is None or self._bias.dtype != dtype:
            bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            bias.masked_fill_(~self.mask, -math.inf)
            self._bias = bias.expand(-1, heads, -1, -1).reshape(-1, 1, self.mask.shape[-1])
        return self._bias

    def attend_to(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (b, H, block, Dh) keys and values of `layer`; returns the (b, H, S * block, Dh) ring."""
        cache = self.cache
        keys, values = cache.keys[layer], cache.values[layer]
        keys[self.index, :, self.slot] = k.to(keys.dtype)
        values[self.index, :, self.slot] = v.to(values.dtype)
        if self.rows is not None:
            keys, values = keys[self.rows], values[self.rows]
        return keys.flatten(2, 3), values.flatten(2, 3)

    def close(self) -> None:
        if self.rows is None:
            self.cache.position += 1
        else:
            self.cache.position[self.rows] += 1


Rope = tuple[torch.Tensor, torch.Tensor]


def rotary_angles(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> Rope:
    """(B, L) frame positions -> the cos and sin (each (B, 1, L, head_dim / 2)) that `rotary` turns by; one
    forward pass computes them once for all its layers."""
    half = head_dim // 2
    # float64 angles: an unbounded dream's positions keep growing, and in float32 the angle of frame 100,000
    # is off by ~0.004 rad, enough to change which frame a query prefers; the tensor is small either way
    freqs = 1.0 / (10000 ** (torch.arange(half, device=positions.device, dtype=torch.float64) / half))
    angles = positions[:, None, :, None].double() * freqs
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate (B, H, L, Dh) queries or keys by the angles of their frame positions (`rotary_angles`)."""
    cos, sin = rope
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: CachedStep) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked) v for one new block against the ring, as two batched matmuls over
    (batch x heads). On the CPU this is 2x (bf16) the speed of SDPA's flash kernel for these short queries
    (17 queries against 102 keys, batch 256: 2.5 ms against 6.1 on the 2-core machine); elsewhere SDPA."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask)
    b, h, length, d = q.shape
    bias = step.bias(h, q.dtype)
    scores = torch.baddbmm(bias, q.reshape(b * h, length, d), keys.reshape(b * h, -1, d).transpose(1, 2), alpha=d**-0.5)
    weights = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)  # normalised in float32, as SDPA does
    return torch.bmm(weights, values.reshape(b * h, -1, d)).view(b, h, length, d)


class Attention(nn.Module):
    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None, step: CachedStep | None, layer: int
    ) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.config.heads)
        if rope is not None:
            q, k = rotary(q, rope), rotary(k, rope)
        if step is None:
            dropout = self.config.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            out = cached_attention(q, *step.attend_to(layer, k, v), step)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class Block(nn.Module):
    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model), nn.GELU(), nn.Linear(4 * config.d_model, config.d_model)
        )

    def forward(self, x, rope, mask, step=None, layer=0):
        x = x + self.attn(self.norm1(x), rope, mask, step, layer)
        return x + self.mlp(self.norm2(x))


class Refiner(nn.Module):
    """Next-frame token logits given some of the frame's tokens: attention within the frame over the dynamics
    model's outputs for it plus the embeddings of the known tokens (a mask embedding for the unknown ones)."""

    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.config = config
        d, merged = config.d_model, config.patch**2
        self.mask_id = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size + 1, d)
        self.merge = nn.Linear(merged * d, d) if merged > 1 else nn.Identity()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.refine_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, merged * config.vocab_size)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """hidden (N, K / patch^2, D), tokens (N, K) and known (N, K) bool -> (N, K, V) logits."""
        ids = torch.where(known, tokens, self.mask_id)
        x = hidden + self.merge(to_positions(self.token_embedding(ids), self.config).to(hidden.dtype))
        for block in self.blocks:  # no rotation: the hidden states carry place
            x = block(x, None, None)
        return to_tokens(self.head(self.norm(x)), self.config)


class DynamicsModel(nn.Module):
    """Block-causal transformer over (frame tokens, action) blocks; see the module docstring."""

    def __init__(self, config: DynamicsConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.d_model
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        merged = config.patch**2
        self.merge = nn.Linear(merged * d, d) if merged > 1 else nn.Identity()
        if config.discrete_actions:
            self.action_embedding: nn.Module = nn.Embedding(config.action_dim, d)
        else:
            self.action_embedding = nn.Linear(config.action_dim, d)
        self.slot_embedding = nn.Parameter(torch.randn(config.block_size, d) * 0.02)  # spatial position in a block
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.action_inject = (
            nn.ModuleList(nn.Linear(d, d) for _ in range(config.layers)) if config.action_every_layer else None
        )
        self.norm = nn.LayerNorm(d)
        self.token_head = nn.Linear(d, merged * config.vocab_size)
        by_action = config.reward_from == "action"
        self.reward_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1)) if by_action else None
        self.transition_reward = None if by_action else TransitionReward(config)
        self.termination_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.refiner = Refiner(config) if config.refine_layers else None

    def embed(self, tokens: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, K) tokens and (B, T, A) or (B, T) actions -> the sequence (B, T * (K / patch^2 + 1), D) and the
        action embeddings (B, T, D)."""
        frames = self.merge(to_positions(self.token_embedding(tokens), self.config))  # (B, T, K / p^2, D)
        if self.config.discrete_actions:
            acts = self.action_embedding(actions.long())
        else:
            acts = self.action_embedding(actions.to(frames.dtype))
        x = torch.cat([frames, acts.unsqueeze(2)], dim=2) + self.slot_embedding  # (B, T, K + 1, D)
        return rearrange(x, "b t k d -> b (t k) d"), acts

    def block_causal_mask(self, frames: int, device: torch.device) -> torch.Tensor:
        """(T * (K + 1), T * (K + 1)) bool: True where attention is allowed (same or earlier frame, in context)."""
        frame = torch.arange(frames, device=device).repeat_interleave(self.config.block_size)
        gap = frame[:, None] - frame[None, :]
        return (gap >= 0) & (gap < self.config.context_frames)

    def forward(
        self,
        tokens: torch.Tensor,
        actions: torch.Tensor,
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
    ) -> DynamicsOutput:
        """Predict the next frame, reward and termination for each of T new frames.

        Without a cache, T frames attend block-causally to each other (training). With a cache, the T new
        frames of the selected `rows` also attend to the cached frames, and their keys and values are
        stored (one frame at a time when T > 1 is not supported: pass T = 1 with a cache).
        """
        config = self.config
        batch, steps = tokens.shape[:2]
        x, acts = self.embed(tokens, actions)
        step = None
        if cache is None:
            positions = torch.arange(steps, device=x.device).repeat_interleave(config.block_size).expand(batch, -1)
            mask = self.block_causal_mask(steps, x.device)
        else:
            if steps != 1:
                raise ValueError(f"a cached step takes one frame per row, got {steps}")
            step = CachedStep(cache, rows)
            positions, mask = step.positions[:, None].expand(-1, config.block_size), None
        rope = rotary_angles(positions, config.head_dim, x.dtype)
        for layer, block in enumerate(self.blocks):
            if self.action_inject is not None:
                injected = (
                    rearrange(x, "b (t k) d -> b t k d", k=config.block_size)
                    + self.action_inject[layer](acts)[:, :, None]
                )
                x = rearrange(injected, "b t k d -> b (t k) d")
            x = block(x, rope, mask, step, layer)
        if step is not None:
            step.close()
        x = rearrange(self.norm(x), "b (t k) d -> b t k d", k=config.block_size)
        return DynamicsOutput(
            logits=to_tokens(self.token_head(x[:, :, :-1]), config),
            reward=self.reward_head(x[:, :, -1]).squeeze(-1) if self.reward_head is not None else None,
            termination_logit=self.termination_head(x[:, :, -1]).squeeze(-1),
            hidden=x[:, :, :-1],
        )

    def refine(self, hidden: torch.Tensor, tokens: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """(..., K, V) logits of the next frame's tokens given the `known` ones ((..., K) bool) of `tokens`
        ((..., K)); `hidden` is `DynamicsOutput.hidden` of the same frames."""
        if self.refiner is None:
            raise ValueError("this dynamics model has no refiner (it was trained with refine_layers=0)")
        count = tokens.shape[-1]
        logits = self.refiner(
            hidden.reshape(-1, *hidden.shape[-2:]), tokens.reshape(-1, count), known.reshape(-1, count)
        )
        return logits.view(*tokens.shape, -1)

    def refine_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Cross-entropy of the refiner on the hidden tokens of `target` ((..., K)), each frame revealing a random
        fraction of its tokens: the hidden fraction is cos(pi u / 2) for uniform u, MaskGIT's schedule, and at
        least one token is hidden. Returns the loss and the accuracy on the hidden tokens."""
        scores = torch.rand(target.shape, device=target.device)
        hidden_fraction = torch.cos(torch.rand(*target.shape[:-1], 1, device=target.device) * math.pi / 2)
        masked = (scores < hidden_fraction) | (scores == scores.amin(-1, keepdim=True))
        logits = self.refine(hidden, target, ~masked)
        loss = F.cross_entropy(logits[masked].float(), target[masked])
        with torch.no_grad():
            accuracy = (logits[masked].argmax(-1) == target[masked]).float().mean().item()
        return loss, accuracy

    def step_reward(self, out: DynamicsOutput, tokens: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) rewards of steps from `tokens` to `next_tokens` ((B, T, K) each; `out` is the forward pass that
        took them): read at the action position, or from the token pair (see `DynamicsConfig.reward_from`)."""
        if self.transition_reward is None:
            return out.reward
        return self.transition_reward(tokens, next_tokens)

    def new_cache(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        param = next(self.parameters())
        return KVCache(self.config, batch_size, device or param.device, dtype or param.dtype)

    def loss(
        self,
        tokens: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Teacher-forced losses on a window: tokens (B, T+1, K), actions (B, T, ...), rewards/terminated (B, T);
        `valid` (B, T) bool leaves the steps where it is False out of every loss and figure (windows padded past
        their episode's end; the attention is causal, so the steps before never see them)."""
        out = self(tokens[:, :-1], actions)
        target = tokens[:, 1:]
        logits, hidden, inputs = out.logits, out.hidden, tokens[:, :-1]
        reward = self.step_reward(out, inputs, target)
        termination = out.termination_logit
        if valid is not None:
            logits, hidden, inputs, target = logits[valid], hidden[valid], inputs[valid], target[valid]
            reward, rewards, termination, terminated = (
                reward[valid],
                rewards[valid],
                termination[valid],
                terminated[valid],
            )
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
        reward_loss = F.mse_loss(reward.float(), rewards.float())
        termination_loss = F.binary_cross_entropy_with_logits(termination.float(), terminated.float())
        loss = token_loss + self.config.reward_weight * reward_loss + self.config.termination_weight * termination_loss
        figures = {}
        if self.refiner is not None:
            refine_loss, figures["refine_accuracy"] = self.refine_loss(hidden, target)
            figures["refine_ce"] = refine_loss.item()
            loss = loss + self.config.refine_weight * refine_loss
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == target).float().mean().item()
            copy_accuracy = (inputs == target).float().mean().item()
        return loss, {
            "loss": loss.item(),
            "token_ce": token_loss.item(),
            "reward_mse": reward_loss.item(),
            "termination_bce": termination_loss.item(),
            "token_accuracy": accuracy,
            "copy_last_accuracy": copy_accuracy,
            **figures,
        }

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(batch["tokens"], batch["actions"], batch["rewards"], batch["terminated"], batch.get("valid"))
