"""`worldmodel report RUN`: one self-contained HTML page per run, `RUN/report.html`.

The page opens from disk with no server and no network: its plots and the rollout video are embedded as data URLs,
its style is inline. It shows what the run folder holds: the summary table, the rollout video (real, tokenizer,
dream), the learning curves from `metrics.jsonl` (tokenizer PSNR, dynamics accuracy, the dream's return during
PPO, the real return of each loop round's policy), the loop's rounds, and, where the benches wrote them, fidelity by
horizon (`bench dynamics`), the real-simulator baseline (`bench baseline`), the clone of the scripted driver
(`bench clone`) and the reliability table (`bench reliability`) of the seeds this run belongs to. `worldmodel
run` writes it at its end.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worldmodel.checkpoint import CheckpointError
from worldmodel.files import read_json, write_text_atomic
from worldmodel.run_dir import RunDir

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; } td, th { border: 1px solid #ccc; padding: 0.3em 0.7em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img, video { max-width: 100%; } video { width: 720px; image-rendering: pixelated; }
.note { color: #666; font-size: 0.92em; } #missing { color: #b00; }
"""

# a broken embedded asset shows on the page and in the browser's console (the report's browser test reads it there):
# each <img> and <video> calls it from its own onerror attribute, so no failure can come before a listener exists
CHECK_ASSETS = """
function missing(el) {
  console.error("missing asset: " + el.title);
  document.getElementById("missing").textContent = "Some figures could not be shown.";
}
"""


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _image(data: bytes, title: str) -> str:
    title = html.escape(title)
    return f'<img src="{_data_url(data, "image/png")}" alt="{title}" title="{title}" onerror="missing(this)">'


def _figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _number(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], digits: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_number(v, digits)}</td>' if isinstance(v, int | float) else f"<td>{_number(v)}</td>"
            for v in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def markdown_to_html(text: str) -> str:
    """The benches' markdown (paragraphs and pipe tables, `code` and **bold**) as HTML."""

    def inline(line: str) -> str:
        line = html.escape(line)
        line = re.sub(r"`([^`]+)`", r"<code>\1</code>", line)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", line)

    parts, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                table.append(cells)
            continue
        if table:
            head = "".join(f"<th>{inline(c)}</th>" for c in table[0])
            rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in table[1:])
            parts.append(f"<table><tr>{head}</tr>{rows}</table>")
            table = []
        if line.strip():
            parts.append(f"<p>{inline(line)}</p>")
    return "\n".join(parts)


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """`metrics.jsonl` as {metric: [(step, value), ...]} (a torn last line, from a crash, is skipped)."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    if not path.is_file():
        return series
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and value == value:
                series[key].append((step, value))
    return series


def _curves(series: dict[str, list[tuple[float, float]]], loop: dict[str, Any] | None) -> bytes | None:
    panels = [
        ("tokenizer PSNR (dB)", "training step", ["tokenizer/train/psnr", "tokenizer/val/psnr"]),
        (
            "dynamics next-token accuracy",
            "training step",
            ["dynamics/train/token_accuracy", "dynamics/val/token_accuracy", "dynamics/val/copy_last_accuracy"],
        ),
        ("dream return during PPO", "imagined steps", ["ppo/train/episode_return"]),
    ]
    panels = [p for p in panels if any(series.get(k) for k in p[2])]
    curve = (loop or {}).get("curve") or []
    if not panels and not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(panels) + bool(curve)
    columns = min(count, 2)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.4 * columns, 3.6 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    for ax, (title, xlabel, keys) in zip(axes, panels, strict=False):
        for key in keys:
            if series.get(key):
                xs, ys = zip(*series[key], strict=True)
                ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", ms=3, lw=1, label=key.split("/", 1)[1])
        ax.set(title=title, xlabel=xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if curve:
        ax = axes[count - 1]
        steps = [row["real_steps"] for row in curve]
        ax.plot(steps, [row["real_return_mean"] for row in curve], "o-", label="real return")
        dream = [(row["real_steps"], row["dream_policy_return"]) for row in curve if "dream_policy_return" in row]
        if dream:
            ax.plot(*zip(*dream, strict=True), "s--", label="dream return")
        ax.set(title="each loop policy, in its collection round", xlabel="real steps recorded")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def _reliability_md(run: RunDir) -> Path | None:
    """The `bench reliability` table this run is a seed of (`RUNS/NAME-seedS` -> `RUNS/NAME/reliability.md`)."""
    match = re.fullmatch(r"(.+)-seed\d+", run.root.resolve().name)
    path = run.root.resolve().parent / match.group(1) / "reliability.md" if match else None
    return path if path is not None and path.is_file() else None


def build_report(run_dir: str | Path) -> str:
    """The report's HTML for the run in `run_dir`."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        what = "is a file, not" if run.root.exists() else "does not exist; expected"
        raise CheckpointError(f"{run.root} {what} a run folder written by `worldmodel run`")
    if not (run.summary.is_file() or run.results.is_file() or run.metrics.is_file()):
        raise CheckpointError(f"{run.root} holds no run to report on (no summary.json, results.json or metrics)")
    summary = read_json(run.summary, {})
    name = run.root.resolve().name
    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>World model run <code>{html.escape(name)}</code></h1>"]
    body.append(f'<p class="note">source {html.escape(str(summary.get("source", "?")))}; written {written} by '
                "<code>worldmodel report</code>.</p>")  # fmt: skip
    body.append('<p id="missing"></p>')

    if summary:
        body.append("<h2>Summary</h2>")
        body.append(_summary_table(summary))
    else:
        body.append('<p class="note">The run has not finished: no summary.json yet.</p>')

    video = run.rollout.with_suffix(".mp4")
    if video.is_file():
        body.append("<h2>Rollout: real, tokenizer, dream</h2>")
        rollout = summary.get("rollout", {})
        if rollout:
            body.append(
                f'<p class="note">Episode {html.escape(str(rollout.get("episode")))}, '
                f"{rollout.get('frames')} frames: the tokenizer's reconstruction "
                f"{_number(rollout.get('tokenizer_psnr'))} dB, the dream from the same start with the recorded "
                f"actions {_number(rollout.get('dream_psnr'))} dB"
                " (PSNR against the real frames).</p>"
            )
        body.append(
            f'<video controls loop muted autoplay src="{_data_url(video.read_bytes(), "video/mp4")}" '
            'title="rollout video" onerror="missing(this)"></video>'
        )

    curves = _curves(read_metrics(run.metrics), summary.get("loop"))
    if curves:
        body.append("<h2>Learning curves</h2>")
        body.append(_image(curves, "learning curves"))

    loop = summary.get("loop")
    if loop and loop.get("curve"):
        body.append("<h2>The dream-to-real loop</h2>")
        rows = [
            [
                f"{row['policy']}{' (kept)' if row['policy'] == loop.get('chosen') else ''}",
                row["real_steps"],
                row["wall_s"] / 60,
                row["real_return_mean"],
                row.get("dream_policy_return"),
                row.get("dream_gap"),
            ]
            for row in loop["curve"]
        ]
        body.append(_table(["policy", "real steps", "wall (min)", "real return", "dream return", "dream gap"], rows))
        body.append(
            "<p class=\"note\">Each policy's real return on its own collection round, the dream's return of the same "
            "policy, and the dream gap (the dream's return of the real episodes replayed with their actions in windows "
            "of PPO's horizon from their real frames, minus the real return: positive where the dream pays for what "
            "did not pay).</p>"
        )

    fidelity = run.fidelity.with_suffix(".json")
    if fidelity.is_file():
        by_horizon = json.loads(fidelity.read_text()).get("psnr_by_horizon", {})
        horizons = sorted({int(h) for values in by_horizon.values() for h in values})
        body.append("<h2>Fidelity by horizon (open loop, held-out episodes)</h2>")
        rows = [[key, *[values.get(str(h)) for h in horizons]] for key, values in by_horizon.items()]
        body.append(_table(["PSNR (dB) at horizon", *map(str, horizons)], rows))
        if run.fidelity.with_suffix(".png").is_file():
            body.append(_image(run.fidelity.with_suffix(".png").read_bytes(), "fidelity by horizon"))
    else:
        body.append('<p class="note">Fidelity by horizon: run <code>worldmodel bench dynamics --run RUN</code>.</p>')

    for title, markdown, plot in (
        ("The baseline: PPO in the real simulator", run.real_ppo / "baseline.md", run.real_ppo / "baseline.png"),
        ("The baseline: a clone of the scripted driver", run.clone / "clone.md", None),
        ("Reliability over seeds", _reliability_md(run), None),
    ):
        if markdown is not None and markdown.is_file():
            body.append(f"<h2>{title}</h2>")
            body.append(markdown_to_html(markdown.read_text()))
            if plot is not None and plot.is_file():
                body.append(_image(plot.read_bytes(), title))

    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(name)}: world model report</title><style>{STYLE}</style><script>{CHECK_ASSETS}</script>"
        f"</head><body>\n{chr(10).join(body)}\n</body></html>\n"
    )


def _summary_table(summary: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    tokenizer, dynamics = summary.get("tokenizer", {}), summary.get("dynamics", {})
    if tokenizer:
        rows.append(
            [
                "tokenizer",
                f"{tokenizer.get('tokens_per_frame')} tokens, {_number(tokenizer.get('bytes_per_frame'))} bytes per "
                f"frame; {_number(tokenizer.get('val_psnr'))} dB PSNR, SSIM {_number(tokenizer.get('val_ssim'), 3)} "
                f"on held-out frames; {_number(tokenizer.get('codes_used'), 0)} of {tokenizer.get('codebook_size')} "
                "codes used",
            ]
        )
    if dynamics:
        rows.append(
            [
                "dynamics",
                f"next-token accuracy {_number(dynamics.get('val_token_accuracy'), 3)} on held-out episodes "
                f"(copying the last frame: {_number(dynamics.get('val_copy_last_accuracy'), 3)}); reward error "
                f"{_number(dynamics.get('val_reward_mae'), 3)} per step",
            ]
        )
    episodes = summary.get("episodes_evaluated")
    steady = f"always {summary['steady'].get('action')}" if summary.get("steady") else ""
    for key, label in (
        ("policy", "dream-trained policy"),
        ("random", "random policy"),
        ("expert", "scripted driver"),
        ("steady", steady),
    ):
        figures = summary.get(key)
        if figures:
            crashes = f", {figures['crashes']} crashes" if figures.get("crashes") is not None else ""
            rows.append(
                [
                    label,
                    f"{_number(figures.get('real_return_mean'))} +- {_number(figures.get('real_return_std'))} over "
                    f"{episodes} held-out episodes{crashes}",
                ]
            )
    if summary.get("policy_beats_random") is not None:
        rows.append(["policy above random", f"{summary['policy_beats_random']} of {episodes} episodes"])
    dataset = summary.get("dataset", {})
    if dataset:
        rows.append(["first collection", f"{dataset.get('episodes')} episodes, {dataset.get('steps'):,} steps"])
    timings: dict[str, float] = defaultdict(float)
    for stage, seconds in summary.get("timings_s", {}).items():
        timings[stage.split("/")[0]] += seconds  # the loop's rounds as one
    if timings:
        stages = ", ".join(f"{stage} {seconds / 60:.1f}" for stage, seconds in timings.items())
        rows.append(["stage time (min)", f"{sum(timings.values()) / 60:.1f}: {stages}"])
    return _table(["what", "figure"], rows)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report (default `RUN/report.html`, atomically); returns its path."""
    path = Path(out) if out is not None else RunDir(run_dir).report
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the report's file name (such as {path / 'report.html'})")
    write_text_atomic(path, build_report(run_dir))
    return path
