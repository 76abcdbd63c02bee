"""The `worldmodel` command. It is the composition root: it may import `envs` and `agents` (lazily, per
command); the library modules under `worldmodel/` never do."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OVERRIDES_HELP = "config overrides as section.key=value, e.g. tokenizer.train.steps=200 ppo.num_envs=32"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="preset name in configs/ or a path to a YAML file")
    parser.add_argument(
        "--source",
        choices=["carracing", "highway"],
        default=None,
        help="data source (default: the preset's, CarRacing-v3)",
    )
    parser.add_argument("--name", default=None, help="run name (folder under runs/); default: <preset>-<source>")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _config(args: argparse.Namespace):
    from agents.pipeline import load_pipeline_config

    config = load_pipeline_config(args.preset, args.overrides, args.source)
    if args.name:
        config.run.name = args.name
    elif not any(o.startswith("run.name=") for o in args.overrides):
        config.run.name = f"{Path(args.preset).stem}-{config.collect.source.name}"
    return config


def _logger(config):
    from worldmodel.logger import RunLogger

    return RunLogger(config.run_dir, config.run.wandb)


def cmd_run(args: argparse.Namespace) -> None:
    from agents.pipeline import run_pipeline

    run_pipeline(_config(args))


def cmd_collect(args: argparse.Namespace) -> None:
    from envs.collect import collect

    config = _config(args)
    out = Path(args.out) if args.out else config.dataset_dir
    dataset = collect(config.collect, out)
    print(f"{len(dataset)} episodes, {sum(e.length for e in dataset.episodes)} steps in {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from worldmodel.train import train_dynamics, train_tokenizer

    config = _config(args)
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
    else:
        from agents.ppo import train_ppo

        figures = train_ppo(config.run_dir, config.ppo, logger, config.run.device)
    logger.close()
    print(json.dumps(figures, indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from agents.evaluate import evaluate
    from worldmodel.dataset import Dataset

    config = _config(args)
    data = Path(args.data) if args.data else config.dataset_dir
    used = [e.seed for e in Dataset.open(data).episodes if e.seed is not None]
    print(json.dumps(evaluate(config.run_dir, config.collect.source, config.eval, used), indent=2))


def cmd_rollout(args: argparse.Namespace) -> None:
    from worldmodel.rollout import write_rollout

    config = _config(args)
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


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def cmd_bench_imagination(args: argparse.Namespace) -> None:
    from bench.imagination import ImaginationBenchConfig, bench_imagination, format_table

    config = ImaginationBenchConfig(
        batch_sizes=args.batch_sizes,
        seconds=args.seconds,
        real_envs=args.real_envs,
        preset_shapes=tuple(name for name in args.preset_shapes.split(",") if name),
        device=args.device,
        dtype=args.dtype,
    )
    print(format_table(bench_imagination(args.run, config, args.json)))


def cmd_bench(args: argparse.Namespace) -> None:
    if args.target == "imagination":
        return cmd_bench_imagination(args)
    from bench.dynamics import DynamicsBenchConfig, bench_dynamics
    from bench.faithfulness import ProbeConfig

    config = DynamicsBenchConfig(
        episodes=args.episodes,
        temperature=args.temperature,
        top_k=args.top_k,
        faithfulness=ProbeConfig(states=args.states, temperature=args.temperature, top_k=args.top_k),
    )
    figures = bench_dynamics(args.run, args.data, config, args.json, args.plot)
    print(json.dumps(figures, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldmodel", description="Driving world model: collect, train, dream, evaluate."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the whole pipeline: collect, train, dream PPO, evaluate, video")
    _common(run)
    run.set_defaults(func=cmd_run)

    collect = commands.add_parser("collect", help="record episodes from a real simulator")
    _common(collect)
    collect.add_argument("--out", default=None, help="dataset folder (default: runs/<name>/dataset)")
    collect.set_defaults(func=cmd_collect)

    train = commands.add_parser("train", help="train one component of a run")
    train.add_argument("component", choices=["tokenizer", "dynamics", "policy"])
    _common(train)
    train.add_argument("--data", default=None, help="dataset folder (default: runs/<name>/dataset)")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score policy, random and expert in the real simulator")
    _common(evaluate)
    evaluate.add_argument("--data", default=None, help="dataset folder, to refuse its seeds")
    evaluate.set_defaults(func=cmd_evaluate)

    rollout = commands.add_parser("rollout", help="video: real vs tokenizer vs dream on a held-out episode")
    _common(rollout)
    rollout.add_argument("--data", default=None, help="dataset folder (default: runs/<name>/dataset)")
    rollout.add_argument("--out", default=None, help="output path without suffix (default: runs/<name>/rollout)")
    rollout.set_defaults(func=cmd_rollout)

    bench = commands.add_parser("bench", help="measure a trained run against its references")
    bench.add_argument("target", choices=["dynamics", "imagination"])
    bench.add_argument("--run", required=True, help="run folder written by `worldmodel run` or `worldmodel train`")
    bench.add_argument("--data", default=None, help="dataset folder (default: RUN/dataset)")
    bench.add_argument("--json", default=None, help="write the figures to this JSON file")
    bench.add_argument("--plot", default=None, help="write the PSNR-by-horizon plot to this PNG file")
    bench.add_argument("--episodes", type=int, default=16, help="held-out episodes rolled out open loop")
    bench.add_argument("--states", type=int, default=12, help="start states probed for action faithfulness")
    bench.add_argument("--temperature", type=float, default=0.0, help="dream sampling temperature (0: greedy)")
    bench.add_argument(
        "--top-k", type=_positive_int, default=None, help="sample among the k likeliest tokens (temperature > 0)"
    )
    bench.add_argument(
        "--batch-sizes", type=_positive_ints, default=(1, 16, 256), help="imagination: dream batch sizes to time"
    )
    bench.add_argument("--seconds", type=float, default=3.0, help="imagination: timed seconds per measurement")
    bench.add_argument(
        "--real-envs", type=int, default=None, help="imagination: real simulators (default: one per CPU; 0: skip)"
    )
    bench.add_argument(
        "--preset-shapes", default="", help="imagination: also time untrained dynamics of these presets, e.g. tiny,base"
    )
    bench.add_argument("--device", default="auto", help="imagination: cpu, cuda or auto")
    bench.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="imagination: the dream's precision"
    )
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from worldmodel.checkpoint import CheckpointError
    from worldmodel.config import ConfigError
    from worldmodel.dataset import DatasetError

    try:
        args.func(args)
    except (ConfigError, DatasetError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
