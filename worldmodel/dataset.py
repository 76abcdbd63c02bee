"""The on-disk dataset: one folder per dataset, one folder of `.npy` arrays per episode, a JSON manifest.

Layout (documented for users in docs/dataset_format.md)::

    <root>/manifest.json
    <root>/episodes/<name>/frames.npy      (T+1, H, W, C) uint8   frames[t] is seen before actions[t]
    <root>/episodes/<name>/actions.npy     (T, A) float32 (box) or (T,) int64 (discrete)
    <root>/episodes/<name>/rewards.npy     (T,) float32           reward for actions[t]
    <root>/episodes/<name>/terminated.npy  (T,) bool
    <root>/episodes/<name>/truncated.npy   (T,) bool
    <root>/episodes/<name>/expert_actions.npy  optional, like actions: the scripted driver's decision at each step

Episodes are written to a temporary folder and renamed into place, and the manifest is rewritten
atomically after each one, so a crash loses at most the episode in flight. Arrays are memory-mapped,
so sampling training windows never loads the whole dataset.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from worldmodel.config import whole
from worldmodel.files import UnwritablePath, atomic_path, check_output_place, write_json_atomic

FORMAT_NAME = "worldmodel-dataset"
FORMAT_VERSION = 1
ARRAYS = ("frames", "actions", "rewards", "terminated", "truncated")
OPTIONAL_ARRAYS = ("expert_actions",)
"""Arrays an episode may hold beside `ARRAYS`; a file that is absent loads as None."""


def _check_dataset_place(root: Path) -> None:
    """DatasetError unless `root` can hold a dataset: a new folder (below folders, not a file), an empty one, or one
    already holding a dataset (`manifest.json`); never beside a user's other files."""
    try:
        check_output_place(root, folder=True)
    except UnwritablePath as err:
        raise DatasetError(f"{err}: a dataset is a folder, use another path") from None
    if root.is_dir() and not (root / "manifest.json").is_file():
        # the atomic writes' temporary files start with a dot: a collection killed while writing leaves those
        others = sorted(child.name for child in root.iterdir() if not child.name.startswith("."))
        if others:
            raise DatasetError(
                f"{root} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''} and no dataset"
                " (manifest.json): collect into a new or empty folder"
            )


class DatasetError(ValueError):
    """A dataset folder or manifest that does not follow the format."""


class EpisodeError(DatasetError):
    """One episode's files are missing, truncated or inconsistent; the message names the file."""


def space_to_dict(space: gym.Space) -> dict[str, Any]:
    """An action space as manifest JSON."""
    if isinstance(space, gym.spaces.Box):
        return {"type": "box", "shape": list(space.shape), "low": space.low.tolist(), "high": space.high.tolist()}
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "discrete", "n": int(space.n)}
    raise DatasetError(f"unsupported action space {space}; expected Box or Discrete")


def space_from_dict(data: dict[str, Any]) -> gym.Space:
    """The inverse of `space_to_dict`."""
    kind = data.get("type")
    if kind == "box":
        return gym.spaces.Box(np.array(data["low"], np.float32), np.array(data["high"], np.float32), dtype=np.float32)
    if kind == "discrete":
        return gym.spaces.Discrete(int(data["n"]))
    raise DatasetError(f"action_space type must be 'box' or 'discrete', got {kind!r}")


@dataclass
class Episode:
    """One recorded episode; arrays may be memory-mapped."""

    frames: np.ndarray  # (T+1, H, W, C) uint8
    actions: np.ndarray  # (T, A) float32 or (T,) int64
    rewards: np.ndarray  # (T,) float32
    terminated: np.ndarray  # (T,) bool
    truncated: np.ndarray  # (T,) bool
    expert_actions: np.ndarray | None = None
    """Like `actions`: what the scripted driver would have done in the state of each step, whatever drove it (the
    collection's noise and perturbations, a policy). Labels without the noise, as DART and DAgger clone from."""

    def __len__(self) -> int:
        return len(self.rewards)

    def validate(self, frame_shape: tuple[int, ...] | None = None, where: str = "episode") -> None:
        steps = len(self.rewards)
        if self.frames.dtype != np.uint8 or self.frames.ndim != 4:
            raise EpisodeError(
                f"{where}: frames must be (T+1, H, W, C) uint8, got {self.frames.shape} {self.frames.dtype}"
            )
        if frame_shape is not None and tuple(self.frames.shape[1:]) != tuple(frame_shape):
            raise EpisodeError(f"{where}: frames are {self.frames.shape[1:]}, manifest says {tuple(frame_shape)}")
        if len(self.frames) != steps + 1:
            raise EpisodeError(f"{where}: {len(self.frames)} frames for {steps} steps; expected steps + 1 frames")
        for name in ("actions", "terminated", "truncated"):
            if len(getattr(self, name)) != steps:
                raise EpisodeError(f"{where}: {name} has {len(getattr(self, name))} entries, expected {steps}")
        labels = self.expert_actions
        if labels is not None and (labels.shape != self.actions.shape or labels.dtype != self.actions.dtype):
            raise EpisodeError(
                f"{where}: expert_actions are {labels.shape} {labels.dtype}; expected the actions' "
                f"{self.actions.shape} {self.actions.dtype}"
            )


@dataclass
class EpisodeRecord:
    """A manifest entry. `intro_reward` is the reward of steps the source skipped before the first frame
    (CarRacing's zoom-in), so `ret + intro_reward` is the simulator's own return. `iteration` and `policy` say which
    round of the dream-to-real loop collected the episode and which policy drove it (0 and None for the first
    collection, scripted or your own data)."""

    name: str
    length: int
    seed: int | None = None
    ret: float = 0.0
    kind: str = ""
    iteration: int = 0
    policy: str | None = None
    intro_reward: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "length": self.length, "seed": self.seed, "return": self.ret, "kind": self.kind}
        if self.intro_reward:
            data["intro_reward"] = self.intro_reward
        if self.iteration or self.policy is not None:
            data.update(iteration=self.iteration, policy=self.policy)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EpisodeRecord:
        return cls(
            data["name"],
            int(data["length"]),
            data.get("seed"),
            float(data.get("return", 0.0)),
            data.get("kind", ""),
            int(data.get("iteration", 0)),
            data.get("policy"),
            float(data.get("intro_reward", 0.0)),
        )


EPISODE_NAME = re.compile(r"[A-Za-z0-9_-]+")
"""An episode's folder name under `episodes/`: one plain name, never a path."""


def _registered(root: Path) -> set[str]:
    """The episode names `root`'s manifest lists (none where there is no readable manifest: opening it says why)."""
    try:
        data = json.loads((root / "manifest.json").read_text())
        return {str(item["name"]) for item in data.get("episodes", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()


def write_episode(root: str | Path, name: str, episode: Episode, replace: bool = False) -> Path:
    """Write an episode's arrays into `<root>/episodes/<name>/` atomically (temporary folder, then rename). A folder
    of that name that the manifest does not list (a write cut short) is replaced; one it lists only with `replace`
    (an episode mended in place: the token cache sees its content change)."""
    if not isinstance(name, str) or not EPISODE_NAME.fullmatch(name):
        raise DatasetError(f"episode name {name!r}: expected letters, digits, '_' or '-' (a folder under episodes/)")
    if not replace and name in _registered(Path(root)):
        raise DatasetError(
            f"{root} already holds episode {name} in its manifest; write new episodes under new names (replace=True"
            " rewrites it in place)"
        )
    episode.validate(where=f"episode {name}")
    final = Path(root) / "episodes" / name
    with atomic_path(final, folder=True) as tmp:
        for array_name in ARRAYS + OPTIONAL_ARRAYS:
            array = getattr(episode, array_name)
            if array is not None:
                np.save(tmp / f"{array_name}.npy", np.ascontiguousarray(array))
    return final


def _frame_shape(shape: Any, where: str) -> tuple[int, int, int]:
    """`shape` as (height, width, channels) of positive integers, or a DatasetError saying so."""
    try:
        values = tuple(shape)
    except TypeError:
        values = ()
    if len(values) != 3 or not all(whole(v, 1) for v in values):
        expected = "frame_shape (height, width, channels) of positive integers"
        raise DatasetError(f"{where}: expected {expected}, got {shape!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


@dataclass
class Manifest:
    source: str
    frame_shape: tuple[int, int, int]
    action_space: dict[str, Any]
    episodes: list[EpisodeRecord] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "source": self.source,
            "frame_shape": list(self.frame_shape),
            "action_space": self.action_space,
            "episodes": [e.to_json() for e in self.episodes],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Manifest:
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise DatasetError(f"{where}: expected a JSON object with 'format', 'source', ..., got a {kind}")
        if data.get("format") != FORMAT_NAME:
            raise DatasetError(f"{where}: 'format' must be {FORMAT_NAME!r}, got {data.get('format')!r}")
        if data.get("version") != FORMAT_VERSION:
            raise DatasetError(f"{where}: version {data.get('version')} is not supported (expected {FORMAT_VERSION})")
        try:
            return cls(
                source=str(data["source"]),
                frame_shape=_frame_shape(data["frame_shape"], where),
                action_space=dict(data["action_space"]),
                episodes=[EpisodeRecord.from_json(e) for e in data["episodes"]],
                meta=dict(data.get("meta", {})),
            )
        except DatasetError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{where}: malformed manifest ({err!r})") from err


class Dataset:
    """A dataset folder: read the manifest, load (memory-mapped) episodes, append new ones."""

    def __init__(self, root: str | Path, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | Path) -> Dataset:
        path = Path(root) / "manifest.json"
        if not path.is_file():
            raise DatasetError(f"{path} not found; is {root} a dataset folder written by `worldmodel collect`?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON ({err})") from err
        return cls(root, Manifest.from_json(data, str(path)))

    @classmethod
    def create(
        cls,
        root: str | Path,
        source: str,
        frame_shape: tuple[int, int, int],
        action_space: gym.Space,
        meta: dict[str, Any] | None = None,
    ) -> Dataset:
        """Create a new dataset, or reopen an existing one after checking it has the same source and shapes."""
        shape = _frame_shape(frame_shape, f"dataset {root}")
        manifest = Manifest(source, shape, space_to_dict(action_space), meta=dict(meta or {}))
        _check_dataset_place(Path(root))
        if (Path(root) / "manifest.json").is_file():
            existing = cls.open(root)
            for key in ("source", "frame_shape", "action_space"):
                if getattr(existing.manifest, key) != getattr(manifest, key):
                    raise DatasetError(
                        f"{root} already holds a dataset with {key}={getattr(existing.manifest, key)},"
                        f" not {getattr(manifest, key)}; use another folder"
                    )
            return existing
        dataset = cls(root, manifest)
        dataset.save_manifest()
        return dataset

    def save_manifest(self) -> None:
        write_json_atomic(self.root / "manifest.json", self.manifest.to_json())

    def add(self, record: EpisodeRecord) -> None:
        """Register an episode already written with `write_episode`, and persist the manifest. The episode's folder
        must hold as many steps as the record says, of this dataset's frame shape."""
        if not isinstance(record, EpisodeRecord):
            raise DatasetError(f"expected an EpisodeRecord to add, got {type(record).__name__}")
        folder = self.root / "episodes" / record.name
        try:
            actions = np.load(folder / "actions.npy", mmap_mode="r")
            frames = np.load(folder / "frames.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DatasetError(f"episode {record.name}: write it with write_episode before adding it ({err})") from None
        if record.length < 1 or len(actions) != record.length or tuple(frames.shape[1:]) != tuple(self.frame_shape):
            raise DatasetError(
                f"episode {record.name} holds {len(actions)} steps of {tuple(frames.shape[1:])} frames; its record says"
                f" {record.length} steps and this dataset's frames are {tuple(self.frame_shape)}"
            )
        self.manifest.episodes = [e for e in self.manifest.episodes if e.name != record.name] + [record]
        self.save_manifest()

    @property
    def action_space(self) -> gym.Space:
        return space_from_dict(self.manifest.action_space)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.manifest.frame_shape

    @property
    def episodes(self) -> list[EpisodeRecord]:
        return self.manifest.episodes

    def __len__(self) -> int:
        return len(self.manifest.episodes)

    def episode_dir(self, index: int) -> Path:
        return self.root / "episodes" / self.manifest.episodes[index].name

    def load(self, index: int, mmap: bool = True) -> Episode:
        """Load episode `index`; raises EpisodeError naming the file if it is missing or malformed."""
        record = self.manifest.episodes[index]
        folder = self.episode_dir(index)
        arrays = {}
        for name in ARRAYS + OPTIONAL_ARRAYS:
            path = folder / f"{name}.npy"
            if name in OPTIONAL_ARRAYS and not path.is_file():
                continue
            try:
                arrays[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            except FileNotFoundError as err:
                raise EpisodeError(f"{path}: missing") from err
            except (ValueError, OSError, EOFError) as err:
                raise EpisodeError(f"{path}: unreadable or truncated ({err})") from err
        episode = Episode(**arrays)
        episode.validate(self.frame_shape, where=str(folder))
        if len(episode) != record.length:
            raise EpisodeError(f"{folder}: holds {len(episode)} steps, manifest says {record.length}")
        return episode

    def content_key(self, index: int) -> str:
        """A digest of episode `index`'s arrays as stored: it changes whenever any file of `ARRAYS` does, so caches
        derived from the episode (its tokens) can tell that they are stale (the optional labels are no input to
        them)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(self.manifest.episodes[index].name.encode())
        for name in ARRAYS:
            path = self.episode_dir(index) / f"{name}.npy"
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
            except FileNotFoundError as err:
                raise EpisodeError(f"{path}: missing") from err
        return digest.hexdigest()

    def usable(self, indices: list[int] | None = None) -> list[int]:
        """Indices of episodes that load; each bad one is reported by a warning naming its file and skipped."""
        good = []
        for index in range(len(self)) if indices is None else indices:
            try:
                self.load(index)
            except EpisodeError as err:
                warnings.warn(f"skipping bad episode: {err}", stacklevel=2)
                continue
            good.append(index)
        return good

    def split(self, val_fraction: float) -> tuple[list[int], list[int]]:
        """Deterministic train/validation split by episode: every k-th episode is held out."""
        if len(self) < 2:
            raise DatasetError(f"{self.root} has {len(self)} episode(s); at least 2 are needed for a validation split")
        stride = max(2, round(1 / max(val_fraction, 1e-6)))
        val = [i for i in range(len(self)) if i % stride == stride - 1] or [len(self) - 1]
        train = [i for i in range(len(self)) if i not in val]
        return train, val


def window_counts(lengths: np.ndarray, window: int, past_end: bool = False) -> np.ndarray:
    """The windows of `window` steps each episode of `lengths` steps offers: those inside it, or with `past_end` one
    starting at each of its steps."""
    lengths = np.asarray(lengths)
    return lengths.copy() if past_end else np.maximum(lengths - window + 1, 0)


def sample_windows(
    lengths: np.ndarray,
    window: int,
    batch_size: int,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
    past_end: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick `batch_size` (episode, start) pairs uniformly over all windows of `window` steps, or, with per-episode
    `weights`, each window with probability proportional to its episode's weight. With `past_end`, a window may
    start at any step and run past its episode's end (the caller pads it): every step then stands once at each
    place of a window it can reach (step s at places 0 to s), the last steps included."""
    counts = window_counts(lengths, window, past_end)
    if counts.sum() == 0:
        raise DatasetError(f"no episode is long enough for windows of {window} steps (lengths {list(lengths)[:10]})")
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != counts.shape or (weights < 0).any() or not np.isfinite(weights).all():
            raise ValueError(f"expected {len(counts)} finite episode weights >= 0, got {weights.shape} {weights[:5]}")
        mass = counts * weights
        if mass.sum() == 0:
            raise DatasetError(f"no episode with a positive weight is long enough for windows of {window} steps")
        episode = rng.choice(len(counts), size=batch_size, p=mass / mass.sum())
        return episode, rng.integers(0, counts[episode])
    flat = rng.integers(0, counts.sum(), size=batch_size)
    bounds = np.cumsum(counts)
    episode = np.searchsorted(bounds, flat, side="right")
    start = flat - (bounds[episode] - counts[episode])
    return episode, start


class FrameSampler:
    """Random frames from a set of episodes, read from memory-mapped arrays (for tokenizer training)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.episodes = [dataset.load(i) for i in indices]
        self.lengths = np.array([len(e.frames) for e in self.episodes])

    def sample(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        episode, start = sample_windows(self.lengths, 1, batch_size, rng)
        return np.stack([self.episodes[e].frames[s] for e, s in zip(episode, start, strict=True)])  # (B, H, W, C)

    def all_frames(self, stride: int = 1) -> np.ndarray:
        return np.concatenate([np.asarray(e.frames[::stride]) for e in self.episodes])
