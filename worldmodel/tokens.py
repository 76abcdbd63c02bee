"""Tokenize a dataset once and keep the result: token grids, actions, rewards and flags for every episode."""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from worldmodel.dataset import Dataset, DatasetError, sample_windows
from worldmodel.files import atomic_path
from worldmodel.tokenizer import Tokenizer


def latest_grids(grids: torch.Tensor, length: int) -> torch.Tensor:
    """(B, C, h, w) token grids, oldest first -> (B, length, h, w): the last `length` of them, the oldest repeated
    before them where there are fewer (as Gymnasium's `FrameStackObservation` pads with the first observation)."""
    missing = max(0, length - grids.shape[1])
    return torch.cat([grids[:, :1].expand(-1, missing, *grids.shape[2:]), grids[:, -length:]], dim=1)


@dataclass
class TokenizedDataset:
    """Episodes as token grids, concatenated; episode e spans frames[frame_offsets[e]:frame_offsets[e+1]]."""

    tokens: np.ndarray  # (N, h, w) int16, N = total frames
    actions: np.ndarray  # (M, A) float32 or (M,) int64, M = total steps
    rewards: np.ndarray  # (M,) float32
    terminated: np.ndarray  # (M,) bool
    frame_offsets: np.ndarray  # (E + 1,)
    step_offsets: np.ndarray  # (E + 1,)
    episode_ids: np.ndarray  # (E,) indices into the source dataset
    tokenizer_fingerprint: str
    episode_keys: np.ndarray | None = None  # (E,) str: each episode's `Dataset.content_key` when tokenized

    @property
    def lengths(self) -> np.ndarray:
        """Steps per episode."""
        return np.diff(self.step_offsets)

    def select(self, episode_ids: list[int]) -> TokenizedDataset:
        """The subset of episodes whose source dataset indices are in `episode_ids`."""
        wanted = set(episode_ids)
        keep = [i for i, e in enumerate(self.episode_ids) if int(e) in wanted]
        if not keep:
            raise DatasetError(f"none of episodes {episode_ids[:10]} are in the tokenized dataset")
        parts = {name: [] for name in ("tokens", "actions", "rewards", "terminated")}
        for i in keep:
            f0, f1, s0, s1 = (
                self.frame_offsets[i],
                self.frame_offsets[i + 1],
                self.step_offsets[i],
                self.step_offsets[i + 1],
            )
            parts["tokens"].append(self.tokens[f0:f1])
            for name in ("actions", "rewards", "terminated"):
                parts[name].append(getattr(self, name)[s0:s1])
        frames = np.cumsum([0] + [self.frame_offsets[i + 1] - self.frame_offsets[i] for i in keep])
        steps = np.cumsum([0] + [self.step_offsets[i + 1] - self.step_offsets[i] for i in keep])
        return TokenizedDataset(
            **{k: np.concatenate(v) for k, v in parts.items()},
            frame_offsets=frames,
            step_offsets=steps,
            episode_ids=self.episode_ids[keep],
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            episode_keys=None if self.episode_keys is None else self.episode_keys[keep],
        )

    def episode(self, index: int) -> dict[str, np.ndarray]:
        """The arrays of the `index`-th episode held here (not a dataset index): tokens (T + 1, h, w), actions,
        rewards, terminated (T, ...)."""
        f0, f1 = self.frame_offsets[index], self.frame_offsets[index + 1]
        s0, s1 = self.step_offsets[index], self.step_offsets[index + 1]
        return {
            "tokens": self.tokens[f0:f1],
            "actions": self.actions[s0:s1],
            "rewards": self.rewards[s0:s1],
            "terminated": self.terminated[s0:s1],
        }

    def smoothed_rewards(self, steps: int) -> TokenizedDataset:
        """A copy whose rewards are each episode's centred moving average over `steps` steps (odd; 1: unchanged).

        A training target, not a measurement: where the reward arrives in near-random bursts (CarRacing pays for
        each new tile at the step the car happens to cross it), the average moves reward by at most `steps // 2`
        steps and takes away noise that a reward head would otherwise memorise. At an episode's ends it averages
        over the steps that exist, so a constant reward stays exactly that constant. A terminating step keeps its
        own reward and is left out of its neighbours' averages: an end's penalty (CarRacing's -100 for leaving
        the playfield) stays whole, where the step it happens.
        """
        if steps < 1 or steps % 2 == 0:
            raise ValueError(f"reward smoothing takes an odd number of steps >= 1, got {steps}")
        if steps == 1:
            return self
        half = steps // 2
        rewards = self.rewards.astype(np.float64)
        for s0, s1 in zip(self.step_offsets[:-1], self.step_offsets[1:], strict=True):
            s1 = s1 - 1 if s1 > s0 and self.terminated[s1 - 1] else s1  # the terminating step stays raw
            cumulative = np.concatenate([[0.0], np.cumsum(rewards[s0:s1])])
            index = np.arange(s1 - s0)
            lo, hi = np.maximum(index - half, 0), np.minimum(index + half + 1, s1 - s0)
            rewards[s0:s1] = (cumulative[hi] - cumulative[lo]) / (hi - lo)
        return dataclasses.replace(self, rewards=rewards.astype(np.float32))

    def foreseen_terminations(self, steps: int) -> TokenizedDataset:
        """A copy in which each of a terminated episode's last `steps` steps is labelled terminating (1: unchanged).

        A training target, not a measurement: a termination head trained on it predicts "this episode ends within
        `steps` steps" where the plain label says "it ends now". An imagined rollout then ends where the data says
        an end is near, before its frames have to draw the end itself (highway-env's crash, which a few imagined
        steps do not bring close: docs/loop.md). Episodes cut off by a time limit keep no label.
        """
        if steps < 1:
            raise ValueError(f"the termination lookahead takes a number of steps >= 1, got {steps}")
        if steps == 1:
            return self
        terminated = self.terminated.copy()
        for s0, s1 in zip(self.step_offsets[:-1], self.step_offsets[1:], strict=True):
            if s1 > s0 and self.terminated[s1 - 1]:
                terminated[max(s0, s1 - steps) : s1] = True
        return dataclasses.replace(self, terminated=terminated)

    def sample(
        self,
        window: int,
        batch_size: int,
        rng: np.random.Generator,
        start_fraction: float = 0.0,
        weights: np.ndarray | None = None,
        past_end: bool = False,
    ) -> dict[str, np.ndarray]:
        """Windows of `window` steps: tokens (B, window + 1, h, w), actions (B, window, ...), rewards, terminated.

        A `start_fraction` of the windows begin at their episode's first step. With `weights` (E,), one per episode
        held here, a window is drawn with probability proportional to its episode's weight (`sample_windows`).
        With `past_end`, windows may run past their episode's end: the steps after it repeat its last step and
        frame, and `valid` (B, window) marks the steps that are the episode's (the loss leaves the others out).
        """
        episode, start = sample_windows(self.lengths, window, batch_size, rng, weights, past_end)
        if start_fraction > 0:
            start = np.where(rng.random(batch_size) < start_fraction, 0, start)
        length = self.lengths[episode][:, None]
        steps = start[:, None] + np.arange(window)
        frames = np.minimum(start[:, None] + np.arange(window + 1), length)  # an episode has length + 1 frames
        step_index = self.step_offsets[episode][:, None] + np.minimum(steps, length - 1)
        batch = {
            "tokens": self.tokens[self.frame_offsets[episode][:, None] + frames].astype(np.int64),
            "actions": self.actions[step_index],
            "rewards": self.rewards[step_index],
            "terminated": self.terminated[step_index],
        }
        if past_end:
            batch["valid"] = steps < length
        return batch

    def save(self, path: str | Path) -> None:
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                **{k: v for k, v in vars(self).items() if k != "tokenizer_fingerprint" and v is not None},
                tokenizer_fingerprint=np.array(self.tokenizer_fingerprint),
            )

    @classmethod
    def load(cls, path: str | Path) -> TokenizedDataset:
        if not Path(path).is_file():
            raise DatasetError(f"{path} not found: no token cache (training a stage writes one)")
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {k: data[k] for k in data.files}
            fields["tokenizer_fingerprint"] = str(fields["tokenizer_fingerprint"])
            return cls(**fields)
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as err:
            raise DatasetError(f"{path}: unreadable token cache ({err!r}); delete it to re-tokenize") from None


@torch.no_grad()
def tokenize_dataset(
    dataset: Dataset,
    tokenizer: Tokenizer,
    fingerprint: str,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    cached: TokenizedDataset | None = None,
) -> TokenizedDataset:
    """Encode every usable episode of `dataset` with `tokenizer` (whose weights' fingerprint is `fingerprint`).

    Episodes that `cached` already holds, tokenized by the same tokenizer from the same content (the episode's
    `Dataset.content_key`), are copied from it instead of encoded again: a dataset that grows is tokenized once
    per new episode, and an episode whose files changed is encoded afresh."""
    if tokenizer.config.codebook_size > np.iinfo(np.int16).max + 1:
        raise ValueError(f"codebook of {tokenizer.config.codebook_size} codes does not fit the int16 token cache")
    tokenizer.eval()
    known: dict[str, int] = {}
    if cached is not None and cached.tokenizer_fingerprint == fingerprint and cached.episode_keys is not None:
        known = {str(key): i for i, key in enumerate(cached.episode_keys)}
    indices = dataset.usable()
    keys = [dataset.content_key(index) for index in indices]
    tokens, actions, rewards, terminated = [], [], [], []
    fresh = [index for index, key in zip(indices, keys, strict=True) if key not in known]
    progress = tqdm(total=len(fresh), desc="tokenize", dynamic_ncols=True, disable=not fresh)
    for index, key in zip(indices, keys, strict=True):
        if key in known:
            episode = cached.episode(known[key])
            tokens.append(episode["tokens"])
            actions.append(episode["actions"])
            rewards.append(episode["rewards"])
            terminated.append(episode["terminated"])
            continue
        episode = dataset.load(index)
        grids = []
        for start in range(0, len(episode.frames), batch_size):
            frames = torch.from_numpy(np.array(episode.frames[start : start + batch_size])).to(device)
            grids.append(tokenizer.encode(frames).tokens.cpu().numpy().astype(np.int16))
        tokens.append(np.concatenate(grids))
        actions.append(np.asarray(episode.actions))
        rewards.append(np.asarray(episode.rewards, dtype=np.float32))
        terminated.append(np.asarray(episode.terminated, dtype=bool))
        progress.update()
    progress.close()
    return TokenizedDataset(
        tokens=np.concatenate(tokens),
        actions=np.concatenate(actions),
        rewards=np.concatenate(rewards),
        terminated=np.concatenate(terminated),
        frame_offsets=np.cumsum([0] + [len(t) for t in tokens]),
        step_offsets=np.cumsum([0] + [len(r) for r in rewards]),
        episode_ids=np.array(indices),
        tokenizer_fingerprint=fingerprint,
        episode_keys=np.array(keys),
    )
