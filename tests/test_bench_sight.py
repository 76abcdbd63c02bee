import json

import pytest

from agents.evaluate import EvalConfig, evaluate
from bench.sight import bench_sight, format_markdown, write_results
from envs.sources import SourceConfig
from pipeline.cli import parse_args


def test_a_blinded_scripted_driver_crashes_where_the_sighted_one_does_not(tmp_path):
    """Sight limits what the scripted highway driver reads of the simulator: with all of it, it drives as
    `worldmodel evaluate`'s expert does on the same held-out episodes; seeing 1 m ahead, it speeds into the cars."""
    rows = bench_sight([None, (1e9, 1e9), (0.0, 1.0)], episodes=3, workers=1)
    full, wide, blind = rows
    reference = evaluate(tmp_path, SourceConfig("highway"), EvalConfig(episodes=3, workers=1), [], kinds=("expert",))
    assert full["mean"] == pytest.approx(reference["expert"]["mean"])
    assert full["crashes"] == reference["expert"]["crashes"] == 0
    assert (wide["mean"], wide["crashes"]) == (full["mean"], full["crashes"])  # beyond the road's end: no change
    assert blind["crashes"] == 3 and blind["mean"] < full["mean"]
    write_results(rows, tmp_path / "sight.json")
    assert json.loads((tmp_path / "sight.json").read_text())["rows"][2]["sight"] == [0.0, 1.0]
    table = format_markdown(rows)
    assert "| everything |" in table and "| 0 m, 1 m |" in table and "3 of 3" in table


def test_sight_refuses_a_view_that_shows_nothing_before_driving(capsys):
    with pytest.raises(ValueError, match=r"sight \(5.0, 0.0\): expected \[behind, ahead\] in metres"):
        bench_sight([(5.0, 0.0)])
    args = parse_args(["bench", "sight", "--sights", "all,13:51"])
    assert args.sights == [None, (13.0, 51.0)]
    for bad, said in (("13", "sight (13.0,): expected"), ("10:0", "ahead > 0"), ("1:inf", "finite"), ("x:3", "'x:3'")):
        with pytest.raises(SystemExit):
            parse_args(["bench", "sight", "--sights", bad])
        assert said in capsys.readouterr().err
