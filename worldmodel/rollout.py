"""Side-by-side video of a held-out episode: real frames, their tokenizer reconstructions, and the dream
that starts from the same context and is fed the same actions (open loop)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image, ImageDraw

from worldmodel.dataset import Dataset, DatasetError
from worldmodel.files import atomic_path
from worldmodel.run_dir import RunDir
from worldmodel.tokenizer import psnr
from worldmodel.world_model import WorldModel

PANELS = ("real", "tokenizer", "dream")


@dataclass
class RolloutConfig:
    steps: int = 48
    """Imagined steps after the context."""
    burn_in: int = 4
    episode: int = 0
    """Which held-out episode to show (index into the validation episodes)."""
    scale: int = 2
    fps: int = 8


@torch.no_grad()
def dream_episode(
    world: WorldModel, frames: np.ndarray, actions: np.ndarray, burn_in: int, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """(reconstructions, dream frames) of `frames` (T+1, H, W, C) given `actions` (T, ...), both (N, H, W, C)."""
    device = world.device
    steps = min(steps, len(actions) - burn_in + 1)  # the dream ends with the episode's last frame
    real = torch.from_numpy(np.array(frames[: burn_in + steps])).to(device)
    tokens = torch.cat([world.tokenizer.encode(chunk).tokens for chunk in real.split(128)])  # (N, h, w)
    recon = world.tokenizer.tokens_to_frames(tokens).cpu().numpy()
    acts = world.action_tensor(actions[: burn_in + steps - 1])
    cache = world.dynamics.new_cache(1)
    world.burn_in(cache, tokens[None, :burn_in], acts[None, : burn_in - 1], torch.zeros(1, dtype=torch.long))
    current, dream = tokens[burn_in - 1 : burn_in], [tokens[i : i + 1] for i in range(burn_in)]
    for t in range(burn_in - 1, burn_in - 1 + steps):
        current = world.imagine(cache, current, acts[t : t + 1]).tokens
        dream.append(current)
    dream_frames = world.tokenizer.tokens_to_frames(torch.cat(dream)).cpu().numpy()
    return recon, dream_frames


def _label(image: np.ndarray, text: str) -> np.ndarray:
    canvas = Image.fromarray(image)
    ImageDraw.Draw(canvas).text((2, 1), text, fill=(255, 255, 0))
    return np.asarray(canvas)


def compose(real: np.ndarray, recon: np.ndarray, dream: np.ndarray, scale: int, burn_in: int) -> list[np.ndarray]:
    """One RGB frame per step: the three panels side by side, upscaled and labelled."""
    out = []
    for t in range(len(dream)):
        panels = []
        for name, frames in zip(PANELS, (real, recon, dream), strict=True):
            frame = frames[t]
            frame = np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame
            frame = frame.repeat(scale, 0).repeat(scale, 1)
            tag = "context" if name == "dream" and t < burn_in else name
            panels.append(_label(frame, f"{tag} {t}"))
        out.append(np.concatenate(panels, axis=1))
    return out


def check_video_writer() -> None:
    """Refuse, before any work, where the mp4 writer is missing: imageio picks its writer by what is installed,
    and without its ffmpeg plugin it would hand the video to another that fails only once the frames are made."""
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        raise RuntimeError(
            "the rollout video (rollout.mp4) needs imageio's ffmpeg plugin, which installing this project brings "
            "(imageio[ffmpeg]); install it with `pip install imageio-ffmpeg`"
        )


def _write_atomic(path: Path, frames: list[np.ndarray], fps: int) -> None:
    with atomic_path(path) as tmp:
        if path.suffix == ".gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        else:
            imageio.mimwrite(tmp, frames, format="FFMPEG", fps=fps, macro_block_size=1)


def write_rollout(
    run_dir: str | Path, dataset_dir: str | Path, config: RolloutConfig, out: str | Path | None = None
) -> dict[str, object]:
    """Write `<out>.mp4` and `<out>.gif` (default `<run>/rollout`); returns paths and per-panel PSNR."""
    check_video_writer()
    world = WorldModel.load(run_dir, with_contexts=False)
    dataset = Dataset.open(dataset_dir)
    val_episodes = world.meta.get("val_episodes", [])
    if any(i >= len(dataset) for i in val_episodes):
        raise DatasetError(
            f"{dataset_dir} holds {len(dataset)} episodes, too few for the run's held-out episodes (up to"
            f" {max(val_episodes)} in the dataset its dynamics model trained on): give that dataset"
        )
    held_out = [i for i in val_episodes if dataset.episodes[i].length > config.burn_in]
    candidates = held_out or list(range(len(dataset)))
    index = candidates[config.episode % len(candidates)]
    episode = dataset.load(index)
    recon, dream = dream_episode(
        world, np.asarray(episode.frames), np.asarray(episode.actions), config.burn_in, config.steps
    )
    real = np.asarray(episode.frames[: len(dream)])
    frames = compose(real, recon, dream, config.scale, config.burn_in)
    base = Path(out) if out is not None else RunDir(run_dir).rollout
    base.parent.mkdir(parents=True, exist_ok=True)
    mp4, gif = base.with_suffix(".mp4"), base.with_suffix(".gif")
    _write_atomic(mp4, frames, config.fps)
    _write_atomic(gif, frames, config.fps)

    def to_float(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.array(x[config.burn_in :], dtype=np.float32)).div(255).permute(0, 3, 1, 2)

    return {
        "video": str(mp4),
        "gif": str(gif),
        "episode": dataset.episodes[index].name,
        "frames": len(frames),
        "dream_psnr": psnr(to_float(dream), to_float(real)).item(),
        "tokenizer_psnr": psnr(to_float(recon[: len(dream)]), to_float(real)).item(),
    }
