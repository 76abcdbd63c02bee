"""`worldmodel play`: drive inside the dream by hand, in a pygame window.

Arrow keys or WASD drive (what they mean is the source's `controls`: steering, gas and brake on CarRacing, the
five meta-actions on highway-env); P hands control to the run's policy and back; R restarts; Esc or Q quits. The
frame is drawn scaled up with the predicted reward and the return so far, at the dream's frame rate.

- `side_by_side`: the real simulator beside the dream. Both start from the same real frame (the simulator's first
  after a reset on `seed`, the dream's only context) and every action goes to both, so the panels show where the
  dream drifts from what really happens.
- `policy`: the run's policy drives from the start, reading the dream's tokens.
- `record`: what the window showed, saved as an MP4 (written atomically when the session ends).
- `keys`: a script of held keys instead of the keyboard (demos, and the tests under SDL's dummy video driver); the
  script's keys are posted as pygame key events, so they take the keyboard's path.

`Session` is the game without the window: a test or a notebook can step it with key names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents.config import read_run_config
from agents.policy import TokenHistory
from agents.ppo import load_policy
from envs.dream import SHIPPED_MODEL, DreamEnv
from envs.sources import make_source_env
from worldmodel.checkpoint import CheckpointError
from worldmodel.config import ConfigError
from worldmodel.files import atomic_path
from worldmodel.run_dir import RunDir

KEY_NAMES = ("left", "right", "up", "down")


def parse_keys(script: str) -> list[frozenset[str]]:
    """ "up:10,up+left:5,:3" -> the keys held on each frame (10 frames of "up", 5 of "up" and "left", 3 of none)."""
    frames: list[frozenset[str]] = []
    for part in filter(None, (p.strip() for p in script.split(","))):
        keys, _, count = part.partition(":")
        names = frozenset(filter(None, keys.split("+")))
        unknown = sorted(names - set(KEY_NAMES))
        if unknown or not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"a key script is KEYS:FRAMES parts joined by commas, KEYS among {'+'.join(KEY_NAMES)} joined by +"
                f" (or empty for none), FRAMES a positive count, e.g. up:10,up+left:5; got {part!r}"
            )
        frames += [names] * int(count)
    return frames


@dataclass
class Panel:
    """What one side of the window shows."""

    label: str
    frame: np.ndarray  # (H, W, C) uint8
    reward: float = 0.0
    ret: float = 0.0


@dataclass
class Session:
    """A dream (and, side by side, the real simulator) driven one step at a time by held keys or by the policy."""

    model_dir: Path
    side_by_side: bool = False
    policy_drives: bool = False
    seed: int = 0
    device: str = "cpu"
    panels: list[Panel] = field(default_factory=list)
    steps: int = 0
    episodes: int = 0

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        config = read_run_config(self.model_dir)
        self.source = config.collect.source
        self.controls = self.source.source.controls
        if self.controls is None:
            raise ConfigError(f"source {self.source.name!r} has no key controls to play it with")
        policy_path = RunDir(self.model_dir).policy
        self.policy = None
        if policy_path.with_suffix(".json").is_file():
            self.policy = load_policy(policy_path, self.device).eval()
        elif self.policy_drives:
            raise CheckpointError(f"{policy_path}.json not found: this run has no policy to drive with")
        # the dream's latest grids as the policy sees them, kept while the keys drive too, so it can take over
        self.seen = TokenHistory(1 if self.policy is None else self.policy.config.frames)
        # one long dream: it ends when the model predicts the episode's end, or when the user restarts
        self.dream = DreamEnv(self.model_dir, device=self.device, render_mode="rgb_array", horizon=10**9)
        self.real = make_source_env(self.source) if self.side_by_side else None
        self.restart()

    @property
    def action_space(self) -> gym.Space:
        return self.dream.action_space

    def restart(self) -> None:
        seed = self.seed + self.episodes
        self.episodes += 1
        if self.real is not None:
            frame, _ = self.real.reset(seed=seed)
            self._tokens, info = self.dream.reset(seed=seed, options={"frames": frame[None]})
            self.panels = [Panel("dream", self.dream.render()), Panel("real", frame)]
        else:
            self._tokens, info = self.dream.reset(seed=seed)
            self.panels = [Panel("dream", self.dream.render())]
        # from the real grids the dream began from, as PPO's histories start (agents.ppo.first_grids)
        self.seen.start(torch.as_tensor(info["context_tokens"])[None])

    def toggle_policy(self) -> None:
        if self.policy is not None:
            self.policy_drives = not self.policy_drives

    def step(self, keys: frozenset[str]) -> Any:
        """One step of every panel with the action the keys mean (or the policy's); returns the action. An episode
        that ends in either panel restarts both."""
        action = (
            self.policy.action_for(self.seen.grids[0], self.action_space) if self.policy_drives else self.controls(keys)
        )
        self._tokens, reward, terminated, truncated, _ = self.dream.step(action)
        self.seen.push(torch.as_tensor(self._tokens)[None])
        dream = self.panels[0]
        dream.frame, dream.reward, dream.ret = self.dream.render(), float(reward), dream.ret + float(reward)
        ended = terminated or truncated
        if self.real is not None:
            frame, reward, terminated, truncated, _ = self.real.step(action)
            real = self.panels[1]
            real.frame, real.reward, real.ret = frame, float(reward), real.ret + float(reward)
            ended = ended or terminated or truncated
        self.steps += 1
        if ended:
            self.restart()
        return action

    def close(self) -> None:
        self.dream.close()
        if self.real is not None:
            self.real.close()


@dataclass
class PlayConfig:
    run: Path | None = None
    """A run folder (`worldmodel run`, or `worldmodel export`'s); None: the shipped CarRacing model."""
    side_by_side: bool = False
    policy: bool = False
    record: Path | None = None
    keys: list[frozenset[str]] | None = None
    """Held keys per frame instead of the keyboard (`parse_keys`); the session ends when they do."""
    seed: int = 0
    scale: int = 6
    fps: float = 12.0
    """Frames per second shown (the dream's rate; CarRacing's recorded steps come at 12.5/s). 0: as fast as it
    can, as a script runs in the tests."""
    max_steps: int | None = None


def play(config: PlayConfig) -> dict[str, Any]:
    """Open the window and play until the user quits (or the key script, or `max_steps`, ends); returns what
    happened: steps, episodes, the actions taken, and the recording's path."""
    if config.scale < 1 or config.fps < 0:
        raise ConfigError(f"scale must be at least 1 and fps at least 0, got {config.scale} and {config.fps}")
    if config.record is not None and Path(config.record).suffix.lower() != ".mp4":
        raise ConfigError(f"--record writes an MP4: give a path ending in .mp4, got {config.record}")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    model_dir = Path(config.run) if config.run is not None else SHIPPED_MODEL
    actions: list[Any] = []
    with ExitStack() as stack:  # closed in reverse: the recording is saved, then the window and the envs close
        session = Session(model_dir, config.side_by_side, config.policy, config.seed)
        stack.callback(session.close)
        stack.callback(pygame.quit)
        side = session.panels[0].frame.shape[0] * config.scale
        bar = 56
        try:
            pygame.display.init()  # not pygame.init(): no sound, so no audio device is looked for
            pygame.font.init()
            screen = pygame.display.set_mode((side * len(session.panels), side + bar))
        except pygame.error as err:
            raise ConfigError(
                f"no window can be opened ({err}): play on a machine with a display, under Xvfb (xvfb-run), or "
                "headless with SDL_VIDEODRIVER=dummy and --keys/--record"
            ) from None
        pygame.display.set_caption(f"worldmodel play: {model_dir.name}")
        writer = None
        if config.record is not None:
            import imageio.v2 as imageio

            tmp = stack.enter_context(atomic_path(config.record))
            writer = stack.enter_context(
                imageio.get_writer(tmp, format="FFMPEG", fps=config.fps or 12.0, macro_block_size=1)
            )
        with suppress(KeyboardInterrupt):  # Ctrl-C in the terminal quits as Esc does: the recording so far is kept
            _loop(pygame, screen, session, config, side, bar, writer, actions)
    return {
        "model": str(model_dir),
        "steps": session.steps,
        "episodes": session.episodes,
        "actions": [a.tolist() if isinstance(a, np.ndarray) else a for a in actions],
        "record": str(config.record) if config.record is not None else None,
    }


def _loop(
    pygame: Any,
    screen: Any,
    session: Session,
    config: PlayConfig,
    side: int,
    bar: int,
    writer: Any,
    actions: list[Any],
) -> None:
    """Read the keys (or post the script's), step, draw and record, until the user quits or the script ends."""
    key_codes = {
        pygame.K_LEFT: "left", pygame.K_a: "left", pygame.K_RIGHT: "right", pygame.K_d: "right",
        pygame.K_UP: "up", pygame.K_w: "up", pygame.K_DOWN: "down", pygame.K_s: "down",
    }  # fmt: skip
    script_codes = {name: code for code, name in reversed(key_codes.items())}  # the arrows
    script: Iterator[frozenset[str]] | None = iter(config.keys) if config.keys is not None else None
    font = pygame.font.Font(None, 22)
    clock = pygame.time.Clock()
    held: set[str] = set()
    while True:
        if script is not None:
            wanted = next(script, None)
            if wanted is None:
                return
            for name in held - wanted:
                pygame.event.post(pygame.event.Event(pygame.KEYUP, key=script_codes[name]))
            for name in wanted - held:
                pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=script_codes[name]))
        for event in pygame.event.get():
            if event.type == pygame.QUIT or (
                event.type == pygame.KEYDOWN and event.key in (pygame.K_ESCAPE, pygame.K_q)
            ):
                return
            if event.type == pygame.KEYDOWN and event.key == pygame.K_r:
                session.restart()
            elif event.type == pygame.KEYDOWN and event.key in (pygame.K_p, pygame.K_TAB):
                session.toggle_policy()
            elif event.type == pygame.KEYDOWN and event.key in key_codes:
                held.add(key_codes[event.key])
            elif event.type == pygame.KEYUP and event.key in key_codes:
                held.discard(key_codes[event.key])
        actions.append(session.step(frozenset(held)))
        _draw(screen, font, session, side, bar, held)
        pygame.display.flip()
        if writer is not None:
            writer.append_data(pygame.surfarray.array3d(screen).transpose(1, 0, 2))
        if config.max_steps is not None and session.steps >= config.max_steps:
            return
        if config.fps:
            clock.tick(config.fps)


def _draw(screen: Any, font: Any, session: Session, side: int, bar: int, held: set[str]) -> None:
    import pygame

    screen.fill((20, 20, 20))
    if session.policy is None:
        driver = "you drive (no policy in this run)"
    else:
        driver = "policy drives (P: you)" if session.policy_drives else "you drive (P: policy)"
    for index, panel in enumerate(session.panels):
        frame = panel.frame if panel.frame.shape[-1] == 3 else np.repeat(panel.frame, 3, axis=-1)
        surface = pygame.surfarray.make_surface(np.ascontiguousarray(frame.transpose(1, 0, 2)))
        screen.blit(pygame.transform.scale(surface, (side, side)), (index * side, 0))
        lines = (
            f"{panel.label}   reward {panel.reward:+.2f}   return {panel.ret:.1f}",
            f"step {session.steps}   {driver}   keys {'+'.join(sorted(held)) or '-'}" if index == 0 else "",
        )
        for row, text in enumerate(lines):
            screen.blit(font.render(text, True, (230, 230, 230)), (index * side + 8, side + 6 + 22 * row))
