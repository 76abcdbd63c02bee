"""The whole path on one preset: collect -> tokenizer -> dynamics -> PPO in imagination -> the dream-to-real loop
-> real-simulator evaluation -> rollout video, each stage skipped when its output exists, so a crashed run
resumes.

The loop (`loop.iterations` rounds, `agents.loop`) closes the gap between the dream and the simulator: each round
drives the real simulator with the current policy, adds those episodes to the dataset, tokenizes them, continues
the dynamics model with the newest episodes weighted up, and continues PPO in the updated dream. Every round's
stages are stages of their own (`loop/01/collect`, `loop/01/dynamics`, `loop/01/policy`, ...), so a run killed
mid-loop resumes at the round and stage where it stopped."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from agents.config import MINUTE_BUDGETS, PipelineConfig
from agents.evaluate import STEADY, EvalConfig, evaluate
from agents.loop import (
    PLAYOFF,
    collect_with_policy,
    dream_gap,
    driven_seeds,
    next_round_share,
    plot_learning_curve,
    round_figures,
)
from agents.ppo import POLICY, learn_from_episodes, load_policy, train_ppo
from envs.collect import collect
from envs.sources import SOURCES
from worldmodel.checkpoint import checkpoint_exists, copy_checkpoint, read_checkpoint, resumable, save_checkpoint
from worldmodel.config import ConfigError, read_yaml_mapping
from worldmodel.dataset import Dataset
from worldmodel.files import write_json_atomic, write_text_atomic
from worldmodel.logger import RunLogger
from worldmodel.rollout import check_video_writer, write_rollout
from worldmodel.run_dir import Results, RunDir, StageClock
from worldmodel.train import (
    DYNAMICS,
    tokens_for_run,
    train_dynamics,
    train_tokenizer,
)
from worldmodel.world_model import WorldModel

# the config that decides each stage's output: changing it after the stage finished is refused
STAGE_SECTIONS = {
    "collect": ("collect",),
    "tokenizer": ("tokenizer", "run.val_fraction"),
    "dynamics": ("dynamics", "run.val_fraction"),
    "policy": ("ppo",),
    "loop": ("loop", "collect", "dynamics", "ppo", "run.val_fraction"),
    "evaluate": ("eval",),
    "rollout": ("rollout",),
}


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree


def _changed(previous: Any, now: Any, default: Any) -> bool:
    """Whether a setting differs from the one a stage finished with. A key the earlier config did not have yet (a
    setting added to the project since) counts as its default then: a change only if it is set otherwise now."""
    if isinstance(previous, dict) and isinstance(now, dict):
        default = default if isinstance(default, dict) else {}
        return any(
            _changed(previous[key], now.get(key), default.get(key)) if key in previous else now[key] != default.get(key)
            for key in previous.keys() | now.keys()
        )
    return previous != now


def _without_workers(tree: Any) -> Any:
    """Settings without their worker counts (`collect.workers`, `eval.workers`): how many processes made a stage's
    output does not change it (episode i is driven on its own seed), so a resumed run may use others."""
    if not isinstance(tree, dict):
        return tree
    return {key: _without_workers(value) for key, value in tree.items() if key != "workers"}


def _scale_changed(key: str, previous: dict[str, Any], config: PipelineConfig) -> str:
    """', its minute budgets x2.5 then and x1 now (run.time_scale)' where settings `key` hold a minute budget and
    the run started under another `run.time_scale`; nothing for a run recorded before runs kept their scale."""
    then, now = _lookup(previous, "run.scaled_by"), config.run.scaled_by
    if then in ({}, now) or not any(budget.startswith(f"{key}.") for budget in MINUTE_BUDGETS):
        return ""
    return f", its minute budgets x{then:g} then and x{now:g} now (run.time_scale)"


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run every stage that has not finished yet; write and return `<run>/summary.json`."""
    height, width = config.collect.source.frame_shape
    if height != width:
        raise ConfigError(
            f"collect.source: the dynamics model, the dream and the policy take square frames, not {height}x{width};"
            " non-square frames are for `worldmodel collect`, `train tokenizer`, `eval tokenizer` and `bench tokenizer`"
        )
    check_video_writer()  # the last stage's, before the first starts
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    run_dir, data_dir = config.run_dir, config.dataset_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = json.loads(json.dumps(dataclasses.asdict(config)))
    defaults = json.loads(json.dumps(dataclasses.asdict(PipelineConfig())))
    results = Results(run_dir)
    config_path = RunDir(run_dir).config
    if config_path.is_file():
        previous = read_yaml_mapping(config_path, "run config")
        order = list(STAGE_SECTIONS)
        # a collection killed midway (the first, or a loop round's) left episodes made with its settings: more made
        # with others would join them (a training stage killed midway refuses its `_last` checkpoint on its own
        # where the model's config changed, and goes on with new training settings)
        started = {
            name.split("/")[0] for name in StageClock(run_dir).left_behind(results.done) if name.endswith("collect")
        }
        for at, (stage_name, keys) in enumerate(STAGE_SECTIONS.items()):
            # a stage's settings are fixed once it, or a stage after it (on its output), finished or started: a loop
            # added to a finished run would leave its evaluation and video of the policy before the loop
            fixed = next((later for later in order[at:] if results.done(later) or later in started), None)
            for key in keys:
                then, now, default = (_without_workers(_lookup(tree, key)) for tree in (previous, resolved, defaults))
                if fixed and _changed(then, now, default):
                    what = repr(fixed) + ("" if fixed == stage_name else f", after stage {stage_name!r},")
                    how = "started (and was stopped)" if fixed in started else "finished"
                    raise ConfigError(
                        f"{run_dir}: stage {what} {how} with other `{key}` settings than "
                        f"now{_scale_changed(key, previous, config)} (see {config_path}); choose a new run.name, or "
                        "delete the run folder"
                    )
    write_text_atomic(config_path, yaml.safe_dump(resolved, sort_keys=False))
    logger = RunLogger(run_dir, config.run.wandb, dataclasses.asdict(config))
    stage = Stages(results, StageClock(run_dir))

    def do_collect() -> dict[str, Any]:
        dataset = collect(config.collect, data_dir)
        returns = [e.ret for e in dataset.episodes]
        return {
            "episodes": len(dataset),
            "steps": sum(e.length for e in dataset.episodes),
            "mean_return": sum(returns) / len(returns),
            "seeds": [e.seed for e in dataset.episodes],
        }

    device, val = config.run.device, config.run.val_fraction
    stage("collect", do_collect)
    stage("tokenizer", lambda: train_tokenizer(data_dir, run_dir, config.tokenizer, logger, val, device))
    stage("dynamics", lambda: train_dynamics(data_dir, run_dir, config.dynamics, logger, val, device))
    stage("policy", lambda: train_ppo(run_dir, config.ppo, logger, device))
    run_loop(config, results, stage, logger)
    used_seeds = driven_seeds(run_dir, data_dir)
    stage("evaluate", lambda: evaluate(run_dir, config.collect.source, config.eval, used_seeds))
    stage("rollout", lambda: write_rollout(run_dir, data_dir, config.rollout))
    summary = make_summary(config, results.data)
    if summary["loop"]:
        plot_learning_curve(summary["loop"]["curve"], RunDir(run_dir).loop_plot)
    write_json_atomic(RunDir(run_dir).summary, summary)
    print(format_summary(summary))
    from pipeline.report import write_report

    try:  # the run's results are saved: a page that cannot be drawn is a warning, not a failed run
        report = write_report(run_dir)
        print(f"report: {report}")
        logger.media({"rollout/video": RunDir(run_dir).rollout.with_suffix(".mp4"), "report": report})
    except Exception as err:
        print(f"warning: the report was not written ({type(err).__name__}: {err}); try `worldmodel report {run_dir}`")
    finally:
        logger.close()
    return summary


class Stages:
    """Runs each stage of a run once: a stage recorded in `results.json` is skipped; one that finishes is recorded
    with its figures and its wall time (`timings`), including what a run killed in it had spent (`StageClock`)."""

    def __init__(self, results: Results, clock: StageClock):
        self.results, self.clock = results, clock
        self.timings: dict[str, float] = dict(results.data.get("timings", {}))
        self.carried = clock.left_behind(results.done)  # the stage a killed run was in, and its time there

    def __call__(self, name: str, work: Callable[[], dict[str, Any]]) -> None:
        if self.results.done(name):
            print(f"[{name}] already done, skipping (delete {self.results.path} entries to redo)")
            return
        print(f"[{name}] ...")
        with self.clock.running(name, self.carried.pop(name, 0.0)) as elapsed:
            figures = work()
            self.timings[name] = round(elapsed(), 1)
            self.results.record(name, figures)
            self.results.record("timings", self.timings)

    def seconds(self, prefix: str) -> float:
        """The wall time spent in the stages whose names start with `prefix`, a killed stage's time included."""
        spent = {**self.timings, **self.carried}
        return sum(v for k, v in spent.items() if k.startswith(prefix))


def run_loop(config: PipelineConfig, results: Results, stage: Stages, logger: RunLogger) -> None:
    """`config.loop.iterations` rounds of collect with the policy -> dynamics -> PPO, then the last policy's own
    collection round, then the choice of the policy to keep (`LoopConfig.keep_best`), written to `<run>/policy`.

    Round k drives with policy k - 1 (`<run>/loop/<k-1>/policy`; 00 is the policy trained before the loop), whose
    episodes are dataset episodes `collect.episodes + (k - 1) * loop.episodes` on, on seeds after the first
    collection's. The dynamics model and the policy of round k are written to `<run>/loop/<k>/` and copied to
    `<run>/dynamics` and `<run>/policy`, so the run folder always holds the newest world model."""
    loop = config.loop
    if loop.iterations <= 0:
        return
    run_dir, data_dir, device = config.run_dir, config.dataset_dir, config.run.device
    run = RunDir(run_dir)
    initial = run.loop_round(0).policy
    if not checkpoint_exists(initial):
        copy_checkpoint(run.policy, initial, POLICY)

    def first_episode(iteration: int) -> int:
        """The dataset index of round `iteration`'s first episode; it drives on seed `collect.seed` + that index."""
        return config.collect.episodes + (iteration - 1) * loop.episodes

    def collect_round(iteration: int, share: float = 1.0) -> dict[str, Any]:
        policy = run.loop_round(iteration - 1).policy
        first = first_episode(iteration)
        collected = collect_with_policy(
            run_dir, data_dir, config.collect.source, loop, policy, iteration, first, config.collect.seed
        )
        figures = round_figures(collected)
        # the dream this policy was trained in, before this round's episodes change it
        world = WorldModel.load(run_dir, with_contexts=False)
        figures.update(dream_gap(world, load_policy(policy), Dataset.open(data_dir), collected, config.ppo))
        dataset = Dataset.open(data_dir)
        figures["real_steps_total"] = int(sum(e.length for e in dataset.episodes))
        figures["policy"] = str(policy.relative_to(run_dir))
        if share < 1:
            figures["round_share"] = share  # of the training minutes of the round that starts with this collection
        logged = ("real_return_mean", "real_sampled_return_mean", "dream_gap", "dream_policy_return")
        logger.log({f"loop/real/{k}": figures[k] for k in logged if k in figures}, figures["real_steps_total"])
        tqdm.write(
            f"round {iteration}: real return {figures.get('real_return_mean', float('nan')):.1f} "
            f"(dream of the same policy {figures.get('dream_policy_return', float('nan')):.1f}); "
            f"dream gap on its episodes {figures['dream_gap']:+.1f}"
        )
        return figures

    def share_of(iteration: int) -> float:
        """The share of its training minutes round `iteration` runs with (`next_round_share`)."""
        return results.data.get(f"loop/{iteration:02d}/collect", {}).get("round_share", 1.0)

    def dynamics_round(iteration: int) -> dict[str, Any]:
        dataset = Dataset.open(data_dir)
        recent = [i for i, e in enumerate(dataset.episodes) if e.iteration == iteration]
        train = dataclasses.replace(
            config.dynamics.train,
            steps=loop.dynamics_steps,
            max_minutes=None if loop.dynamics_minutes is None else loop.dynamics_minutes * share_of(iteration),
            seed=config.dynamics.train.seed + iteration,
            warmup_steps=0,  # it goes on with the optimizer's moments where the last training left them
        )
        if iteration == 1:
            # the first training's steps, from its `_last` checkpoint: <run>/dynamics may already be this round's copy
            previous = resumable(run.dynamics)
            offset = int(read_checkpoint(previous, DYNAMICS)[0]["step"])
        else:
            previous = resumable(run.loop_round(iteration - 1).dynamics)
            offset = int(results.data[f"loop/{iteration - 1:02d}/dynamics"]["steps_total"])
        target = run.loop_round(iteration).dynamics
        figures = train_dynamics(
            data_dir,
            run_dir,
            dataclasses.replace(config.dynamics, train=train),
            logger,
            config.run.val_fraction,
            device,
            checkpoint=target,
            init=previous,
            recent=(recent, loop.recent_share),
            step_offset=offset,
        )
        copy_checkpoint(target, run.dynamics, DYNAMICS)
        return {**figures, "steps_total": offset + figures["steps"]}

    def policy_round(iteration: int) -> dict[str, Any]:
        minutes = None if loop.ppo_minutes is None else loop.ppo_minutes * share_of(iteration)
        ppo = dataclasses.replace(
            config.ppo, total_steps=loop.ppo_steps, max_minutes=minutes, seed=config.ppo.seed + iteration
        )
        start = best_so_far(iteration) if loop.continue_from == "best" else iteration - 1
        before = run.loop_round(start).policy
        offset = int(read_checkpoint(run.loop_round(iteration - 1).policy, POLICY)[0].get("imagined_steps_total", 0))
        target = run.loop_round(iteration).policy
        dataset = Dataset.open(data_dir)
        episodes = dataset.episodes
        recent = [i for i, e in enumerate(episodes) if e.iteration == iteration]
        real: dict[str, Any] = {}
        if loop.real_epochs > 0 and start == iteration - 1:
            sampled = [i for i in recent if episodes[i].kind == "policy-sampled"]
            if sampled:
                tokenized = tokens_for_run(data_dir, run_dir, device).select(sampled)
                policy = load_policy(before)
                recorded = [tokenized.episode(i) for i in range(len(sampled))]
                real = learn_from_episodes(policy, recorded, dataset.action_space, ppo, loop.real_epochs)
                before = run.loop_round(iteration).policy_real
                save_checkpoint(before, policy, POLICY, {"real_steps": int(real["steps"])})
                at = results.data[f"loop/{iteration:02d}/collect"]["real_steps_total"]
                logger.log({f"loop/real_update/{k}": v for k, v in real.items()}, at)
        starts = (recent, loop.recent_starts) if loop.recent_starts > 0 else None
        figures = train_ppo(run_dir, ppo, logger, device, init=before, out=target, step_offset=offset, recent=starts)
        copy_checkpoint(target, run.policy, POLICY)
        return {
            **figures,
            "imagined_steps_total": offset + int(figures["imagined_steps"]),
            "continued_from": start,
            **({"real_update_steps": int(real["steps"])} if real else {}),
        }

    def scores(until: int) -> list[float]:
        """The real collection return of policies 0 .. until - 1 (policy j drove round j + 1)."""
        return [
            score
            if (score := results.data[f"loop/{j + 1:02d}/collect"].get("real_return_mean")) is not None
            else float("-inf")
            for j in range(until)
        ]

    def best_so_far(iteration: int) -> int:
        return int(np.argmax(scores(iteration)))

    rounds = loop.iterations
    for iteration in range(1, loop.iterations + 1):
        name = f"loop/{iteration:02d}"
        if results.done("loop/stop"):
            rounds = results.data["loop/stop"]["rounds"]
            break
        share = 1.0
        if not results.done(f"{name}/collect") and iteration > 1:
            last = f"loop/{iteration - 1:02d}/"
            trained = (stage.seconds(f"{last}dynamics"), stage.seconds(f"{last}policy"))
            # a stage short of its step cap was stopped by its minutes
            timed = (
                results.data[f"{last}dynamics"]["steps"] < loop.dynamics_steps,
                results.data[f"{last}policy"]["imagined_steps"] < loop.ppo_steps,
            )
            spent, collected = stage.seconds("loop/"), stage.seconds(f"{last}collect")
            share = next_round_share(loop, spent, collected, trained, timed, share_of(iteration - 1))
            if share == 0:
                stage("loop/stop", lambda it=iteration: {"rounds": it - 1, "reason": "loop.max_minutes"})
                rounds = iteration - 1
                break
            if share < 1:
                tqdm.write(f"round {iteration}: {percent(share)} of its training minutes fit in loop.max_minutes")
        stage(f"{name}/collect", lambda it=iteration, s=share: collect_round(it, s))
        stage(f"{name}/dynamics", lambda it=iteration: dynamics_round(it))
        stage(f"{name}/policy", lambda it=iteration: policy_round(it))
    final = rounds + 1
    stage(f"loop/{final:02d}/collect", lambda: collect_round(final))

    def playoff() -> dict[str, Any]:
        """The best `playoff_candidates` policies by their collection rounds drive `playoff_episodes` more deterministic
        episodes each, all on the same tracks: the collection seeds after every one the loop has used."""
        ranked = scores(final)
        candidates = [j for j in np.argsort(ranked, kind="stable")[::-1] if ranked[j] > float("-inf")]
        tracks = EvalConfig(
            episodes=loop.playoff_episodes,
            seed=config.collect.seed + first_episode(final + 1),  # as a round after the last would have collected
            workers=loop.workers,
            max_steps=loop.max_steps,
        )
        figures: dict[str, Any] = {"seeds": [tracks.seed + i for i in range(tracks.episodes)], "policies": {}}
        used = driven_seeds(run_dir, data_dir)
        for j in sorted(int(j) for j in candidates[: loop.playoff_candidates]):
            scored = evaluate(run_dir, config.collect.source, tracks, used, ("policy",), run.loop_round(j).policy)
            figures["policies"][str(j)] = {k: scored["policy"][k] for k in ("returns", "crashes", "steps")}
            tqdm.write(f"playoff: policy {j}, {scored['policy']['mean']:.1f} on {tracks.episodes} more tracks")
        return figures

    if loop.playoff_episodes > 0:
        stage(PLAYOFF, playoff)

    def select() -> dict[str, Any]:
        # policy j drove round j + 1; its score is the mean return of that round's deterministic episodes, or, where
        # it played off, of those and its playoff episodes (the policies that did not were behind every one that did)
        ranked = scores(final)
        playoff = {
            int(j): float(np.mean([*results.data[f"loop/{int(j) + 1:02d}/collect"]["real_returns"], *p["returns"]]))
            for j, p in results.data.get(PLAYOFF, {}).get("policies", {}).items()
        }
        if not loop.keep_best:
            chosen = rounds
        else:
            chosen = max(playoff, key=playoff.__getitem__) if playoff else best_so_far(final)
        copy_checkpoint(run.loop_round(chosen).policy, run.policy, POLICY)
        score = (
            f"collection and playoff return {playoff[chosen]:.1f}"
            if playoff
            else f"collection return {ranked[chosen]:.1f}"
        )
        tqdm.write(f"loop: keeping the policy of round {chosen} (real {score})")
        return {
            "rounds": rounds,
            "chosen": chosen,
            "scores": [None if x == float("-inf") else x for x in ranked],
            **({"playoff_scores": {str(j): x for j, x in sorted(playoff.items())}} if playoff else {}),
        }

    stage("loop/select", select)


def loop_curve(results: dict[str, Any]) -> dict[str, Any] | None:
    """The real learning curve of a run's loop: per policy (0: the one trained before the loop), its real return on
    its own collection round, where the run stood then (real steps, wall time) and what the dream made of it."""
    if "loop/select" not in results:
        return None
    elapsed, started = 0.0, {}  # wall time when each stage started, from the recorded stage times in order
    for name, seconds in results.get("timings", {}).items():
        started[name] = elapsed
        elapsed += seconds
    rows = []
    for j in range(len(results["loop/select"]["scores"])):
        collected = results[f"loop/{j + 1:02d}/collect"]
        row = {
            "policy": j,
            "real_steps": collected["real_steps_total"] - collected["steps"],
            "round_steps": collected["steps"],
            "wall_s": round(started.get(f"loop/{j + 1:02d}/collect", float("nan")), 1),
        }
        for key in ("real_return_mean", "real_return_std", "real_sampled_return_mean", "dream_policy_return"):
            row[key] = collected.get(key)
        row["dream_replay_return"] = collected["dream_replay_return"]
        row["real_recorded_return"] = collected["real_recorded_return"]
        row["dream_gap"] = collected["dream_gap"]
        if j > 0:
            row["dynamics_val_token_accuracy"] = results[f"loop/{j:02d}/dynamics"]["val_token_accuracy"]
            row["ppo_dream_return"] = results[f"loop/{j:02d}/policy"]["dream_return"]
            row["continued_from"] = results[f"loop/{j:02d}/policy"].get("continued_from", j - 1)
            row["round_share"] = results[f"loop/{j:02d}/collect"].get("round_share", 1.0)
        rows.append(row)
    selected = results["loop/select"]
    loop = {"rounds": selected["rounds"], "chosen": selected["chosen"], "curve": rows}
    if PLAYOFF in results:
        played = results[PLAYOFF]["policies"]
        loop["playoff"] = {
            "seeds": results[PLAYOFF]["seeds"],
            "returns": {j: float(np.mean(p["returns"])) for j, p in played.items()},
            "scores": selected.get("playoff_scores", {}),
            "steps": int(sum(p["steps"] for p in played.values())),
        }
    return loop


def make_summary(config: PipelineConfig, results: dict[str, Any]) -> dict[str, Any]:
    evaluation = results["evaluate"]
    return {
        "run": str(config.run_dir),
        "source": config.collect.source.name,
        "dataset": {k: v for k, v in results["collect"].items() if k != "seeds"},
        # beside the steps each trained, the limits from the config: which one stopped it
        **{
            name: {
                **results[name],
                "max_steps": train.steps,
                "max_minutes": train.max_minutes,
                **_reference_steps(train, rate, config.run.scaled_by),
            }
            for (name, train), rate in zip(
                (("tokenizer", config.tokenizer.train), ("dynamics", config.dynamics.train)),
                config.run.reference_rates or (None, None),
                strict=True,
            )
        },
        # the loop's rounds go on training the dynamics model, each in its own budget (loop.dynamics_minutes)
        "loop_dynamics_steps": [
            results[name]["steps"]
            for name in sorted(results)
            if name.startswith("loop/") and name.endswith("/dynamics") and "steps" in results[name]
        ],
        "scaled_by": config.run.scaled_by,
        "ppo": results["policy"],
        **{
            kind: {
                "real_return_mean": evaluation[kind]["mean"],
                "real_return_std": evaluation[kind]["std"],
                "crashes": evaluation[kind].get("crashes", 0),
                **({"action": config.collect.source.source.steady_action[0]} if kind == STEADY else {}),
            }
            for kind in ("policy", "random", "expert", STEADY)
            if kind in evaluation  # a run evaluated before the steady action was scored has none
        },
        "episodes_evaluated": len(evaluation["policy"]["returns"]),
        "eval_seeds": evaluation["policy"]["seeds"],
        "rollout": results["rollout"],
        "rollout_video": results["rollout"]["video"],
        "policy_beats_random": int(
            sum(p > r for p, r in zip(evaluation["policy"]["returns"], evaluation["random"]["returns"], strict=True))
        ),
        "loop": loop_curve(results),
        "timings_s": results.get("timings", {}),
        "checkpoints": {
            name: str(getattr(RunDir(config.run_dir), name).with_suffix(".safetensors"))
            for name in ("tokenizer", "dynamics", "policy")
        },
    }


def _reference_steps(train: Any, rate: float | None, scaled_by: float) -> dict[str, int]:
    """The steps the machine the preset's minutes were set on (`run.reference_rates`) trains in those minutes."""
    if rate is None or train.max_minutes is None:
        return {}
    return {"reference_steps": min(train.steps, round(rate * 60 * train.max_minutes / scaled_by))}


def _trained(figures: dict[str, Any]) -> str:
    """'; N steps', and which limit stopped them: the presets' budgets are minutes, so a slower machine trains fewer
    steps, said when they fall well short of the preset's own (`run.time_scale`). Empty for a run recorded before
    stages counted their steps."""
    if "steps" not in figures:
        return ""
    steps, minutes = figures["steps"], figures.get("max_minutes")
    if minutes is None or steps >= figures.get("max_steps", float("inf")):
        return f"; {steps} steps"
    text = f"; {steps} steps in its {minutes:g}-minute budget"
    if steps < 0.8 * figures.get("reference_steps", 0):
        text += f" (about {figures['reference_steps']} where the preset was set: run.time_scale=auto)"
    return text


def _loop_steps(steps: list[int] | None) -> str:
    """', then 150, 148 in the loop's rounds' for the dynamics training the loop went on with."""
    if not steps:
        return ""
    return f", then {', '.join(map(str, steps))} in the loop's rounds"


def format_summary(summary: dict[str, Any]) -> str:
    tok, dyn = summary["tokenizer"], summary["dynamics"]
    rows = [
        ("source", summary["source"]),
        ("dataset", f"{summary['dataset']['episodes']} episodes, {summary['dataset']['steps']} steps"),
        (
            "tokenizer",
            f"{tok['tokens_per_frame']} tokens/frame, {tok['bytes_per_frame']:.1f} bytes/frame, "
            f"val PSNR {tok['val_psnr']:.2f} dB, SSIM {tok['val_ssim']:.3f}{_trained(tok)}",
        ),
        (
            "dynamics",
            f"val next-frame token accuracy {dyn['val_token_accuracy']:.3f} "
            f"(copy-last {dyn['val_copy_last_accuracy']:.3f}), reward MAE {dyn['val_reward_mae']:.3f}{_trained(dyn)}"
            + _loop_steps(summary.get("loop_dynamics_steps")),
        ),
        (
            "ppo (dream)",
            f"{summary['ppo']['imagined_steps']:.0f} imagined steps at "
            f"{summary['ppo']['steps_per_second']:.0f}/s, dream return {summary['ppo']['dream_return']:.1f}",
        ),
    ]
    loop = summary.get("loop")
    if loop:
        for row in loop["curve"]:
            # policy j's PPO went on from policy j - 1, or from an earlier one that had done better for real
            parent = row.get("continued_from", row["policy"] - 1)
            notes = [f"from {parent}"] if parent != row["policy"] - 1 else []
            if row.get("round_share", 1.0) < 1:  # loop.max_minutes left the round less time to train it
                notes.append(f"{percent(row['round_share'])} of a round's minutes")
            name = f"loop policy {row['policy']}" + (f" ({'; '.join(notes)})" if notes else "")
            figures = (
                f"real {_number(row['real_return_mean'])} (sampled {_number(row['real_sampled_return_mean'])}), "
                f"dream {_number(row['dream_policy_return'])}, dream gap {row['dream_gap']:+.1f}; "
                f"after {row['real_steps']} real steps, {row['wall_s']:.0f} s"
            )
            rows.append((name, figures))
        playoff = loop.get("playoff")
        if playoff:
            rows.append(
                (
                    "loop playoff",
                    ", ".join(f"policy {j} {x:.1f}" for j, x in playoff["returns"].items())
                    + f" on {len(playoff['seeds'])} more tracks each ({playoff['steps']} real steps)",
                )
            )
        how = "collection and playoff returns" if playoff else "collection return"
        rows.append(("loop kept", f"policy {loop['chosen']} of {loop['rounds'] + 1}, by its real {how}"))
    n = summary["episodes_evaluated"]
    for name in ("policy", "random", "expert", STEADY):
        figures = summary.get(name)
        if figures is None:
            continue
        crashes = f", {figures['crashes']} crashed" if SOURCES[summary["source"]].crashes else ""
        rows.append(
            (
                f"always {figures['action']} (real)" if name == STEADY else f"{name} (real)",
                f"{figures['real_return_mean']:.1f} +- {figures['real_return_std']:.1f} over {n} held-out episodes"
                + crashes,
            )
        )
    rows.append(("policy > random", f"on {summary['policy_beats_random']} of {n} held-out episodes"))
    rows.append(("rollout video", summary["rollout_video"]))
    times = {k: v for k, v in summary["timings_s"].items() if not k.startswith("loop/")}
    loop_seconds = sum(v for k, v in summary["timings_s"].items() if k.startswith("loop/"))
    if loop_seconds:
        times["loop"] = loop_seconds
    scaled = summary.get("scaled_by", 1.0)
    rows.append(
        (
            "time (s)",
            ", ".join(f"{k} {v:.0f}" for k, v in times.items())
            + (f"; minute budgets x{scaled:g} (run.time_scale)" if scaled != 1 else ""),
        )
    )
    width = max(len(r[0]) for r in rows)
    return "\n".join(["", "summary", "-" * 7] + [f"{k.ljust(width)}  {v}" for k, v in rows])


def percent(share: float) -> str:
    """A share as whole percent, rounded down: a round short of its minutes never reads as 100%."""
    whole = math.floor(100 * share + 1e-9)
    return f"{min(whole, 99) if share < 1 else whole}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
