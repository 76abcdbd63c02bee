"""`worldmodel eval tokenizer` and `worldmodel bench tokenizer`: a frame tokenizer's rate, distortion and speed,
beside WebP and JPEG on the same frames.

- eval: one tokenizer checkpoint on an (N, H, W, C) uint8 `.npy` array of frames, resized (Pillow's bilinear,
  as the recorded frames are) to the tokenizer's input size. Figures: the rate (`worldmodel/rate.py`: raw, packed,
  LZMA and entropy-coded bytes per frame), PSNR and SSIM as `evaluate_reconstruction` computes them, and the
  bytes WebP and JPEG need for the same PSNR on the same resized frames (`bench/codecs.py`).
- bench: for each backbone and rate setting (a few `TokenizerConfig` fields, e.g. FSQ levels), a tokenizer
  trained by `train_tokenizer` with the same budget (steps and batch size, no wall-clock cap) on the dataset's
  training episodes, then the eval figures on frames of its held-out episodes, encode and decode frames/s at a
  few batch sizes, parameter counts and training time; the codecs' curves on the same frames; and the encode
  and decode time of untrained models of each backbone at growing square resolutions. Written as JSON, a
  markdown table and a rate-distortion PNG. A tokenizer already trained in the output folder is loaded, not
  retrained; an interrupted one resumes from its last checkpoint; the codec curves are kept in `codecs.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.codecs import QUALITIES, CodecPoint, compare, measure_codec
from bench.imagination import timed_rate
from envs.sources import fit_frame
from worldmodel.checkpoint import CheckpointError, checkpoint_exists, config_matches, read_checkpoint, resumable
from worldmodel.config import ConfigError, from_dict
from worldmodel.dataset import Dataset, DatasetError, FrameSampler
from worldmodel.files import read_json, save_figure_atomic, write_json_atomic, write_text_atomic
from worldmodel.logger import RunLogger
from worldmodel.rate import token_rate
from worldmodel.run_dir import RunDir
from worldmodel.tokenizer import Tokenizer, TokenizerConfig
from worldmodel.train import (
    TOKENIZER,
    TokenizerStage,
    evaluate_reconstruction,
    load_tokenizer,
    resolve_device,
    train_tokenizer,
)
from worldmodel.trainer import TrainConfig

CODECS = ("webp", "jpeg")


class FramesError(DatasetError):
    """A frames file that is missing or not an (N, H, W, C) uint8 array."""


class BackboneUnavailable(ValueError):
    """A backbone this checkout does not have, or cannot build with the settings asked for."""


def tokenizer_checkpoint(path: str | Path) -> Path:
    """The checkpoint path `load_tokenizer` takes: `RUN/tokenizer` as given, `RUN` for a run folder, and
    `RUN/tokenizer.safetensors` or `.json` without the suffix."""
    given = Path(path)
    path = given.with_suffix("") if given.suffix in (".safetensors", ".json") else given
    if not path.is_dir() and not any(path.with_suffix(suffix).is_file() for suffix in (".safetensors", ".json")):
        raise CheckpointError(
            f"{given} does not exist; expected a run folder (RUN) or a tokenizer checkpoint in one (RUN/tokenizer)"
        )
    return RunDir(path).tokenizer if path.is_dir() else path


def load_frames(path: str | Path, channels: int, max_frames: int | None = None) -> np.ndarray:
    """(N, H, W, channels) uint8 frames from a `.npy` file; `max_frames` evenly spaced ones if there are more."""
    path = Path(path)
    expected = f"an (N, H, W, {channels}) uint8 .npy array"
    if not path.is_file():
        raise FramesError(f"{path} not found; expected {expected}")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):  # numpy would call any other file pickled data
        raise FramesError(f"{path} is not a .npy file (numpy.save writes one); expected {expected}")
    try:
        frames = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise FramesError(f"{path} is not readable as {expected} ({err})") from err
    if not isinstance(frames, np.ndarray):
        frames.close()
        raise FramesError(f"{path} is an .npz archive; expected {expected}")
    if frames.dtype != np.uint8:
        raise FramesError(f"{path} holds {frames.dtype} values; expected {expected}")
    if frames.ndim != 4 or frames.shape[-1] != channels:
        raise FramesError(f"{path} holds an array of shape {frames.shape}; expected {expected}")
    if not frames.size:
        raise FramesError(f"{path} holds no frames (shape {frames.shape}); expected {expected} with N > 0")
    if max_frames is not None and len(frames) > max_frames:
        frames = frames[np.linspace(0, len(frames) - 1, max_frames).astype(int)]
    return np.array(frames)  # a writable copy in memory, not the read-only memory map


def resize_frames(frames: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, height, width, C) uint8 (width defaults to height) the way `make_source_env`
    records frames (`envs.sources.fit_frame`: a square target takes the whole frame, a non-square one a crop to its
    aspect ratio keeping the bottom rows), resized with Pillow's bilinear filter, which widens to an antialiasing
    triangle filter when shrinking. Frames already that size come back as they are."""
    width = width or height
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((len(frames), height, width, frames.shape[-1]), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = fit_frame(frame, height, width)
    return out


@torch.no_grad()
def encode_frames(
    tokenizer: Tokenizer, frames: np.ndarray, device: torch.device, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) uint8 frames -> (N, h, w) int64 tokens and the (N, d, h, w) float32 latents before the
    quantizer."""
    tokens, latents = [], []
    for start in range(0, len(frames), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size])).to(device)
        out = tokenizer.encode(batch)
        tokens.append(out.tokens.cpu().numpy())
        latents.append(out.z.float().cpu().numpy())
    return np.concatenate(tokens), np.concatenate(latents)


def latent_spread(tokenizer: Tokenizer, latents: np.ndarray) -> dict[str, list[float] | list[int]]:
    """Per FSQ channel of (N, d, h, w) pre-quantizer `latents`: how many of its levels the frames use, and the
    1st and 99th percentile of the latent (FSQ bounds it with a tanh, so a channel whose values sit near 0 uses
    few levels, one far beyond +-2 saturates at its outer levels). A collapse of the joint codes, every channel
    spread over its levels but the channels moving together, does not show here: only in the codes used (the
    ViT's of docs/tokenizers.md)."""
    quantizer = tokenizer.quantizer
    per_channel = torch.from_numpy(latents).transpose(0, 1).reshape(quantizer.dim, -1)  # (d, N*h*w)
    codes, _ = quantizer(per_channel.T)  # (N*h*w, d): the level each value is quantized to
    low, high = np.percentile(per_channel.numpy(), [1, 99], axis=1)
    return {
        "levels_used": [int(torch.unique(channel).numel()) for channel in codes.T],
        "latent_p01": [round(float(v), 3) for v in low],
        "latent_p99": [round(float(v), 3) for v in high],
    }


def parameter_counts(tokenizer: Tokenizer) -> dict[str, int]:
    """Encoder and decoder parameters (and their sum): what encodes and decodes frames, without any
    training-only part such as a discriminator."""

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    encoder, decoder = count(tokenizer.encoder), count(tokenizer.decoder)
    return {"parameters": encoder + decoder, "encoder_parameters": encoder, "decoder_parameters": decoder}


def measure_codecs(
    frames: np.ndarray, qualities: dict[str, tuple[int, ...]], description: str = "codecs"
) -> dict[str, list[CodecPoint]]:
    """Each codec's points on `frames` at its qualities, with a progress bar over all of them."""
    bar = tqdm(total=sum(len(q) for q in qualities.values()), desc=description, dynamic_ncols=True)
    try:
        points = {}
        for codec, codec_qualities in qualities.items():

            def show(point: CodecPoint, codec: str = codec) -> None:
                bar.update()
                bar.set_postfix_str(f"{codec} q{point.quality}: {point.bytes_per_frame:.0f} B, {point.psnr:.2f} dB")

            points[codec] = measure_codec(frames, codec, codec_qualities, show)
        return points
    finally:
        bar.close()


def tokenizer_figures(
    tokenizer: Tokenizer,
    frames: np.ndarray,
    device: torch.device,
    codecs: dict[str, list[CodecPoint]],
    batch_size: int = 128,
) -> dict[str, Any]:
    """Rate, distortion and the codecs' bytes at equal PSNR for `tokenizer` on (N, H, W, C) uint8 `frames` of its
    input size. `<codec>_ratio` is the codec's bytes at the tokenizer's PSNR over the tokenizer's raw bytes per
    frame; `<codec>_ratio_entropy_coded` over its entropy-coded bytes."""
    config = tokenizer.config
    quality = evaluate_reconstruction(tokenizer, frames, device, batch_size)
    tokens, latents = encode_frames(tokenizer, frames, device, batch_size)
    rate = token_rate(tokens, config.codebook_size)
    figures: dict[str, Any] = {
        "backbone": config.backbone,
        "image_size": config.image_size,
        "image_shape": list(config.image_shape),
        "levels": list(config.levels),
        "tokens_per_frame": config.tokens_per_frame,
        "codebook_size": config.codebook_size,
        "bits_per_token": rate.bits_per_token,
        "bytes_per_frame": config.bytes_per_frame,
        "packed_bytes_per_frame": rate.packed_bytes_per_frame,
        "lzma_bytes_per_frame": rate.lzma_bytes_per_frame,
        "entropy_bits_per_token": rate.entropy_bits_per_token,
        "entropy_coded_bytes_per_frame": rate.entropy_bytes_per_frame,
        "codes_used": rate.codes_used,
        **latent_spread(tokenizer, latents),
        "psnr": quality["psnr"],
        "ssim": quality["ssim"],
        "frames": len(frames),
        **parameter_counts(tokenizer),
    }
    for codec, points in codecs.items():
        figures.update(compare(codec, points, quality["psnr"], config.bytes_per_frame))
        at_psnr = figures[f"{codec}_bytes_at_equal_psnr"]
        entropy_coded = rate.entropy_bytes_per_frame
        figures[f"{codec}_ratio_entropy_coded"] = at_psnr / entropy_coded if at_psnr and entropy_coded else None
    return figures


@dataclass
class EvalConfig:
    max_frames: int | None = None
    """Evenly spaced frames of the file to measure on (None: all)."""
    batch_size: int = 128
    device: str = "auto"
    qualities: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(QUALITIES))


def eval_tokenizer(
    checkpoint: str | Path,
    frames_path: str | Path,
    json_path: str | Path | None = None,
    config: EvalConfig | None = None,
) -> dict[str, Any]:
    """The figures of `tokenizer_figures` for one checkpoint on a `.npy` file of frames, optionally as JSON."""
    config = config or EvalConfig()
    device = resolve_device(config.device)
    path = tokenizer_checkpoint(checkpoint)
    tokenizer, meta = load_tokenizer(path, device)
    model = tokenizer.config
    frames = load_frames(frames_path, model.channels, config.max_frames)
    resized = resize_frames(frames, *model.image_shape)
    codecs = measure_codecs(resized, {codec: config.qualities[codec] for codec in CODECS})
    figures = {
        "checkpoint": str(path),
        "frames_file": str(frames_path),
        "input_frame_shape": list(frames.shape[1:]),
        "resized": resized.shape[1:3] != frames.shape[1:3],
        "trained_steps": meta.get("step"),
        **tokenizer_figures(tokenizer, resized, device, codecs, config.batch_size),
        **{f"{codec}_points": [dataclasses.asdict(p) for p in points] for codec, points in codecs.items()},
        "device": str(device),
    }
    if json_path:
        write_json_atomic(json_path, figures)
    return figures


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _codec_bytes(figures: dict[str, Any], codec: str) -> str:
    """The codec's bytes at equal PSNR, or its bound when the PSNR is outside the measured range."""
    value = figures[f"{codec}_bytes_at_equal_psnr"]
    bound = figures.get(f"{codec}_bytes_at_equal_psnr_bound") or {}
    if value is not None:
        return f"{value:,.0f}"
    if "at_most" in bound:
        return f"<= {bound['at_most']:,.0f}"
    if "more_than" in bound:
        return f"> {bound['more_than']:,.0f}"
    return "-"


def format_eval(figures: dict[str, Any]) -> str:
    """The eval figures as a few console lines."""
    lines = [
        f"{figures['checkpoint']} ({figures['backbone']}, {figures['tokens_per_frame']} tokens of "
        f"{figures['codebook_size']} codes) on {figures['frames']} frames of {figures['frames_file']}",
        f"  ours: {figures['bytes_per_frame']:.1f} B/frame raw, {figures['entropy_coded_bytes_per_frame']:.1f} "
        f"entropy-coded, {figures['lzma_bytes_per_frame']:.1f} lzma; PSNR {figures['psnr']:.2f} dB, "
        f"SSIM {figures['ssim']:.3f}",
    ]
    for codec in CODECS:
        lines.append(
            f"  {codec}: {_codec_bytes(figures, codec)} B/frame at equal PSNR "
            f"(ratio {_number(figures[f'{codec}_ratio'], 2)}); "
            f"{_number(figures[f'{codec}_psnr_at_equal_bytes'], 2)} dB at equal bytes"
        )
    return "\n".join(lines)


DEFAULT_RATES: tuple[dict[str, Any], ...] = ({"levels": [4, 4, 4]}, {"levels": [8, 6, 5]}, {"levels": [8, 5, 5, 5]})


@dataclass
class TokenizerBenchConfig:
    backbones: tuple[str, ...] = ("conv", "vit", "hybrid")
    rates: tuple[dict[str, Any], ...] = DEFAULT_RATES
    """Rate settings: `TokenizerConfig` fields over the preset's tokenizer model, e.g. {"levels": [8, 6, 5]}."""
    steps: int = 1000
    batch_size: int = 32
    """The training budget, the same for every tokenizer (no wall-clock cap)."""
    val_fraction: float = 0.1
    """Held-out episodes, split as `train_tokenizer` splits them."""
    eval_frames: int = 512
    """Evenly spaced held-out frames the tokenizers and codecs are measured on."""
    timing_batches: tuple[int, ...] = (1, 64)
    seconds: float = 2.0
    """Timed seconds per speed measurement (at least one call, after one untimed call)."""
    resolutions: tuple[int, ...] = (64, 128, 256, 512)
    resolution_batch: int = 1
    qualities: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(QUALITIES))
    device: str = "auto"
    seed: int = 0


def rate_name(rate: dict[str, Any]) -> str:
    """{"levels": [8, 6, 5]} -> "levels=8,6,5"."""

    def show(value: Any) -> str:
        return ",".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)

    return " ".join(f"{key}={show(value)}" for key, value in sorted(rate.items())) or "preset"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """`Tokenizer(config)`, or BackboneUnavailable saying why this checkout cannot build it."""
    allowed = typing.get_args(typing.get_type_hints(TokenizerConfig)["backbone"])
    if allowed and config.backbone not in allowed:
        raise BackboneUnavailable(
            f"backbone {config.backbone!r} is not in this checkout (TokenizerConfig.backbone is one of {list(allowed)})"
        )
    try:
        return Tokenizer(config)
    except (KeyError, ValueError, TypeError) as err:
        raise BackboneUnavailable(f"backbone {config.backbone!r} cannot be built: {err!r}") from err


def _check_buildable(jobs: list[tuple[str, dict[str, Any], TokenizerConfig]]) -> None:
    """ConfigError before any work where a rate setting cannot make a tokenizer with a backbone asked for, or where
    no backbone asked for is in this checkout: one that is not is skipped, as a bench across checkouts wants, but a
    bench of nothing is a typo."""
    allowed = typing.get_args(typing.get_type_hints(TokenizerConfig)["backbone"])
    missing = {backbone for backbone, _, _ in jobs if allowed and backbone not in allowed}
    for backbone, rate, model in jobs:
        if backbone in missing:
            continue
        try:
            build_tokenizer(model)
        except BackboneUnavailable as err:
            raise ConfigError(
                f"tokenizer rate {rate_name(rate)} with backbone {backbone!r}: {err.__cause__ or err}"
            ) from None
    if missing and missing == {backbone for backbone, _, _ in jobs}:
        raise ConfigError(
            f"no backbone asked for is in this checkout ({sorted(missing)}; TokenizerConfig.backbone is one of"
            f" {list(allowed)})"
        )


def model_config(base: TokenizerConfig, backbone: str, rate: dict[str, Any], **fields: Any) -> TokenizerConfig:
    """`base` with the rate's fields and `fields` set, checked like a preset, and the backbone set (checked by
    `build_tokenizer`, so that a backbone this checkout lacks is skipped rather than refused)."""
    merged = {**dataclasses.asdict(base), **rate, **fields}
    merged.pop("backbone", None)
    config = from_dict(TokenizerConfig, merged, where=f"tokenizer rate {rate_name(rate)}")
    return dataclasses.replace(config, backbone=backbone)


def frames_per_s(step: Callable[[], Any], frames: int, seconds: float, device: torch.device) -> float:
    """Frames per second of `step`, which handles `frames` frames: one untimed call, then calls until `seconds`."""

    def call() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        call()
        return frames * timed_rate(call, seconds)


def speed(
    tokenizer: Tokenizer, frames: np.ndarray, batch_sizes: tuple[int, ...], seconds: float, device: torch.device
) -> dict[str, dict[str, float]]:
    """Encode (uint8 frames -> tokens) and decode (tokens -> uint8 frames) frames/s at each batch size."""
    out: dict[str, dict[str, float]] = {"encode_frames_per_s": {}, "decode_frames_per_s": {}}
    for batch_size in batch_sizes:
        index = np.arange(batch_size) % len(frames)
        batch = torch.from_numpy(np.ascontiguousarray(frames[index])).to(device)
        with torch.inference_mode():
            tokens = tokenizer.encode(batch).tokens
        out["encode_frames_per_s"][str(batch_size)] = frames_per_s(
            lambda batch=batch: tokenizer.encode(batch).tokens, batch_size, seconds, device
        )
        out["decode_frames_per_s"][str(batch_size)] = frames_per_s(
            lambda tokens=tokens: tokenizer.tokens_to_frames(tokens), batch_size, seconds, device
        )
    return out


def trained_tokenizer(
    dataset_dir: Path, folder: Path, stage: TokenizerStage, val_fraction: float, device: str
) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer of `stage` trained in `folder` by `train_tokenizer`, or the one already there.

    Returns the tokenizer and its training record (`train.json`: the budget, the training seconds, the step it
    resumed from). A finished tokenizer of fewer steps is trained on to the budget; one of another config,
    dataset, batch size or learning rate, or of more steps, is refused rather than silently reused.
    """
    path, record_path = folder / TOKENIZER, folder / "train.json"
    last = resumable(path)
    steps, budget = stage.train.steps, train_budget(stage.train)
    elsewhere = f"delete {folder} or write to another --out"

    def step_of(checkpoint: Path) -> int | None:
        if not checkpoint_exists(checkpoint):
            return None
        meta, _ = read_checkpoint(checkpoint, TOKENIZER)
        if not config_matches(meta.get("config"), stage.model) or meta.get("dataset") != str(dataset_dir):
            raise ConfigError(f"{checkpoint} holds a tokenizer of another config or dataset; {elsewhere}")
        if int(meta.get("step", 0)) > steps:
            raise ConfigError(
                f"{checkpoint} was trained {meta.get('step')} steps, past the budget of {steps}; {elsewhere}"
            )
        return int(meta.get("step", 0))

    record = read_json(record_path, {})
    changed = sorted(k for k in budget if k != "steps" and k in record and record[k] != budget[k])
    if changed:
        raise ConfigError(f"{folder} was trained with another {' and '.join(changed)}; {elsewhere}")
    if step_of(path) == steps:
        tqdm.write(f"  loaded {path} (trained {steps} steps)")
        return load_tokenizer(path, resolve_device(device))[0], record
    resumed_from = step_of(last) or 0
    logger = RunLogger(folder)
    began = time.perf_counter()
    try:
        train_tokenizer(dataset_dir, folder, stage, logger, val_fraction, device)
    finally:
        logger.close()
    seconds = time.perf_counter() - began
    record = {
        **budget,
        "train_seconds": seconds + record.get("train_seconds", 0.0),
        "resumed_from_step": resumed_from,
        # after an interrupted run the seconds before the interruption are unknown
        "train_seconds_complete": resumed_from == 0 or record.get("steps") == resumed_from,
    }
    write_json_atomic(record_path, record)
    return load_tokenizer(path, resolve_device(device))[0], record


def held_out_frames(dataset: Dataset, val_fraction: float, count: int) -> tuple[np.ndarray, list[int]]:
    """`count` evenly spaced frames of the held-out episodes, chosen as `train_tokenizer` chooses its own."""
    _, val_ids = dataset.split(val_fraction)
    usable = dataset.usable(val_ids)
    if not usable:
        raise DatasetError(f"{dataset.root}: none of the held-out episodes {val_ids} loads")
    frames = FrameSampler(dataset, usable).all_frames()
    return np.ascontiguousarray(frames[np.linspace(0, len(frames) - 1, min(count, len(frames))).astype(int)]), usable


def cached_codecs(path: Path, frames: np.ndarray, qualities: dict[str, tuple[int, ...]]) -> dict[str, list[CodecPoint]]:
    """The codecs' points on `frames`, from `path` when it holds them for the same frames and qualities."""
    key = {
        "frames_sha256": hashlib.sha256(frames.tobytes()).hexdigest(),
        "frames_shape": list(frames.shape),
        "qualities": {codec: list(q) for codec, q in qualities.items()},
    }
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except json.JSONDecodeError:
            cached = {}
        if cached.get("key") == key:
            tqdm.write(f"codec curves from {path}")
            return {codec: [CodecPoint(**p) for p in cached["points"][codec]] for codec in qualities}
    points = measure_codecs(frames, qualities)
    write_json_atomic(
        path, {"key": key, "points": {c: [dataclasses.asdict(p) for p in ps] for c, ps in points.items()}}
    )
    return points


def resolution_timing(
    base: TokenizerConfig, config: TokenizerBenchConfig, channels: int, device: torch.device
) -> list[dict[str, Any]]:
    """Encode and decode ms per frame of untrained tokenizers of each backbone at each square resolution (the
    first rate setting; the token grid grows with the resolution)."""
    rows = []
    rate = config.rates[0] if config.rates else {}
    cells = [(b, s) for b in config.backbones for s in config.resolutions]
    bar = tqdm(cells, desc="resolution timing", dynamic_ncols=True)
    for backbone, size in bar:
        bar.set_postfix_str(f"{backbone} {size}px")
        row: dict[str, Any] = {"backbone": backbone, "size": size}
        try:
            model = model_config(base, backbone, rate, image_size=size, channels=channels)
            torch.manual_seed(config.seed)
            tokenizer = build_tokenizer(model).to(device).eval()
        except (BackboneUnavailable, ConfigError) as err:
            rows.append({**row, "skipped": str(err)})
            continue
        generator = torch.Generator().manual_seed(config.seed)
        frames = torch.randint(0, 256, (config.resolution_batch, size, size, channels), generator=generator)
        frames = frames.to(torch.uint8).numpy()
        try:
            rates = speed(tokenizer, frames, (config.resolution_batch,), config.seconds, device)
        except torch.OutOfMemoryError as err:
            rows.append({**row, "skipped": f"out of memory: {err}"})
            continue
        finally:
            del tokenizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch = str(config.resolution_batch)
        rows.append(
            {
                **row,
                "tokens_per_frame": model.tokens_per_frame,
                "batch_size": config.resolution_batch,
                "encode_ms_per_frame": 1000 / rates["encode_frames_per_s"][batch],
                "decode_ms_per_frame": 1000 / rates["decode_frames_per_s"][batch],
            }
        )
    return rows


def bench_tokenizer(
    dataset_dir: str | Path,
    out_dir: str | Path,
    stage: TokenizerStage | None = None,
    config: TokenizerBenchConfig | None = None,
) -> dict[str, Any]:
    """All figures of the module docstring; writes `tokenizer_bench.json`, `.md` and `rate_distortion.png` to
    `out_dir`, with each tokenizer in `out_dir/tokenizers/<backbone>-<rate>/`. `stage` gives the tokenizer model
    the rates modify and the training settings; its steps and batch size are replaced by the config's."""
    config = config or TokenizerBenchConfig()
    stage = stage or TokenizerStage()
    if not config.rates:
        raise ConfigError("the tokenizer bench needs at least one rate setting")
    dataset_dir, out_dir = Path(dataset_dir).resolve(), Path(out_dir)
    device = resolve_device(config.device)
    dataset = Dataset.open(dataset_dir)
    height, width, channels = dataset.frame_shape
    shape = {"image_size": height, "image_width": None if width == height else width, "channels": channels}
    train_ids, _ = dataset.split(config.val_fraction)
    frames, val_ids = held_out_frames(dataset, config.val_fraction, config.eval_frames)
    train = dataclasses.replace(
        stage.train, steps=config.steps, batch_size=config.batch_size, max_minutes=None, seed=config.seed
    )
    tqdm.write(
        f"tokenizer bench: {len(frames)} held-out frames of {len(val_ids)} episodes; each tokenizer trained "
        f"{train.steps} steps at batch {train.batch_size} on {len(train_ids)} episodes"
    )
    jobs = [
        (backbone, rate, model_config(stage.model, backbone, rate, **shape))
        for backbone in config.backbones
        for rate in config.rates
    ]  # every rate setting checked before any work
    _check_buildable(jobs)
    codecs = cached_codecs(out_dir / "codecs.json", frames, {codec: config.qualities[codec] for codec in CODECS})
    # the first optimizer built in a process imports torch._dynamo (seconds): not the first tokenizer's training
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    rows = []
    for number, (backbone, rate, model) in enumerate(jobs, 1):
        name = rate_name(rate)
        row: dict[str, Any] = {"backbone": backbone, "rate": name, "rate_fields": rate}
        tqdm.write(f"[{number}/{len(jobs)}] {backbone} {name}")
        try:
            build_tokenizer(model)
        except BackboneUnavailable as err:
            tqdm.write(f"  skipped: {err}")
            rows.append({**row, "skipped": str(err)})
            continue
        folder = out_dir / "tokenizers" / _slug(f"{backbone}-{name}")
        tokenizer, record = trained_tokenizer(
            dataset_dir, folder, TokenizerStage(model, train, stage.val_frames), config.val_fraction, config.device
        )
        tokenizer = tokenizer.to(device).eval()
        figures = tokenizer_figures(tokenizer, frames, device, codecs)
        figures.update(speed(tokenizer, frames, config.timing_batches, config.seconds, device))
        rows.append(
            {
                **row,
                "checkpoint": str(folder / TOKENIZER),
                "train_seconds": record.get("train_seconds"),
                "resumed_from_step": record.get("resumed_from_step"),
                "train_seconds_complete": record.get("train_seconds_complete"),
                **figures,
            }
        )
        tqdm.write(
            f"  {figures['bytes_per_frame']:.1f} B/frame ({figures['entropy_coded_bytes_per_frame']:.1f} "
            f"entropy-coded), PSNR {figures['psnr']:.2f} dB, SSIM {figures['ssim']:.3f}; "
            f"WebP at equal PSNR {_codec_bytes(figures, 'webp')} B"
        )
    timing = resolution_timing(stage.model, config, channels, device)
    results = {
        "dataset": str(dataset_dir),
        "frame_shape": [height, width, channels],
        "train_episodes": len(train_ids),
        "held_out_episodes": val_ids,
        "frames": len(frames),
        "budget": {**train_budget(train), "seed": train.seed},
        "base_model": dataclasses.asdict(stage.model),
        "config": dataclasses.asdict(config),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tokenizers": rows,
        "codecs": {codec: [dataclasses.asdict(p) for p in points] for codec, points in codecs.items()},
        "resolution_timing": timing,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "tokenizer_bench.json", results)
    write_text_atomic(out_dir / "tokenizer_bench.md", format_markdown(results))
    plot_rate_distortion(results, out_dir / "rate_distortion.png")
    return results


def train_budget(train: TrainConfig) -> dict[str, Any]:
    """The training settings every tokenizer of a bench shares, as recorded and compared on reuse."""
    fields = ("steps", "batch_size", "lr", "warmup_steps", "schedule", "min_lr_ratio")
    return {name: getattr(train, name) for name in fields}


def _schedule_words(budget: dict[str, Any]) -> str:
    """The warm-up and decay in words for the markdown (nothing for benches written before these fields)."""
    words = f", warm-up {budget['warmup_steps']} steps" if "warmup_steps" in budget else ""
    if budget.get("schedule") == "cosine":
        words += f", cosine decay to {budget.get('min_lr_ratio', 0.0)} x"
    return words


def _levels_used(row: dict[str, Any]) -> str:
    """ "8/8, 3/6, 5/5": the levels each FSQ channel uses of its own."""
    return ", ".join(f"{used}/{levels}" for used, levels in zip(row["levels_used"], row["levels"], strict=True))


def _latent_range(row: dict[str, Any]) -> str:
    """ "-1.9..2.1, -0.2..0.3": each channel's 1st to 99th percentile before the quantizer."""
    return ", ".join(f"{low:.1f}..{high:.1f}" for low, high in zip(row["latent_p01"], row["latent_p99"], strict=True))


def format_markdown(results: dict[str, Any]) -> str:
    """The bench's tables: rate and distortion, speed and size, the codecs' curves, time by resolution."""
    budget = results["budget"]
    trained = [row for row in results["tokenizers"] if "skipped" not in row]
    lines = [
        "# Tokenizer bench",
        "",
        f"Dataset `{results['dataset']}` ({results['frame_shape'][0]}x{results['frame_shape'][1]} frames). Every "
        f"tokenizer was trained with the same budget: {budget['steps']} steps at batch {budget['batch_size']} "
        f"(lr {budget['lr']}{_schedule_words(budget)}, seed {budget['seed']}, no wall-clock cap) on "
        f"{results['train_episodes']} training "
        f"episodes, and is measured on {results['frames']} frames of the held-out episodes "
        f"({len(results['held_out_episodes'])} of them); the codecs on the same frames. Device {results['device']}, "
        f"torch threads: {results['threads']}, torch {results['torch']}. Training seconds include the periodic "
        "validation of `train_tokenizer` ('>=' when an interrupted training resumed).",
        "",
        "Rate and distortion. Raw: tokens x log2(codebook) / 8; entropy-coded: the tokens' empirical zeroth-order "
        "entropy (each frame coded alone, as WebP and JPEG code them); LZMA: the bit-packed token stream of all "
        "the frames compressed at once. Levels used and the latent's percentiles are per FSQ channel, before "
        "rounding: a channel that uses few of its levels, or whose latent stays near 0, has collapsed; channels that "
        "each use all their levels but move together show only in the codes used. WebP/JPEG bytes at equal PSNR "
        "are interpolated on their measured curves ('<=' or '>' when the PSNR lies outside them); the ratio is "
        "WebP's bytes over our raw bytes.",
        "",
        "| backbone | rate | tokens x bits | raw B/frame | entropy-coded B | LZMA B | PSNR dB | SSIM | codes used "
        "| levels used per channel | latent 1st..99th percentile | WebP B at equal PSNR | WebP ratio "
        "| JPEG B at equal PSNR | WebP PSNR at equal B |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["tokenizers"]:
        if "skipped" in row:
            lines.append(f"| {row['backbone']} | {row['rate']} | skipped: {row['skipped']} |" + " |" * 12)
            continue
        lines.append(
            f"| {row['backbone']} | {row['rate']} | {row['tokens_per_frame']} x "
            f"{np.log2(row['codebook_size']):.1f} | {row['bytes_per_frame']:.1f} | "
            f"{row['entropy_coded_bytes_per_frame']:.1f} | {row['lzma_bytes_per_frame']:.1f} | {row['psnr']:.2f} | "
            f"{row['ssim']:.3f} | {row['codes_used']} / {row['codebook_size']} | {_levels_used(row)} | "
            f"{_latent_range(row)} | {_codec_bytes(row, 'webp')} | "
            f"{_number(row['webp_ratio'], 2)} | {_codec_bytes(row, 'jpeg')} | "
            f"{_number(row['webp_psnr_at_equal_bytes'], 2)} |"
        )
    if trained:
        batches = list(trained[0]["encode_frames_per_s"])
        lines += [
            "",
            "Speed and size on this machine (frames/s; encode: uint8 frames to tokens, decode: tokens to uint8 "
            "frames).",
            "",
            "| backbone | rate | parameters (M) | encoder / decoder (M) | train s | "
            + " | ".join(f"encode b{b}" for b in batches)
            + " | "
            + " | ".join(f"decode b{b}" for b in batches)
            + " |",
            "|---|---|---|---|---|" + "---|" * (2 * len(batches)),
        ]
        for row in trained:
            lines.append(
                f"| {row['backbone']} | {row['rate']} | {row['parameters'] / 1e6:.3f} | "
                f"{row['encoder_parameters'] / 1e6:.3f} / {row['decoder_parameters'] / 1e6:.3f} | "
                f"{'' if row['train_seconds_complete'] is not False else '>= '}{_number(row['train_seconds'], 0)} | "
                + " | ".join(_number(row["encode_frames_per_s"][b], 0) for b in batches)
                + " | "
                + " | ".join(_number(row["decode_frames_per_s"][b], 0) for b in batches)
                + " |"
            )
    lines += ["", "The codecs on the same frames (mean file size per frame, PSNR and SSIM averaged per frame).", ""]
    lines += ["| codec | quality | B/frame | PSNR dB | SSIM |", "|---|---|---|---|---|"]
    for codec, points in results["codecs"].items():
        for p in points:
            lines.append(
                f"| {codec} | {p['quality']} | {p['bytes_per_frame']:,.0f} | {p['psnr']:.2f} | {p['ssim']:.3f} |"
            )
    timing = results["resolution_timing"]
    sizes = sorted({row["size"] for row in timing})
    lines += [
        "",
        "Encode and decode time by resolution: untrained tokenizers (the first rate setting; the token grid grows "
        "with the frame), ms per frame at batch "
        f"{results['config']['resolution_batch']}, encode / decode (tokens per frame).",
        "",
        "| backbone | " + " | ".join(f"{s}x{s}" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    reasons: list[str] = []
    for backbone in dict.fromkeys(row["backbone"] for row in timing):
        cells = []
        for size in sizes:
            row = next((r for r in timing if r["backbone"] == backbone and r["size"] == size), None)
            if row is None or "skipped" in row:
                if row is not None and row["skipped"] not in reasons:
                    reasons.append(row["skipped"])
                cells.append("skipped" if row is None else f"skipped ({reasons.index(row['skipped']) + 1})")
            else:
                cells.append(
                    f"{row['encode_ms_per_frame']:.2f} / {row['decode_ms_per_frame']:.2f} ({row['tokens_per_frame']})"
                )
        lines.append(f"| {backbone} | " + " | ".join(cells) + " |")
    if reasons:
        lines += [""] + [f"({number}) {reason}" for number, reason in enumerate(reasons, 1)]
    return "\n".join(lines) + "\n"


def plot_rate_distortion(results: dict[str, Any], path: Path) -> None:
    """PSNR against bytes per frame (log scale): the codecs' curves, and each tokenizer at its raw (filled) and
    entropy-coded (hollow) rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for codec, points in results["codecs"].items():
        ordered = sorted(points, key=lambda p: p["bytes_per_frame"])
        ax.plot(
            [p["bytes_per_frame"] for p in ordered],
            [p["psnr"] for p in ordered],
            marker=".",
            linestyle="--",
            color="0.55" if codec == "jpeg" else "0.2",
            label=codec.upper(),
        )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    backbones = list(dict.fromkeys(row["backbone"] for row in results["tokenizers"]))
    markers = "osD^v<>p"
    rates = list(dict.fromkeys(row["rate"] for row in results["tokenizers"]))
    for row in results["tokenizers"]:
        if "skipped" in row:
            continue
        color = colors[backbones.index(row["backbone"]) % len(colors)]
        marker = markers[rates.index(row["rate"]) % len(markers)]
        raw, coded = row["bytes_per_frame"], row["entropy_coded_bytes_per_frame"]
        ax.plot([max(coded, raw / 100), raw], [row["psnr"]] * 2, color=color, linewidth=0.8, alpha=0.6)
        ax.plot(raw, row["psnr"], marker=marker, color=color, linestyle="", label=f"{row['backbone']} {row['rate']}")
        if coded > 0:  # constant tokens have no entropy: nothing to draw on a log axis
            ax.plot(coded, row["psnr"], marker=marker, markerfacecolor="none", color=color, linestyle="")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per frame (tokenizers: filled raw, hollow entropy-coded)")
    ax.set_ylabel("PSNR (dB)")
    budget = results["budget"]
    ax.set_title(f"held-out frames; tokenizers: {budget['steps']} steps at batch {budget['batch_size']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)
