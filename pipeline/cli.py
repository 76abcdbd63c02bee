"""The `worldmodel` command: it parses the user's request and hands it to the pipeline, a bench or one stage,
importing each lazily so that `--help` and a refused setting answer at once."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

OVERRIDES_HELP = "config overrides as section.key=value, e.g. tokenizer.train.steps=200 ppo.num_envs=32"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="preset name in configs/ or a path to a YAML file")
    parser.add_argument(
        "--source",
        default=None,
        help="data source, a registered simulator: carracing (CarRacing-v3) or highway (highway-env); default: the"
        " preset's, carracing",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="run name (folder under runs/); default: <preset>-<source>, with a preset file's stem (its own run.name"
        " is not used: a run's config.yaml given as the preset starts a new run, not that run's folder)",
    )
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _config(args: argparse.Namespace):
    from agents.config import load_pipeline_config

    config = load_pipeline_config(args.preset, args.overrides, args.source)
    if args.name:
        from worldmodel.config import check_run_name

        config.run.name = check_run_name(args.name, "--name")
    elif not any(o.startswith("run.name=") for o in args.overrides):
        config.run.name = f"{Path(args.preset).stem}-{config.collect.source.name}"
    if args.command in ("run", "train") or (args.command == "collect" and not args.out):
        from worldmodel.files import check_output_place

        check_output_place(config.run_dir, folder=True)  # run.runs_dir=a_file would fail only once a stage writes
    if config.run.time_scale == "auto" and args.command != "run":
        from worldmodel.config import ConfigError

        # measured once, when a run starts, and kept in its config.yaml; torchrun's ranks would each measure another
        raise ConfigError(
            f"run.time_scale=auto is for `worldmodel run`, which measures the machine once for the run; give "
            f"`worldmodel {args.command}` a number"
        )
    return config


def _machine_scaled(config, preset: str):
    """`run.time_scale: auto` made a number (`bench.train_step.auto_time_scale`: the run folder's recorded factor,
    else this machine measured now), the minute budgets scaled by it. The factor is the whole one against the
    reference machine: a preset that is itself a scaled run's config.yaml (`run.scaled_by` N) gets it divided by N."""
    from agents.config import scale_minutes
    from bench.train_step import auto_time_scale

    config.run.time_scale = auto_time_scale(config, preset) / config.run.scaled_by
    return scale_minutes(config)


def _logger(config):
    from worldmodel import distributed
    from worldmodel.logger import RunLogger

    # under torchrun only rank 0 logs (the trainer logs nothing on the others; no wandb run for each rank either)
    return RunLogger(config.run_dir, config.run.wandb if distributed.is_main() else "disabled")


def cmd_run(args: argparse.Namespace) -> None:
    from pipeline.run import run_pipeline

    config = _config(args)
    if config.run.time_scale == "auto":
        config = _machine_scaled(config, args.preset)
    run_pipeline(config)


def cmd_collect(args: argparse.Namespace) -> None:
    from envs.collect import collect

    config = _config(args)
    out = Path(args.out) if args.out else config.dataset_dir
    dataset = collect(config.collect, out)
    print(f"{len(dataset)} episodes, {sum(e.length for e in dataset.episodes)} steps in {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from worldmodel import distributed
    from worldmodel.config import ConfigError
    from worldmodel.train import train_dynamics, train_tokenizer

    config = _config(args)
    if args.real and args.component != "policy":
        raise ConfigError(f"--real trains a policy in the real simulator; `train {args.component}` has no such mode")
    if not (args.component == "policy" and args.real) and _real_ppo_given(args):
        raise ConfigError(
            "--minutes, --max-steps, --envs, --snapshot-minutes and --rollout-steps set `train policy --real`, not"
            " this command"
        )
    data = Path(args.data) if args.data else config.dataset_dir
    logger = _logger(config)
    if args.component == "tokenizer":
        figures = train_tokenizer(
            data, config.run_dir, config.tokenizer, logger, config.run.val_fraction, config.run.device
        )
    elif args.component == "dynamics":
        figures = train_dynamics(
            data, config.run_dir, config.dynamics, logger, config.run.val_fraction, config.run.device
        )
    elif args.real:
        from agents.real_ppo import train_real_ppo

        figures = train_real_ppo(config.run_dir, config.collect.source, config.ppo, _real_ppo(args), logger)
    else:
        from agents.ppo import train_ppo

        figures = train_ppo(config.run_dir, config.ppo, logger, config.run.device)
    logger.close()
    if distributed.is_main():
        print(json.dumps(figures, indent=2))


def _existing_run(config) -> Path:
    """The run folder `config` names, or CheckpointError where there is none (a misspelt --name)."""
    from worldmodel.checkpoint import CheckpointError

    if not config.run_dir.is_dir():
        raise CheckpointError(
            f"{config.run_dir} does not exist: no run named {config.run.name!r} in {config.run.runs_dir}; give --name"
            " of a run `worldmodel run` made (default: <preset>-<source>)"
        )
    return config.run_dir


def cmd_evaluate(args: argparse.Namespace) -> None:
    from agents.evaluate import evaluate
    from agents.loop import driven_seeds
    from agents.ppo import POLICY
    from worldmodel.checkpoint import read_checkpoint

    config = _config(args)
    _existing_run(config)
    policy = Path(args.policy) if args.policy else None
    if policy is not None:
        read_checkpoint(policy, POLICY)  # a missing or foreign checkpoint stops here, before any episode is driven
    data = Path(args.data) if args.data else config.dataset_dir
    used = driven_seeds(config.run_dir, data)
    print(json.dumps(evaluate(config.run_dir, config.collect.source, config.eval, used, policy=policy), indent=2))


def cmd_rollout(args: argparse.Namespace) -> None:
    from worldmodel.rollout import write_rollout

    config = _config(args)
    _existing_run(config)
    data = Path(args.data) if args.data else config.dataset_dir
    print(json.dumps(write_rollout(config.run_dir, data, config.rollout, args.out), indent=2))


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(item) for item in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _int_at_least(low: int, expected: str):
    """An argparse type: one integer >= `low`, or an error saying `expected`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_non_negative_int = _int_at_least(0, "an integer >= 0")
_positive_int = _int_at_least(1, "a positive integer")


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}")
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _output(folder: bool) -> Callable[[str], str]:
    """An argparse type for an output file's (or folder's) path, refused as it is parsed where it cannot be written
    (a folder where a file goes, a file among the folders above it), not after the work that fills it."""

    def check(text: str) -> str:
        from worldmodel.files import UnwritablePath, check_output_place

        try:
            check_output_place(text, folder=folder)
        except UnwritablePath as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return check


_output_file, _output_folder = _output(folder=False), _output(folder=True)


def _rate_or_zero(text: str) -> float:
    """A frame rate: a positive number, or 0 for as fast as it runs."""
    try:
        if float(text) == 0:
            return 0.0
        return _positive_float(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected a positive number or 0, got {text!r}") from None


def cmd_bench_imagination(args: argparse.Namespace) -> None:
    from bench.imagination import ImaginationBenchConfig, bench_imagination, format_table

    config = ImaginationBenchConfig(
        batch_sizes=args.batch_sizes,
        seconds=args.seconds,
        rounds=args.rounds,
        real_envs=args.real_envs,
        preset_shapes=tuple(name for name in args.preset_shapes.split(",") if name),
        device=args.device,
        dtype=args.dtype,
        temperature=args.temperature,
        top_k=args.top_k,
        refine_steps=args.refine_steps,
    )
    print(format_table(bench_imagination(args.run, config, args.json)))


def cmd_bench_dynamics(args: argparse.Namespace) -> None:
    from bench.dynamics import DynamicsBenchConfig, bench_dynamics
    from bench.faithfulness import ProbeConfig
    from worldmodel.world_model import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.refine_steps)
    config = DynamicsBenchConfig(
        episodes=args.episodes, sampling=sampling, faithfulness=ProbeConfig(states=args.states, sampling=sampling)
    )
    from worldmodel.run_dir import RunDir

    fidelity = RunDir(args.run).fidelity  # where the run's report finds them
    json_path = args.json or fidelity.with_suffix(".json")
    figures = bench_dynamics(args.run, args.data, config, json_path, args.plot or fidelity.with_suffix(".png"))
    print(json.dumps(figures, indent=2))


def cmd_bench_reliability(args: argparse.Namespace) -> None:
    from bench.reliability import ReliabilityConfig, SeedFailed, bench_reliability, format_markdown

    config = ReliabilityConfig(
        preset=args.preset,
        source=args.source,
        seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
        name=args.name,
        runs_dir=args.runs_dir,
        overrides=list(args.overrides),
    )
    out = Path(args.out) if args.out else Path(args.runs_dir) / config.run_name
    try:
        print(format_markdown(bench_reliability(config, out)))
    except SeedFailed as failed:
        print(f"error: {failed}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out / 'reliability.json'} and {out / 'reliability.md'}")


def cmd_bench_verdict(args: argparse.Namespace) -> None:
    from bench.verdict import VerdictConfig, bench_verdict, format_markdown

    config = VerdictConfig(episodes=args.episodes, seed=args.seed, kinds=args.drivers, workers=args.workers)
    print(format_markdown(bench_verdict(args.run, config, args.json)))


def cmd_bench_branch(args: argparse.Namespace) -> None:
    from bench.branch import branch_run
    from pipeline.run import run_pipeline
    from worldmodel.config import check_run_name

    run = Path(args.run)
    config = branch_run(run, run.parent / check_run_name(args.name, "--name"), args.round, list(args.overrides))
    print(f"{config.run_dir}: {run} cut back to before loop round {args.round}'s PPO; running on")
    run_pipeline(config)


def cmd_bench_baseline(args: argparse.Namespace) -> None:
    from bench.baseline import BaselineConfig, bench_baseline, format_markdown

    checked = tuple(key for key in _real_ppo_given(args) if key in BaselineConfig.checked)
    config = BaselineConfig(_real_ppo(args), args.episodes, checked)
    results = bench_baseline(args.run, config, Path(args.out) if args.out else None)
    print(format_markdown(results))


def cmd_bench_clone(args: argparse.Namespace) -> None:
    from agents.clone import CloneConfig
    from bench.clone import bench_clone, format_markdown

    config = CloneConfig(minutes=args.minutes, max_steps=args.max_steps)
    results = bench_clone(args.run, config, args.episodes, Path(args.out) if args.out else None)
    print(format_markdown(results))


def _sights(text: str) -> list[tuple[float, float] | None]:
    """ "all,13:51,11:25.6" -> [None, (13.0, 51.0), (11.0, 25.6)]: (behind, ahead) metres, or all of the road."""
    sights: list[tuple[float, float] | None] = []
    for item in text.split(","):
        if item.strip() == "all":
            sights.append(None)
            continue
        from envs.sources import check_view

        try:
            sight = tuple(float(part) for part in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated BEHIND:AHEAD metres or 'all', got {item!r}"
            ) from None
        try:
            check_view(sight, "sight")
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        sights.append(sight)
    return sights


def cmd_bench_train_step(args: argparse.Namespace) -> None:
    from bench.train_step import TrainStepBenchConfig, bench_train_step, format_table
    from worldmodel.files import write_json_atomic

    config = TrainStepBenchConfig(presets=args.presets, dtypes=args.dtypes, seconds=args.seconds, device=args.device)
    figures = bench_train_step(config)
    if args.json:
        write_json_atomic(args.json, figures)
    print(format_table(figures))


def cmd_bench_sight(args: argparse.Namespace) -> None:
    from bench.sight import bench_sight, format_markdown, write_results

    rows = bench_sight(args.sights, args.episodes, workers=args.workers)
    if args.json:
        write_results(rows, Path(args.json))
    print(format_markdown(rows))


def _rate(text: str) -> dict:
    """A rate setting: a YAML mapping of tokenizer model fields, e.g. '{levels: [8, 6, 5]}'."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict) or not value:
        raise argparse.ArgumentTypeError(
            f"expected a YAML mapping of tokenizer fields, e.g. '{{levels: [8, 6, 5]}}', got {text!r}"
        )
    return value


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _qualities(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(item) for item in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 0 or max(values) > 100:
        raise argparse.ArgumentTypeError(f"expected comma-separated qualities in [0, 100], got {text!r}")
    return values


def _codec_qualities(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    from bench.codecs import QUALITIES

    return {"webp": args.webp_qualities or QUALITIES["webp"], "jpeg": args.jpeg_qualities or QUALITIES["jpeg"]}


def cmd_bench_tokenizer(args: argparse.Namespace) -> None:
    from agents.config import load_pipeline_config
    from bench.tokenizer import DEFAULT_RATES, TokenizerBenchConfig, bench_tokenizer, format_markdown
    from worldmodel.dataset import Dataset

    # the preset's tokenizer section, with its overlay for the dataset's source (as `worldmodel train` uses it)
    source = Dataset.open(args.data).manifest.source
    from envs.sources import SOURCES

    pipeline = load_pipeline_config(args.preset, args.overrides, source if source in SOURCES else None)
    config = TokenizerBenchConfig(
        backbones=args.backbones,
        rates=tuple(args.rate) if args.rate else DEFAULT_RATES,
        steps=args.steps,
        batch_size=args.batch_size,
        val_fraction=pipeline.run.val_fraction,
        eval_frames=args.eval_frames,
        timing_batches=args.batch_sizes,
        seconds=args.seconds,
        resolutions=args.resolutions,
        qualities=_codec_qualities(args),
        device=args.device,
        seed=pipeline.tokenizer.train.seed,
    )
    out = Path(args.out)
    results = bench_tokenizer(args.data, out, pipeline.tokenizer, config)
    print(format_markdown(results))
    print(f"wrote {out / 'tokenizer_bench.md'}, {out / 'tokenizer_bench.json'} and {out / 'rate_distortion.png'}")


def cmd_eval_tokenizer(args: argparse.Namespace) -> None:
    from bench.tokenizer import EvalConfig, eval_tokenizer, format_eval

    config = EvalConfig(
        max_frames=args.max_frames, batch_size=args.batch_size, device=args.device, qualities=_codec_qualities(args)
    )
    print(format_eval(eval_tokenizer(args.checkpoint, args.frames, args.json, config)))
    if args.json:
        print(f"wrote {args.json}")


def _codec_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--webp-qualities", type=_qualities, default=None, help="WebP qualities to measure (default: 0 to 100)"
    )
    parser.add_argument(
        "--jpeg-qualities", type=_qualities, default=None, help="JPEG qualities to measure (default: 1 to 100)"
    )


def _sampling_flags(parser: argparse.ArgumentParser, from_run: bool) -> None:
    """How the dream draws its tokens: by default the run's own (its `ppo` section) where `from_run`, else greedy."""
    parser.add_argument(
        "--temperature",
        type=float,
        default=None if from_run else 0.0,
        help="dream sampling temperature (default: " + ("the run's ppo.temperature)" if from_run else "0, greedy)"),
    )
    parser.add_argument(
        "--top-k", type=_positive_int, default=None, help="sample among the k likeliest tokens (temperature > 0)"
    )
    parser.add_argument(
        "--refine-steps",
        type=_non_negative_int,
        default=None if from_run else 0,
        help="MaskGIT-style refinement rounds per imagined frame (needs dynamics.model.refine_layers > 0; default: "
        + ("the run's ppo.refine_steps)" if from_run else "0)"),
    )


def _real_ppo_flags(parser: argparse.ArgumentParser, note: str) -> None:
    """PPO in the real simulator (`train policy --real`, `bench baseline`); a flag left out is None (`_real_ppo`)."""
    parser.add_argument(
        "--minutes", type=_positive_float, default=None, help=f"{note}the real-simulator PPO's wall-clock budget (17)"
    )
    parser.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help=f"{note}at most this many real steps besides the minutes, in whole updates (default: the minutes alone)",
    )
    parser.add_argument("--envs", type=_positive_int, default=None, help=f"{note}real simulators, one process each (8)")
    parser.add_argument(
        "--snapshot-minutes", type=_positive_float, default=None, help=f"{note}keep a policy snapshot this often (2)"
    )
    parser.add_argument(
        "--rollout-steps",
        type=_positive_int,
        default=None,
        help=f"{note}steps each simulator takes between PPO updates (default: the dream PPO's steps an update, "
        "ppo.num_envs x ppo.rollout_steps, shared over the simulators)",
    )


REAL_PPO_FLAGS = {
    "minutes": "minutes",
    "max_steps": "max_steps",
    "num_envs": "envs",
    "snapshot_minutes": "snapshot_minutes",
    "rollout_steps": "rollout_steps",
}
"""`RealPPOConfig`'s fields by the `_real_ppo_flags` destination that sets each."""


def _real_ppo_given(args: argparse.Namespace) -> dict[str, object]:
    """The real-simulator PPO's settings given on the command line, by `RealPPOConfig` field."""
    return {key: getattr(args, flag) for key, flag in REAL_PPO_FLAGS.items() if getattr(args, flag) is not None}


def _real_ppo(args: argparse.Namespace):
    """The real-simulator PPO's settings from `_real_ppo_flags`: the defaults where a flag was left out."""
    from agents.real_ppo import RealPPOConfig

    return RealPPOConfig(**_real_ppo_given(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldmodel", description="Driving world model: collect, train, dream, evaluate."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _pipeline_commands(commands)
    _bench_commands(commands.add_parser("bench", help="measure trained models against their references"))
    _eval_commands(commands.add_parser("eval", help="measure one component on your own data"))
    return parser


def _pipeline_commands(commands: Any) -> None:
    """The run and its stages, one at a time."""
    run = commands.add_parser("run", help="the whole pipeline: collect, train, dream PPO, evaluate, video")
    _common(run)
    run.set_defaults(func=cmd_run)

    collect = commands.add_parser("collect", help="record episodes from a real simulator")
    _common(collect)
    collect.add_argument(
        "--out", type=_output_folder, default=None, help="dataset folder (default: runs/<name>/dataset)"
    )
    collect.set_defaults(func=cmd_collect)

    train = commands.add_parser("train", help="train one component of a run")
    train.add_argument("component", choices=["tokenizer", "dynamics", "policy"])
    _common(train)
    train.add_argument("--data", default=None, help="dataset folder (default: runs/<name>/dataset)")
    train.add_argument(
        "--real",
        action="store_true",
        help="policy: train PPO in the real simulator instead of the dream (on the run's tokens; RUN/real_ppo/); "
        "a killed training resumes at its last snapshot when run again with the same settings",
    )
    _real_ppo_flags(train, "--real: ")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score policy, random and expert in the real simulator")
    _common(evaluate)
    evaluate.add_argument("--data", default=None, help="dataset folder, to refuse its seeds")
    evaluate.add_argument(
        "--policy",
        default=None,
        help="a policy checkpoint to score instead of the run's, e.g. runs/NAME/loop/01/policy.safetensors",
    )
    evaluate.set_defaults(func=cmd_evaluate)

    rollout = commands.add_parser("rollout", help="video: real vs tokenizer vs dream on a held-out episode")
    _common(rollout)
    rollout.add_argument("--data", default=None, help="dataset folder (default: runs/<name>/dataset)")
    rollout.add_argument(
        "--out", type=_output_file, default=None, help="output path without suffix (default: runs/<name>/rollout)"
    )
    rollout.set_defaults(func=cmd_rollout)

    export = commands.add_parser(
        "export", help="a run cut down to what dreams need (weights, a few real contexts), to ship or hand on"
    )
    export.add_argument("run", help="run folder written by `worldmodel run`")
    export.add_argument("--out", type=_output_folder, required=True, help="folder to write (replaced whole)")
    export.add_argument(
        "--episodes", type=_positive_int, default=32, help="real episodes kept for dreams to start from"
    )
    export.add_argument("--note", default="", help="recorded in its model.json, e.g. the command that made the run")
    export.set_defaults(func=cmd_export)

    report = commands.add_parser("report", help="a run's self-contained HTML page (RUN/report.html)")
    report.add_argument("run", help="run folder written by `worldmodel run`")
    report.add_argument("--out", type=_output_file, default=None, help="HTML file to write (default: RUN/report.html)")
    report.set_defaults(func=cmd_report)

    play = commands.add_parser(
        "play", help="drive inside the dream in a window: arrows or WASD, P for the policy, R restarts, Esc quits"
    )
    play.add_argument("--run", default=None, help="run folder to play (default: the shipped CarRacing model)")
    play.add_argument("--side-by-side", action="store_true", help="the real simulator beside the dream, same keys")
    play.add_argument("--policy", action="store_true", help="the run's policy drives; P hands control back and forth")
    play.add_argument("--record", type=_output_file, default=None, help="save what the window shows to this .mp4")
    play.add_argument(
        "--keys", default=None, help="scripted keys instead of the keyboard, KEYS:FRAMES,..., e.g. up:20,up+left:10"
    )
    play.add_argument("--seed", type=_non_negative_int, default=0, help="first episode's seed (dream start, track)")
    play.add_argument("--scale", type=_positive_int, default=6, help="frame scaled up this many times")
    play.add_argument("--fps", type=_rate_or_zero, default=12.0, help="frames per second (0: as fast as it runs)")
    play.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many steps")
    play.set_defaults(func=cmd_play)


def cmd_export(args: argparse.Namespace) -> None:
    from worldmodel.export import export_model

    manifest = export_model(args.run, args.out, args.episodes, args.note)
    print(f"exported {args.run} to {args.out}: {len(manifest['episodes'])} context episodes")


def cmd_report(args: argparse.Namespace) -> None:
    from pipeline.report import write_report

    print(write_report(args.run, args.out))


def cmd_play(args: argparse.Namespace) -> None:
    from pipeline.play import PlayConfig, parse_keys, play

    config = PlayConfig(
        run=Path(args.run) if args.run else None,
        side_by_side=args.side_by_side,
        policy=args.policy,
        record=Path(args.record) if args.record else None,
        keys=parse_keys(args.keys) if args.keys is not None else None,
        seed=args.seed,
        scale=args.scale,
        fps=args.fps,
        max_steps=args.max_steps,
    )
    result = play(config)
    print(
        f"{result['steps']} steps, {result['episodes']} episode(s)"
        + (f"; saved {result['record']}" if result["record"] else "")
    )


def _bench_commands(bench: argparse.ArgumentParser) -> None:
    """Measurements of a trained run, or of several, against their references."""
    targets = bench.add_subparsers(dest="target", required=True)

    dynamics = targets.add_parser("dynamics", help="open-loop fidelity and action faithfulness of a run's dream")
    dynamics.add_argument("--run", required=True, help="run folder written by `worldmodel run` or `worldmodel train`")
    dynamics.add_argument("--data", default=None, help="dataset folder (default: RUN/dataset)")
    dynamics.add_argument(
        "--json",
        type=_output_file,
        default=None,
        help="write the figures to this JSON file (default: RUN/fidelity.json)",
    )
    dynamics.add_argument(
        "--plot",
        type=_output_file,
        default=None,
        help="the PSNR-by-horizon plot, a PNG file (default: RUN/fidelity.png)",
    )
    dynamics.add_argument("--episodes", type=_positive_int, default=16, help="held-out episodes rolled out open loop")
    dynamics.add_argument(
        "--states", type=_positive_int, default=12, help="start states probed for action faithfulness"
    )
    _sampling_flags(dynamics, from_run=False)
    dynamics.set_defaults(func=cmd_bench_dynamics)

    imagination = targets.add_parser("imagination", help="dream steps per second beside the real simulator")
    imagination.add_argument(
        "--run", required=True, help="run folder written by `worldmodel run` or `worldmodel train`"
    )
    imagination.add_argument("--json", type=_output_file, default=None, help="write the figures to this JSON file")
    imagination.add_argument(
        "--batch-sizes", type=_positive_ints, default=(1, 16, 256), help="dream batch sizes to time"
    )
    imagination.add_argument("--seconds", type=_positive_float, default=3.0, help="timed seconds per measurement")
    imagination.add_argument(
        "--rounds",
        type=_positive_int,
        default=3,
        help="rounds of simulator and dream timings; figures are their medians",
    )
    imagination.add_argument(
        "--real-envs", type=_non_negative_int, default=None, help="real simulators (default: one per CPU; 0: skip)"
    )
    imagination.add_argument(
        "--preset-shapes", default="", help="also time untrained dynamics of these presets, e.g. tiny,base"
    )
    imagination.add_argument("--device", type=_device, default="auto", help="cpu, cuda (cuda:N) or auto")
    imagination.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="the dream's precision"
    )
    _sampling_flags(imagination, from_run=True)
    imagination.set_defaults(func=cmd_bench_imagination)

    baseline = targets.add_parser(
        "baseline", help="a finished run's dream pipeline against PPO trained in the real simulator"
    )
    baseline.add_argument("--run", required=True, help="run folder written by `worldmodel run`")
    _real_ppo_flags(baseline, "")
    baseline.add_argument("--episodes", type=_positive_int, default=None, help="held-out episodes per policy")
    baseline.add_argument(
        "--out", type=_output_folder, default=None, help="folder of baseline.json, .md and .png (default: RUN/real_ppo)"
    )
    baseline.set_defaults(func=cmd_bench_baseline)

    clone = targets.add_parser(
        "clone", help="a finished run's dream policy against a clone of the scripted driver's recorded decisions"
    )
    clone.add_argument("--run", required=True, help="run folder written by `worldmodel run`")
    clone.add_argument("--minutes", type=_positive_float, default=3.0, help="the clone's wall-clock budget")
    clone.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="at most this many updates besides the minutes (default: the minutes alone; an existing RUN/clone is"
        " scored only with the budget it was fitted with)",
    )
    clone.add_argument("--episodes", type=_positive_int, default=None, help="held-out episodes per driver")
    clone.add_argument(
        "--out", type=_output_folder, default=None, help="folder of clone.json and .md (default: RUN/clone)"
    )
    clone.set_defaults(func=cmd_bench_clone)

    reliability = targets.add_parser(
        "reliability", help="the whole pipeline on several seeds: held-out return per seed, mean, median, worst"
    )
    reliability.add_argument("--preset", default="tiny", help="preset name in configs/ or a path to a YAML file")
    reliability.add_argument("--source", default=None, help="data source: carracing or highway (default: the preset's)")
    reliability.add_argument("--seeds", type=_positive_int, default=5, help="how many seeds")
    reliability.add_argument("--first-seed", type=_non_negative_int, default=0, help="seeds run from this one up")
    reliability.add_argument(
        "--name", default=None, help="run folders are RUNS/NAME-seedS (default: reliability-PRESET-SOURCE)"
    )
    reliability.add_argument("--runs-dir", type=_output_folder, default="runs", help="folder of the run folders")
    reliability.add_argument(
        "--out", type=_output_folder, default=None, help="folder of reliability.json and .md (default: RUNS/NAME)"
    )
    reliability.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    reliability.set_defaults(func=cmd_bench_reliability)

    verdict = targets.add_parser(
        "verdict", help="what a run's dream pays real drivers' episodes, and whether it ends them where they crash"
    )
    verdict.add_argument("--run", required=True, help="run folder written by `worldmodel run`")
    verdict.add_argument("--episodes", type=_positive_int, default=30, help="held-out episodes per driver")
    verdict.add_argument(
        "--seed", type=_non_negative_int, default=None, help="first episode seed (default: the run's eval.seed)"
    )
    verdict.add_argument(
        "--drivers", type=_names, default=None, help="comma-separated: policy, random, expert, steady (default: all)"
    )
    verdict.add_argument("--workers", type=_positive_int, default=2, help="processes driving the simulator")
    verdict.add_argument("--json", type=_output_file, default=None, help="also write the figures to this JSON file")
    verdict.set_defaults(func=cmd_bench_verdict)

    sight = targets.add_parser(
        "sight", help="highway's scripted driver blinded beyond a view: how much road a frame must show"
    )
    sight.add_argument(
        "--sights",
        type=_sights,
        default=[None, (11.0, 25.6), (13.0, 51.0)],
        help="comma-separated BEHIND:AHEAD metres it sees, or 'all' (default: all,11:25.6,13:51; 11:25.6 is the view"
        " of highway's own 64-pixel frames)",
    )
    sight.add_argument("--episodes", type=_positive_int, default=50, help="held-out episodes per sight")
    sight.add_argument("--workers", type=_positive_int, default=2, help="processes")
    sight.add_argument("--json", type=_output_file, default=None, help="also write the figures to this JSON file")
    sight.set_defaults(func=cmd_bench_sight)

    train_step = targets.add_parser(
        "train-step", help="one training step of each preset's tokenizer and dynamics, float32 and bf16 autocast"
    )
    train_step.add_argument(
        "--presets", type=_names, default=("tiny", "small", "base"), help="comma-separated presets in configs/"
    )
    train_step.add_argument(
        "--dtypes", type=_names, default=("float32", "bfloat16"), help="float32 and/or bfloat16 (autocast)"
    )
    train_step.add_argument("--seconds", type=_positive_float, default=3.0, help="timed seconds per measurement")
    train_step.add_argument("--device", type=_device, default="auto", help="cpu, cuda (cuda:N) or auto")
    train_step.add_argument("--json", type=_output_file, default=None, help="also write the figures to this JSON file")
    train_step.set_defaults(func=cmd_bench_train_step)

    branch = targets.add_parser(
        "branch",
        help="a paired test of a loop setting: a copy of a run cut back to before one round's PPO, run on with it",
    )
    branch.add_argument("--run", required=True, help="a run folder whose loop reached the round's dynamics")
    branch.add_argument("--round", type=_positive_int, required=True, help="the loop round whose PPO it redoes")
    branch.add_argument("--name", required=True, help="the branch's run folder, beside RUN")
    branch.add_argument("overrides", nargs="*", help="loop.* settings of the branch, e.g. loop.continue_from=best")
    branch.set_defaults(func=cmd_bench_branch)

    tokenizer = targets.add_parser(
        "tokenizer", help="rate, distortion and speed of tokenizer backbones beside WebP and JPEG"
    )
    tokenizer.add_argument("--data", required=True, help="dataset folder written by `worldmodel collect`")
    tokenizer.add_argument(
        "--out",
        type=_output_folder,
        required=True,
        help="output folder: tables, JSON, plot, and the trained tokenizers (reused)",
    )
    tokenizer.add_argument(
        "--preset", default="tiny", help="preset whose tokenizer model and training settings the rates modify"
    )
    tokenizer.add_argument(
        "--backbones", type=_names, default=("conv", "vit", "hybrid"), help="comma-separated tokenizer backbones"
    )
    tokenizer.add_argument(
        "--rate",
        type=_rate,
        action="append",
        default=None,
        help="a rate setting as YAML tokenizer model fields, repeatable, e.g. --rate '{levels: [8, 6, 5]}' "
        "(default: levels [4, 4, 4], [8, 6, 5] and [8, 5, 5, 5])",
    )
    tokenizer.add_argument("--steps", type=_positive_int, default=1000, help="training steps of every tokenizer")
    tokenizer.add_argument("--batch-size", type=_positive_int, default=32, help="training batch of every tokenizer")
    tokenizer.add_argument("--eval-frames", type=_positive_int, default=512, help="held-out frames measured on")
    tokenizer.add_argument(
        "--batch-sizes", type=_positive_ints, default=(1, 64), help="batch sizes of the encode and decode timing"
    )
    tokenizer.add_argument("--seconds", type=_positive_float, default=2.0, help="timed seconds per speed measurement")
    tokenizer.add_argument(
        "--resolutions",
        type=_positive_ints,
        default=(64, 128, 256, 512),
        help="square resolutions of the encode-time table (untrained models)",
    )
    tokenizer.add_argument("--device", type=_device, default="auto", help="cpu, cuda (cuda:N) or auto")
    _codec_flags(tokenizer)
    tokenizer.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    tokenizer.set_defaults(func=cmd_bench_tokenizer)


def _eval_commands(evaluation: argparse.ArgumentParser) -> None:
    """One component measured on the user's own data."""
    components = evaluation.add_subparsers(dest="component", required=True)
    eval_tokenizer = components.add_parser(
        "tokenizer", help="a tokenizer's rate and distortion on a .npy of frames, beside WebP and JPEG"
    )
    eval_tokenizer.add_argument(
        "--checkpoint", required=True, help="tokenizer checkpoint (RUN/tokenizer) or a run folder"
    )
    eval_tokenizer.add_argument(
        "--frames", required=True, help=".npy file of (N, H, W, C) uint8 frames, resized to the tokenizer's size"
    )
    eval_tokenizer.add_argument("--json", type=_output_file, default=None, help="write the figures to this JSON file")
    eval_tokenizer.add_argument(
        "--max-frames",
        type=_positive_int,
        default=None,
        help="measure on this many evenly spaced frames (default: all)",
    )
    eval_tokenizer.add_argument("--batch-size", type=_positive_int, default=128, help="tokenizer batch size")
    eval_tokenizer.add_argument("--device", type=_device, default="auto", help="cpu, cuda (cuda:N) or auto")
    _codec_flags(eval_tokenizer)
    eval_tokenizer.set_defaults(func=cmd_eval_tokenizer)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse reads positionals as one block, so `train tokenizer --preset tiny a.b=1` would leave the override
    after a flag unrecognised: such `section.key=value` leftovers are overrides too."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    strays = [item for item in extra if not (hasattr(args, "overrides") and "=" in item and not item.startswith("-"))]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from worldmodel.checkpoint import CheckpointError
    from worldmodel.config import ConfigError
    from worldmodel.dataset import DatasetError
    from worldmodel.files import DamagedFile, UnwritablePath
    from worldmodel.runtime import keep_freed_memory

    keep_freed_memory()  # a dream step would page-fault its activations in again each time (docs/architecture.md)
    try:
        args.func(args)
    except (ConfigError, DatasetError, CheckpointError, DamagedFile, UnwritablePath) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
