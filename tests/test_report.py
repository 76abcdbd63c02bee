"""`worldmodel report`: one self-contained HTML page per run."""

import json
import re
import shutil

import pytest
from conftest import open_in_chromium

from pipeline.report import build_report, markdown_to_html, read_metrics, write_report
from worldmodel.checkpoint import CheckpointError

SUMMARY = {
    "source": "carracing",
    "tokenizer": {"bytes_per_frame": 63.3, "tokens_per_frame": 64, "codebook_size": 240, "val_psnr": 25.3,
                  "val_ssim": 0.93, "codes_used": 220.0},
    "dynamics": {"val_token_accuracy": 0.391, "val_copy_last_accuracy": 0.228, "val_reward_mae": 0.29},
    "policy": {"real_return_mean": 730.7, "real_return_std": 86.9, "crashes": 0},
    "random": {"real_return_mean": -24.8, "real_return_std": 7.4, "crashes": 0},
    "episodes_evaluated": 50,
    "policy_beats_random": 50,
    "dataset": {"episodes": 200, "steps": 39842},
    "loop": {"chosen": 1, "curve": [
        {"policy": 0, "real_steps": 100, "wall_s": 60.0, "real_return_mean": -20.0, "dream_policy_return": 50.0,
         "dream_gap": 40.0},
        {"policy": 1, "real_steps": 200, "wall_s": 120.0, "real_return_mean": 300.0, "dream_policy_return": 280.0,
         "dream_gap": -10.0},
    ]},
    "timings_s": {"collect": 60.0, "loop/01/collect": 30.0, "loop/01/policy": 30.0},
}  # fmt: skip


def make_run(root):
    root.mkdir(parents=True)
    (root / "summary.json").write_text(json.dumps(SUMMARY))
    metrics = [
        {"step": 0, "tokenizer/train/psnr": 10.0},
        {"step": 25, "tokenizer/train/psnr": 20.0, "dynamics/train/token_accuracy": 0.2},
        {"step": 50, "dynamics/val/token_accuracy": 0.3, "ppo/train/episode_return": float("nan")},
    ]
    (root / "metrics.jsonl").write_text("\n".join(map(json.dumps, metrics)) + '\n{"step": 75, "torn')
    (root / "real_ppo").mkdir()
    (root / "real_ppo" / "baseline.md").write_text(
        "Held-out return over 10 episodes (run `r`).\n\n| what | return |\n|---|---|\n| **real PPO** | 542.1 |\n"
    )
    return root


def test_the_report_shows_the_summary_the_loop_and_the_benches_with_every_asset_embedded(tmp_path):
    run = make_run(tmp_path / "runs" / "mine")
    page = build_report(run)
    assert "730.7 +- 86.9 over 50 held-out episodes" in page
    assert "1 (kept)" in page and "300.0" in page  # the loop's table marks the kept policy
    assert "stage time (min)</td><td>2.0: collect 1.0, loop 1.0" in page  # the loop's rounds summed as one stage
    assert "<td><b>real PPO</b></td><td>542.1</td>" in page  # the baseline's markdown table, as HTML
    assert "worldmodel bench dynamics" in page  # says how to get what is missing
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # nothing outside the page
    assert "http://" not in page and "https://" not in page
    assert "always" not in page  # CarRacing's summary holds no steady action

    assert "a clone of the scripted driver" not in page
    (run / "clone").mkdir()
    (run / "clone" / "clone.md").write_text("Held-out return.\n\n| what | return |\n|---|---|\n| clone | 134.5 |\n")
    assert "<h2>The baseline: a clone of the scripted driver</h2>" in build_report(run)
    assert "<td>clone</td><td>134.5</td>" in build_report(run)

    (run / "fidelity.json").write_text(json.dumps({"psnr_by_horizon": {"dream": {"1": 24.0, "8": 19.5}}}))
    assert '<td>dream</td><td class="num">24.0</td><td class="num">19.5</td>' in build_report(run)

    reliability = tmp_path / "runs" / "rel"
    shutil.copytree(run, tmp_path / "runs" / "rel-seed3")
    reliability.mkdir()
    (reliability / "reliability.md").write_text("Over 5 seeds: mean 35.5\n")
    assert "Reliability over seeds" in build_report(tmp_path / "runs" / "rel-seed3")
    assert "Reliability over seeds" not in page


def test_the_report_shows_highway_steady_action_beside_the_policy(tmp_path):
    run = make_run(tmp_path / "runs" / "hw")
    steady = {"real_return_mean": 21.1, "real_return_std": 0.8, "crashes": 0, "action": "SLOWER"}
    (run / "summary.json").write_text(json.dumps({**SUMMARY, "source": "highway", "steady": steady}))
    assert "always SLOWER</td><td>21.1 +- 0.8 over 50 held-out episodes, 0 crashes" in build_report(run)


def test_metrics_skip_a_torn_line_and_non_numbers(tmp_path):
    run = make_run(tmp_path / "run")
    series = read_metrics(run / "metrics.jsonl")
    assert series["tokenizer/train/psnr"] == [(0, 10.0), (25, 20.0)]
    assert "ppo/train/episode_return" not in series  # NaN is not a point


def test_markdown_tables_and_paragraphs():
    text = "A `cmd` and **bold** <tag>.\n\n| a | b |\n|---|--:|\n| 1 | 2 |\nafter"
    assert markdown_to_html(text) == (
        "<p>A <code>cmd</code> and <b>bold</b> &lt;tag&gt;.</p>\n"
        "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>\n<p>after</p>"
    )


def test_report_of_something_that_is_not_a_run_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="no run to report"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(CheckpointError, match="nowhere does not exist; expected a run folder"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="notes.txt is a file, not a run folder"):
        write_report(tmp_path / "notes.txt")
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "notes.txt").read_text() == "keep me"
    run = make_run(tmp_path / "run")
    with pytest.raises(CheckpointError, match="is a folder; give the report's file name"):
        write_report(run, tmp_path)


@pytest.mark.slow
def test_headless_chromium_shows_the_report_without_a_console_error_or_a_missing_asset(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_report(run)
    dom, console = open_in_chromium(page)
    assert console == [] and '<p id="missing"></p>' in dom and "730.7" in dom
    # and it would see a broken figure: the test can fail
    broken = tmp_path / "broken.html"
    text = page.read_text()
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken.write_text(text[:start] + "AAAA" + text[start + 64 :])
    dom, console = open_in_chromium(broken)
    assert any("missing asset" in line for line in console) and "could not be shown" in dom


@pytest.mark.slow
def test_wandb_offline_receives_the_rollout_video_and_the_report(tmp_path, box_run):
    from worldmodel.logger import RunLogger
    from worldmodel.rollout import RolloutConfig, write_rollout

    run = make_run(tmp_path / "run")
    video = write_rollout(box_run, box_run.parent / "dataset", RolloutConfig(), tmp_path / "rollout")["video"]
    logger = RunLogger(run, "offline")
    logger.log({"ppo/train/episode_return": 1.0}, 0)
    sent = logger.media({"rollout/video": video, "report": write_report(run), "absent": tmp_path / "none.mp4"})
    logger.close()
    assert sent == ["report", "rollout/video"]
    media = [p.suffix for p in (run / "wandb").rglob("media/**/*") if p.is_file()]
    assert ".mp4" in media and ".html" in media
    assert RunLogger(tmp_path / "quiet").media({"rollout/video": video}) == []  # wandb disabled: nothing sent
