"""A trained world model as one object: tokenizer, dynamics, the action space and real context episodes."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from worldmodel.checkpoint import CheckpointError, fingerprint
from worldmodel.config import ConfigError, whole
from worldmodel.dataset import space_from_dict
from worldmodel.dynamics import DynamicsModel, KVCache
from worldmodel.run_dir import RunDir
from worldmodel.tokenizer import Tokenizer
from worldmodel.tokens import TokenizedDataset
from worldmodel.train import load_dynamics, load_tokenizer


@dataclass
class StepPrediction:
    tokens: torch.Tensor  # (b, h, w) next frame
    reward: torch.Tensor  # (b,)
    terminated: torch.Tensor  # (b,) bool
    end_probability: torch.Tensor  # (b,) the termination head's probability that the episode ends here


def token_grid_space(grid_size: int, codebook_size: int) -> gym.spaces.MultiDiscrete:
    """What a policy that reads token grids observes: a (grid, grid) grid of codebook indices."""
    return gym.spaces.MultiDiscrete(np.full((grid_size, grid_size), codebook_size, dtype=np.int64))


def check_sampling(temperature: float, top_k: int | None, refine_steps: int = 0) -> None:
    """Refuse sampling options `sample_tokens` and `refine_tokens` cannot use, saying what they take."""
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive number of tokens or None, got {top_k}")
    if not whole(refine_steps, 0):
        raise ValueError(f"refine_steps must be an integer >= 0, got {refine_steps!r}")


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(..., V) logits -> (...) tokens: the most likely one at temperature 0, otherwise a draw from the softmax
    at `temperature`, restricted to the `top_k` most likely tokens when given (exactly k, ties broken by
    `topk`)."""
    check_sampling(temperature, top_k)
    logits = logits.float()
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    indices = None
    if top_k is not None and top_k < logits.shape[-1]:
        logits, indices = logits.topk(top_k, dim=-1)  # draw among the k, then map back to token ids
    # inverse-CDF draw, one uniform per token against the cumulative softmax: several times faster than
    # torch.multinomial on the CPU (docs/bench_dynamics.md has the figures)
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)
    uniform = torch.rand((*cdf.shape[:-1], 1), generator=generator, device=cdf.device, dtype=cdf.dtype)
    drawn = torch.searchsorted(cdf, uniform * cdf[..., -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    return (drawn if indices is None else indices.gather(-1, drawn))[..., 0]


@dataclass(frozen=True)
class Sampling:
    """How a dream draws each next frame's tokens: `sample_tokens` at `temperature` among the `top_k` likeliest,
    then `refine_steps` rounds of `refine_tokens` (needs a dynamics model with a refiner). Greedy by default;
    `WorldModel.check_sampling` refuses what a model cannot do."""

    temperature: float = 0.0
    top_k: int | None = None
    refine_steps: int = 0
    sample_ends: bool = False
    """False: an imagined step ends its episode where the termination head's probability is above one half;
    True: it ends with that probability, drawn with the dream's generator, so a risk of 30% ends 30% of the dreams
    that run it instead of none."""


def hidden_after(step: int, steps: int, tokens: int) -> int:
    """Tokens left to re-predict after keeping the confident ones in refinement round `step` of `steps`:
    MaskGIT's cosine schedule over the one-shot prediction and the `steps` rounds after it."""
    return math.floor(tokens * math.cos(math.pi / 2 * step / (steps + 1)))


def refine_tokens(
    logits: torch.Tensor,
    repredict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(b, K, V) one-shot logits -> (b, K) tokens after `steps` rounds of MaskGIT-style refinement.

    Draw every token from `logits`; then, each round, keep the most confident tokens (the likeliest under the
    logits they were drawn from; kept tokens stay kept) and draw the others again from `repredict(tokens,
    known)`, which gives (b, K, V) logits given the `known` (b, K) ones. The number re-drawn shrinks by
    `hidden_after`; with `steps=0` this is `sample_tokens(logits)`."""
    tokens = sample_tokens(logits, temperature, top_k, generator)
    if steps == 0:
        return tokens
    count = tokens.shape[-1]
    confidence = logits.float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    known = torch.zeros_like(tokens, dtype=torch.bool)
    for step in range(1, steps + 1):
        keep = count - hidden_after(step, steps, count)
        ranked = confidence.masked_fill(known, float("inf")).sort(dim=-1, descending=True, stable=True).indices
        known = torch.zeros_like(known).scatter_(-1, ranked[:, :keep], True)
        logits = repredict(tokens, known)
        drawn = sample_tokens(logits, temperature, top_k, generator)
        tokens = torch.where(known, tokens, drawn)
        drawn_confidence = logits.float().log_softmax(-1).gather(-1, drawn[..., None])[..., 0]
        confidence = torch.where(known, confidence, drawn_confidence)
    return tokens


class WorldModel:
    """Load with `WorldModel.load(run_dir)`; `imagine` advances a batch of dreams by one step."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        dynamics: DynamicsModel,
        action_space: gym.Space,
        contexts: TokenizedDataset | None,
        meta: dict,
        decode_dtype: torch.dtype = torch.float32,
    ):
        self.decode_dtype = decode_dtype
        self.tokenizer = tokenizer
        self.dynamics = dynamics
        self.action_space = action_space
        self.contexts = contexts
        self.meta = meta

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu", with_contexts: bool = True) -> WorldModel:
        """Read `<run>/tokenizer.*`, `<run>/dynamics.*` and (for resets) `<run>/tokens.npz`."""
        run = RunDir(run_dir)
        if not run.root.is_dir():
            raise CheckpointError(f"{run.root} is not a run folder (expected tokenizer and dynamics checkpoints in it)")
        tokenizer, _ = load_tokenizer(run.tokenizer, device)
        current = fingerprint(tokenizer)
        dynamics, meta = load_dynamics(run.dynamics, current, device)
        contexts = None
        if with_contexts:
            contexts = TokenizedDataset.load(run.tokens)
            if contexts.tokenizer_fingerprint != current:
                raise CheckpointError(f"{run.tokens} was made by another tokenizer; delete it to re-tokenize")
            held_out = set(meta.get("val_episodes", []))
            train_ids = [int(e) for e in contexts.episode_ids if int(e) not in held_out]
            if not train_ids:
                raise CheckpointError(f"{run.tokens} holds no training episodes to start dreams from")
            contexts = contexts.select(train_ids)
        return cls(tokenizer, dynamics, space_from_dict(meta["action_space"]), contexts, meta)

    def with_dtype(self, dtype: torch.dtype | str) -> WorldModel:
        """This model computing in `dtype` (itself when it already does): float32 is the plain path; bfloat16 (or
        "bf16") a copy whose dynamics weights and cache are bf16 and whose decoder runs under bf16 autocast in
        channels-last layout (the fast path on CPUs with AVX-512 BF16 and on GPUs). The transition reward head
        and sampling stay float32."""
        names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        wanted = names.get(dtype) if isinstance(dtype, str) else dtype
        if wanted not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"a world model computes in float32 or bfloat16 ({sorted(names)}), got {dtype!r}")
        if wanted == next(self.dynamics.parameters()).dtype and wanted == self.decode_dtype:
            return self
        tokenizer = copy.deepcopy(self.tokenizer)
        if wanted == torch.bfloat16:
            tokenizer = tokenizer.to(memory_format=torch.channels_last)
        dynamics = copy.deepcopy(self.dynamics).to(wanted)
        if dynamics.transition_reward is not None:
            dynamics.transition_reward.float()  # it reads token ids, not the transformer's activations
        return WorldModel(tokenizer, dynamics, self.action_space, self.contexts, self.meta, decode_dtype=wanted)

    decode_chunk: int = 32
    """Frames decoded per pass on the CPU. The decoder's full-resolution activations of 256 frames do not fit in
    the caches: on a 2-core CPU, chunks of 32 decoded 2.9x (fp32) and 2.0x (bf16) as many frames per second."""

    @torch.no_grad()
    def frames(self, tokens: torch.Tensor, check: bool = True) -> torch.Tensor:
        """(B, h, w) tokens -> (B, H, W, C) uint8 frames, decoded in this model's precision (`check`: as
        `Tokenizer.tokens_to_frames`; the dream skips it for the tokens it predicted)."""
        if check:
            tokens = self.tokenizer.check_tokens(tokens)
        device_type = self.device.type
        chunk = self.decode_chunk if device_type == "cpu" else len(tokens)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.decode_dtype == torch.bfloat16):
            if len(tokens) <= chunk:
                return self.tokenizer.tokens_to_frames(tokens, check=False)
            return torch.cat([self.tokenizer.tokens_to_frames(part, check=False) for part in tokens.split(chunk)])

    def check_sampling(self, sampling: Sampling) -> None:
        """Refuse sampling options this model cannot use (`ConfigError`, a ValueError), saying what it takes."""
        try:
            check_sampling(sampling.temperature, sampling.top_k, sampling.refine_steps)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if sampling.refine_steps and self.dynamics.refiner is None:
            raise ConfigError(
                f"refine_steps={sampling.refine_steps} needs a dynamics model trained with a refiner "
                "(dynamics.model.refine_layers > 0); this one has none, so use refine_steps=0"
            )

    @property
    def device(self) -> torch.device:
        return next(self.dynamics.parameters()).device

    @property
    def grid_size(self) -> int:
        return self.tokenizer.config.grid_size

    def action_tensor(self, actions: np.ndarray) -> torch.Tensor:
        dtype = torch.long if isinstance(self.action_space, gym.spaces.Discrete) else torch.float32
        return torch.as_tensor(np.array(actions), dtype=dtype, device=self.device)  # a copy: inputs may be read-only

    @torch.no_grad()
    def imagine(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        actions: torch.Tensor,
        rows: torch.Tensor | None = None,
        sampling: Sampling = Sampling(),
        generator: torch.Generator | None = None,
    ) -> StepPrediction:
        """One imagined step for `rows`: tokens (b, h, w) of the current frames and actions (b, ...) taken.

        The next frame's tokens are drawn as `sampling` says (greedy by default)."""
        out = self.dynamics(tokens.flatten(1)[:, None], actions[:, None], cache, rows)
        hidden = out.hidden[:, 0]
        next_tokens = refine_tokens(
            out.logits[:, 0],
            lambda draft, known: self.dynamics.refine(hidden, draft, known),
            sampling.refine_steps,
            sampling.temperature,
            sampling.top_k,
            generator,
        )
        reward = self.dynamics.step_reward(out, tokens.flatten(1)[:, None], next_tokens[:, None])[:, 0]
        logit = out.termination_logit[:, 0]
        probability = torch.sigmoid(logit.float())
        if sampling.sample_ends:
            terminated = torch.rand(logit.shape, generator=generator, device=logit.device) < probability
        else:
            terminated = logit > 0
        return StepPrediction(next_tokens.view(tokens.shape), reward.float(), terminated, probability)

    @torch.no_grad()
    def burn_in(self, cache: KVCache, tokens: torch.Tensor, actions: torch.Tensor, rows: torch.Tensor) -> None:
        """Reset `rows` and feed them real context: tokens (b, C, h, w), actions (b, C - 1, ...)."""
        cache.reset_rows(rows)
        for step in range(actions.shape[1]):
            self.dynamics(tokens[:, step].flatten(1)[:, None], actions[:, step][:, None], cache, rows)
