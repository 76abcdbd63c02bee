"""The learned world model as a Gymnasium environment: `DreamVectorEnv` steps a batch of dreams with one
forward pass; `DreamEnv` is the single-environment view of it.

Each dream starts from real context frames sampled from the run's dataset (its first frames and actions are
fed to the model, the last frame is the first observation). `step` predicts the next frame's tokens, the
reward and termination; dreams are truncated at `horizon` steps. `reset(options={"frames": ..., "actions": ...})`
starts from the caller's own real frames instead (see `DreamVectorEnv._reset_from_context`). Wherever a dream starts,
`info["context_tokens"]` holds the token grids it started from (`DreamVectorEnv.context_tokens`). Actions outside a
Box's bounds are clipped (as the real simulators do); actions of the wrong shape or dtype, or NaN/inf, and
context frames of the wrong size raise ValueError. A step before the first reset, or (autoreset disabled, as in
`DreamEnv`) a step of a dream that ended and was not reset, raises `gymnasium.error.ResetNeeded`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from worldmodel.checkpoint import CheckpointError
from worldmodel.config import whole
from worldmodel.runtime import keep_freed_memory
from worldmodel.tokens import latest_grids
from worldmodel.world_model import Sampling, WorldModel, token_grid_space

ObsMode = Literal["tokens", "pixels"]

SHIPPED_MODEL = Path(__file__).parent / "shipped" / "carracing"
"""The CarRacing world model installed with the package (`worldmodel export`, docs/shipped_model.md): what the
dream envs load when no checkpoint is given."""


def load_world_model(checkpoint: str | Path | WorldModel | None, device: str = "cpu") -> WorldModel:
    """`checkpoint` as a world model: a run folder is loaded, None loads the shipped model."""
    if isinstance(checkpoint, WorldModel):
        return checkpoint
    if checkpoint is None:
        if not (SHIPPED_MODEL / "dynamics.json").is_file():
            raise CheckpointError(
                f"no checkpoint given and the shipped world model is missing ({SHIPPED_MODEL}); "
                "reinstall the package, or pass checkpoint=RUN_DIR"
            )
        checkpoint = SHIPPED_MODEL
    return WorldModel.load(checkpoint, device)


def _number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _array(value: Any, expected: str) -> np.ndarray:
    """`value` as a numpy array; a ragged sequence (rows of different lengths) is refused with `expected`, not with
    numpy's message about inhomogeneous shapes."""
    try:
        return np.asarray(value)
    except ValueError:
        raise ValueError(f"expected {expected}, got a ragged sequence (rows of different lengths)") from None


@dataclass
class DreamSettings:
    """How a dream is stepped, declared once: the dream envs take these (as keywords, or as `settings`), PPO's
    config extends them (`agents.ppo.PPOConfig`), and the benches step dreams with a run's own."""

    horizon: int = 64
    """Imagined steps before a dream is truncated (and, in PPO, restarted from real context)."""
    burn_in: int | None = None
    """Real frames fed before the policy acts (None: 4, or the model's context length if that is shorter)."""
    start_fraction: float = 0.0
    """Fraction of dreams that begin at an episode's first frame with no context, the policy in control from the
    first step (real episodes all start there, standing still)."""
    temperature: float = 0.0
    """0: the likeliest token everywhere; above 0: tokens drawn from the softmax at this temperature."""
    top_k: int | None = None
    """With a temperature above 0, draw among the `top_k` likeliest tokens only (None: all)."""
    refine_steps: int = 0
    """MaskGIT-style refinement rounds of each imagined frame (needs a dynamics model with a refiner)."""
    sample_ends: bool = False
    """False: a dream ends where the termination head says more likely than not; True: it ends with the head's
    probability (`Sampling.sample_ends`), so a policy pays for moderate risks too."""
    dtype: str | None = None
    """The dream's precision: None keeps the model's own (float32 for a loaded checkpoint), or bfloat16
    (`WorldModel.with_dtype`)."""

    def validate(self) -> None:
        """ValueError naming the first setting no dream could run with (its range is checked against the model's
        context by `context_for`, the sampling's by `WorldModel.check_sampling`)."""
        checks = (
            ("horizon", whole(self.horizon, 1), "an integer >= 1"),
            ("burn_in", self.burn_in is None or whole(self.burn_in), "None or an integer"),
            ("start_fraction", _number(self.start_fraction) and 0 <= self.start_fraction <= 1, "a fraction in [0, 1]"),
            ("temperature", _number(self.temperature), "a number >= 0"),
            ("top_k", self.top_k is None or whole(self.top_k), "None or an integer >= 1"),
            ("refine_steps", whole(self.refine_steps), "an integer >= 0"),
            ("sample_ends", isinstance(self.sample_ends, bool), "True or False"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

    def context_for(self, model_context: int) -> int:
        """The real frames a dream starts from with a model that takes `model_context` frames: `burn_in`, or 4
        (at most `model_context`) when it is None; ValueError outside [1, model_context]."""
        burn_in = min(4, model_context) if self.burn_in is None else self.burn_in
        if burn_in < 1 or burn_in > model_context:
            raise ValueError(f"burn_in must be in [1, {model_context}], got {burn_in}")
        return burn_in

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.refine_steps, self.sample_ends)

    def dream(self) -> DreamSettings:
        """Just the dream's settings (of a config that extends them, such as PPO's)."""
        return DreamSettings(**{f.name: getattr(self, f.name) for f in fields(DreamSettings)})


def dream_settings(settings: DreamSettings | None, overrides: dict[str, Any]) -> DreamSettings:
    """`settings` (or the defaults) with keyword `overrides`; an unknown keyword is refused, naming the known."""
    if settings is not None and not isinstance(settings, DreamSettings):
        raise TypeError(f"settings must be a DreamSettings, got {settings!r}; pass horizon, burn_in, ... as keywords")
    base = settings.dream() if settings is not None else DreamSettings()
    known = {f.name for f in fields(DreamSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown dream setting(s) {unknown}; expected some of {sorted(known)}")
    chosen = replace(base, **overrides)
    chosen.validate()
    return chosen


def check_actions(actions: Any, space: gym.Space, batch: int | None) -> np.ndarray:
    """Validate `batch` actions for `space`, or one unbatched action when `batch` is None (the single env's); returns
    them as an array (Box actions clipped). The error says what the caller's own space expects."""
    if isinstance(space, gym.spaces.Discrete):
        shape = () if batch is None else (batch,)
        expected = (
            f"one integer action in [0, {space.n})"
            if batch is None
            else f"{batch} integer action(s) in [0, {space.n}) with shape {shape}"
        )
        array = _array(actions, expected)
        if array.dtype.kind not in "iu" or array.shape != shape:
            raise ValueError(f"expected {expected}, got {array.dtype} array of shape {array.shape}")
        if array.size and (array.min() < 0 or array.max() >= space.n):  # none at all: a context of one frame
            raise ValueError(f"expected {expected}, got {array.tolist()}")
        return array.astype(np.int64)
    shape = space.shape if batch is None else (batch, *space.shape)
    kind = "a float action" if batch is None else "float actions"
    expected = f"{kind} of shape {shape} within {space.low.tolist()}..{space.high.tolist()}"
    array = _array(actions, expected)
    if array.dtype.kind not in "fiu" or array.shape != shape:
        raise ValueError(f"expected {expected}, got {array.dtype} array of shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"expected {expected}, got NaN or infinite values")
    return np.clip(array.astype(np.float32), space.low, space.high)


class DreamVectorEnv(gym.vector.VectorEnv):
    """`num_envs` dreams stepped together; Gymnasium's NEXT_STEP (default), SAME_STEP or DISABLED autoreset."""

    metadata = {"render_modes": ["rgb_array"], "autoreset_mode": AutoresetMode.NEXT_STEP, "render_fps": 12}

    def __init__(
        self,
        checkpoint: str | Path | WorldModel | None = None,
        num_envs: int = 16,
        obs_mode: ObsMode = "tokens",
        settings: DreamSettings | None = None,
        *,
        device: str = "cpu",
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        render_mode: str | None = None,
        max_episode_steps: int | None = None,
        **dream: Any,
    ):
        """`checkpoint`: a run folder, a loaded `WorldModel`, or None for the shipped CarRacing model. `dream`
        keywords are `DreamSettings` fields (horizon, burn_in, temperature, ...), over `settings`."""
        settings = dream_settings(settings, dream)
        if not whole(num_envs, 1):
            raise ValueError(f"num_envs: expected an integer >= 1, got {num_envs!r}")
        if max_episode_steps is not None and not whole(max_episode_steps, 1):
            raise ValueError(f"max_episode_steps: expected None or an integer >= 1, got {max_episode_steps!r}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(
                f"render_mode: expected None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        model = load_world_model(checkpoint, device)
        if settings.dtype is not None:
            model = model.with_dtype(settings.dtype)
        if model.device.type == "cpu":
            keep_freed_memory()  # a step's activations are MBs: without it each step page-faults them in again
        if model.contexts is None:
            raise ValueError("the dream env needs real context episodes (the run's tokens.npz)")
        if obs_mode not in ("tokens", "pixels"):
            raise ValueError(f"obs_mode must be 'tokens' or 'pixels', got {obs_mode!r}")
        burn_in = settings.context_for(model.dynamics.config.context_frames)
        self.model = model
        self.settings = settings
        self.num_envs = num_envs
        self.obs_mode = obs_mode
        self.horizon = max_episode_steps or settings.horizon
        self.burn_in = burn_in
        self.sampling = settings.sampling
        model.check_sampling(self.sampling)  # refuses bad options now, not mid-step
        self.start_fraction = settings.start_fraction
        self.context_weights: np.ndarray | None = None
        """Per episode of the model's contexts, how likely a dream starts there (None: uniformly over windows)."""
        self.render_mode = render_mode
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        grid = model.grid_size
        if obs_mode == "tokens":
            self.single_observation_space = token_grid_space(grid, model.dynamics.config.vocab_size)
        else:
            c = model.tokenizer.config
            self.single_observation_space = gym.spaces.Box(0, 255, (*c.image_shape, c.channels), np.uint8)
        self.single_action_space = model.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        device_ = model.device
        self._cache = model.dynamics.new_cache(num_envs)
        self._tokens = torch.zeros(num_envs, grid, grid, dtype=torch.long, device=device_)
        self.context_length = model.dynamics.config.context_frames
        self._context = torch.zeros(num_envs, self.context_length, grid, grid, dtype=torch.long, device=device_)
        self._steps = np.zeros(num_envs, dtype=np.int64)
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self._started = np.zeros(num_envs, dtype=bool)  # a dream never started has no frame to step from
        self._np_random, _ = gym.utils.seeding.np_random(None)
        self._generator = torch.Generator(device=device_)
        self._generator.manual_seed(int(self._np_random.integers(2**63 - 1)))

    def _reset_rows(self, rows: np.ndarray) -> None:
        # a `start_fraction` of the dreams begin at an episode's first frame with the policy in control from its
        # first step, as in the real simulator; the others get `burn_in` real frames from anywhere
        at_start = self.np_random.random(len(rows)) < self.start_fraction
        device = self.model.device
        for group, frames, start_fraction in ((rows[at_start], 1, 1.0), (rows[~at_start], self.burn_in, 0.0)):
            if len(group) == 0:
                continue
            window = self.model.contexts.sample(
                frames - 1, len(group), self.np_random, start_fraction, weights=self.context_weights
            )
            tokens = torch.as_tensor(window["tokens"], device=device)  # (b, frames, h, w)
            self._start_rows(group, tokens, self.model.action_tensor(window["actions"]))

    def _start_rows(self, rows: np.ndarray, tokens: torch.Tensor, actions: torch.Tensor) -> None:
        """Feed `rows` their real context, tokens (b, C, h, w) and actions (b, C - 1, ...); the last frame is their
        current one."""
        rows_t = torch.as_tensor(rows, device=self.model.device)
        self.model.burn_in(self._cache, tokens, actions, rows_t)
        self._tokens[rows_t] = tokens[:, -1]
        self._context[rows_t] = latest_grids(tokens, self.context_length)
        self._steps[rows] = 0
        self._needs_reset[rows] = False
        self._started[rows] = True

    def _reset_all(self, options: dict[str, Any] | None) -> np.ndarray:
        """Start dreams from the caller's frames (`options["frames"]`) or from the run's context episodes: every env,
        or those of `options["reset_mask"]` (a bool array of `num_envs`, as Gymnasium's vector envs take it). Returns
        the rows started."""
        if options is not None and not isinstance(options, dict):
            raise ValueError(
                "options: expected None or a dict of 'frames', 'actions' and 'reset_mask',"
                f" got {type(options).__name__}"
            )
        options = options or {}
        unknown = sorted(set(options) - {"frames", "actions", "reset_mask"})
        if unknown:
            raise ValueError(
                f"unknown reset option(s) {unknown}; expected 'frames' (with them, 'actions') and 'reset_mask'"
            )
        if "actions" in options and "frames" not in options:
            raise ValueError("options['actions'] are the actions between context frames: pass options['frames'] too")
        rows = np.arange(self.num_envs)
        if "reset_mask" in options:
            rows = np.flatnonzero(self._reset_mask(options["reset_mask"]))
        if "frames" in options:
            self._reset_from_context(options, rows)
        else:
            self._reset_rows(rows)
        return rows

    def _reset_mask(self, mask: Any) -> np.ndarray:
        """As Gymnasium's vector envs check it: TypeError for another type or dtype, ValueError for another shape."""
        expected = f"options['reset_mask']: expected a bool numpy array of shape ({self.num_envs},)"
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            got = f"a {mask.dtype} array" if isinstance(mask, np.ndarray) else type(mask).__name__
            raise TypeError(f"{expected}, got {got}")
        if mask.shape != (self.num_envs,):
            raise ValueError(f"{expected}, got shape {mask.shape}")
        if not mask.any():
            raise ValueError("options['reset_mask'] is all False: it names no dream to reset")
        return mask

    def _reset_from_context(self, options: dict[str, Any], rows: np.ndarray) -> None:
        """Start the dreams of `rows` from the caller's real frames: `options["frames"]` is (C, H, W, ch) uint8 (the
        same context for every env) or (num_envs, C, H, W, ch), and `options["actions"]` the C - 1 actions taken
        between them ((C - 1, ...) or (num_envs, C - 1, ...)); C may be 1 to the model's context length."""
        tokenizer, limit = self.model.tokenizer.config, self.model.dynamics.config.context_frames
        frame = (*tokenizer.image_shape, tokenizer.channels)
        expected = (
            f"context frames of shape (C, {', '.join(map(str, frame))}) or ({self.num_envs}, C, ...) uint8"
            f" with 1 <= C <= {limit}"
        )
        given = _array(options["frames"], expected)
        frames = given
        if frames.ndim == 4:
            frames = np.broadcast_to(frames, (self.num_envs, *frames.shape))
        if (
            frames.dtype != np.uint8
            or frames.ndim != 5
            or frames.shape[0] != self.num_envs
            or frames.shape[2:] != frame
            or not 1 <= frames.shape[1] <= limit
        ):
            raise ValueError(f"expected {expected}, got {given.dtype} {given.shape}")
        steps = frames.shape[1] - 1
        space = self.single_action_space
        one = tuple(space.shape)
        expected = (
            f"the {steps} action(s) taken between the {steps + 1} context frames, shaped"
            f" {(steps, *one)} or {(self.num_envs, steps, *one)}"
        )
        given = _array(options.get("actions", np.zeros((0, *one), space.dtype)), expected)
        actions = given
        if actions.ndim == len(one) + 1:
            actions = np.broadcast_to(actions, (self.num_envs, *actions.shape))
        if actions.shape != (self.num_envs, steps, *one):
            raise ValueError(f"expected {expected}, got shape {given.shape}")
        frames, actions = frames[rows], actions[rows]
        flat = check_actions(actions.reshape(-1, *one), space, len(rows) * steps)
        device = self.model.device
        with torch.no_grad():
            tokens = self.model.tokenizer.encode(torch.tensor(frames.reshape(-1, *frame), device=device)).tokens
        tokens = tokens.view(len(rows), steps + 1, *tokens.shape[1:])
        acts = self.model.action_tensor(flat.reshape(len(rows), steps, *one))
        self._start_rows(rows, tokens, acts)

    def context_tokens(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), context_length, h, w) the token grids each dream of `rows` (all when None) started from, oldest
        first, its first observation last; one that had fewer (an episode's first frame, or a caller's short
        context) repeats its oldest. The real past a policy that sees several frames looks back on
        (`agents.policy.TokenHistory`), in `info["context_tokens"]` at reset and wherever a dream restarts."""
        context = self._context if rows is None else self._context[torch.as_tensor(rows, device=self._context.device)]
        return context.cpu().numpy().copy()

    def _restarted_info(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The vector info of dreams `rows` that restarted this step: their `context_tokens`, masked."""
        if len(rows) == 0:
            return {}
        context = np.zeros((self.num_envs, *self._context.shape[1:]), dtype=np.int64)
        context[rows] = self.context_tokens(rows)
        mask = np.zeros(self.num_envs, dtype=bool)
        mask[rows] = True
        return {"context_tokens": context, "_context_tokens": mask}

    def _observe(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The observations of `rows` (all envs when None): token grids, or frames decoded from them."""
        tokens = self._tokens if rows is None else self._tokens[torch.as_tensor(rows, device=self._tokens.device)]
        if self.obs_mode == "tokens":
            return tokens.cpu().numpy().copy()  # a tensor on the CPU shares memory with .numpy()
        return self.model.frames(tokens, check=False).cpu().numpy()  # the model's own tokens

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        if isinstance(seed, list):
            seed = seed[0]
        if seed is not None:
            self._np_random, _ = gym.utils.seeding.np_random(seed)
            self._generator.manual_seed(int(seed))
        rows = self._reset_all(options)
        if options is not None and "reset_mask" in options:
            return self._observe(), self._restarted_info(rows)
        return self._observe(), {"context_tokens": self.context_tokens()}

    def step(self, actions: Any):
        return self._step(check_actions(actions, self.single_action_space, self.num_envs))

    def _step(self, actions: np.ndarray):
        """`step` of actions already checked (`check_actions`)."""
        if not self._started.all():
            waiting = np.flatnonzero(~self._started).tolist()
            raise gym.error.ResetNeeded(f"dream(s) {waiting} never started: call reset() before step()")
        if self.autoreset_mode == AutoresetMode.DISABLED and self._needs_reset.any():
            ended = np.flatnonzero(self._needs_reset).tolist()
            raise gym.error.ResetNeeded(
                f"dream(s) {ended} ended and autoreset is disabled: reset them"
                " (options={'reset_mask': mask} for some) before stepping again"
            )
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        active = np.flatnonzero(~self._needs_reset)
        if len(active):
            rows = None if len(active) == self.num_envs else torch.as_tensor(active, device=self.model.device)
            current = self._tokens if rows is None else self._tokens[rows]
            prediction = self.model.imagine(
                self._cache,
                current,
                self.model.action_tensor(actions[active]),
                rows,
                self.sampling,
                self._generator,
            )
            if rows is None:
                self._tokens = prediction.tokens
            else:
                self._tokens[rows] = prediction.tokens
            rewards[active] = prediction.reward.cpu().numpy()
            terminated[active] = prediction.terminated.cpu().numpy()
            self._steps[active] += 1
            truncated[active] = self._steps[active] >= self.horizon
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            resets = np.flatnonzero(self._needs_reset)
            if len(resets):
                self._reset_rows(resets)
            self._needs_reset = terminated | truncated
            return self._observe(), rewards, terminated, truncated, self._restarted_info(resets)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset = terminated | truncated
            return self._observe(), rewards, terminated, truncated, {}
        done = np.flatnonzero(terminated | truncated)
        observed = self._observe()
        infos: dict[str, Any] = {}
        if len(done):
            final_obs = np.empty(self.num_envs, dtype=object)  # Gymnasium 1.x: the final obs where done, else None
            for row in done:
                final_obs[row] = observed[row].copy()
            self._reset_rows(done)
            observed[done] = self._observe(done)  # only the restarted dreams' observations changed
            infos = {"final_obs": final_obs, "_final_obs": terminated | truncated, **self._restarted_info(done)}
        return observed, rewards, terminated, truncated, infos

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self.model.frames(self._tokens[:1], check=False).cpu().numpy()[0]


class DreamEnv(gym.Env):
    """One dream: the single-environment view of `DreamVectorEnv` (same arguments, `num_envs=1`, no autoreset)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 12}

    def __init__(
        self,
        checkpoint: str | Path | WorldModel | None = None,
        obs_mode: ObsMode = "tokens",
        settings: DreamSettings | None = None,
        *,
        device: str = "cpu",
        render_mode: str | None = None,
        max_episode_steps: int | None = None,
        **dream: Any,
    ):
        self._vector = DreamVectorEnv(
            checkpoint,
            1,
            obs_mode,
            settings,
            device=device,
            autoreset_mode=AutoresetMode.DISABLED,
            render_mode=render_mode,
            max_episode_steps=max_episode_steps,
            **dream,
        )
        self.observation_space = self._vector.single_observation_space
        self.action_space = self._vector.single_action_space
        self.render_mode = render_mode

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        vector = self._vector
        vector._np_random = self.np_random
        if seed is not None:
            vector._generator.manual_seed(int(seed))
        if isinstance(options, dict) and "reset_mask" in options:
            raise ValueError("options['reset_mask'] picks dreams of a DreamVectorEnv; a DreamEnv has one, reset whole")
        vector._reset_all(options)
        return vector._observe()[0], {"context_tokens": vector.context_tokens()[0]}

    def step(self, action: Any):
        vector = self._vector
        if not vector._started[0] or vector._needs_reset[0]:
            raise gym.error.ResetNeeded(
                "the dream ended: call reset()" if vector._started[0] else "call reset() before step()"
            )
        batched = check_actions(action, self.action_space, None)[None]
        obs, reward, terminated, truncated, _ = self._vector._step(batched)  # checked once, as a single action
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def render(self) -> np.ndarray | None:
        return self._vector.render()
