import functools
import re
from dataclasses import dataclass, field

import pytest
import yaml

from agents.config import MINUTE_BUDGETS, PipelineConfig, load_pipeline_config
from worldmodel.config import ConfigError, apply_override, from_dict, load_preset, preset_path, to_dict


def test_tiny_preset_builds_pipeline_config():
    raw = load_preset("tiny")  # compare with the YAML itself, so the test follows edits to the preset
    config = load_pipeline_config("tiny")
    assert isinstance(config, PipelineConfig)
    assert config.run.name == raw["run"]["name"]
    assert config.collect.source.name == raw["collect"]["source"]["name"]
    assert config.collect.source.max_steps == raw["collect"]["source"]["max_steps"]
    assert config.collect.episodes == raw["collect"]["episodes"]
    assert config.collect.perturb_steps == tuple(raw["collect"]["perturb_steps"])
    assert isinstance(config.collect.perturb_steps, tuple)
    assert config.tokenizer.model.widths == tuple(raw["tokenizer"]["model"]["widths"])
    assert config.tokenizer.model.levels == tuple(raw["tokenizer"]["model"]["levels"])
    assert config.dynamics.model.context_frames == raw["dynamics"]["model"]["context_frames"]
    assert config.ppo.horizon == raw["ppo"]["horizon"]
    assert isinstance(config.tokenizer.train.lr, float)
    # a preset file path works like a name
    assert load_pipeline_config(str(preset_path("tiny"))) == config


@pytest.mark.parametrize("preset", sorted(p.stem for p in preset_path("tiny").parent.glob("*.yaml")))
@pytest.mark.parametrize("source", ["carracing", "highway"])
def test_every_preset_builds_for_every_source(preset, source):
    config = load_pipeline_config(preset, source=source)
    assert config.collect.source.name == source
    assert config.loop.iterations > 0  # every preset closes the dream-to-real loop


def test_a_playoff_without_keep_best_is_refused_before_any_work():
    loop = load_pipeline_config("tiny", ["loop.playoff_episodes=4", "loop.playoff_candidates=3"]).loop
    assert (loop.playoff_episodes, loop.playoff_candidates, loop.keep_best) == (4, 3, True)
    with pytest.raises(ConfigError, match="playoff_episodes chooses the policy to keep: it needs keep_best"):
        load_pipeline_config("tiny", ["loop.playoff_episodes=8", "loop.keep_best=false"])
    with pytest.raises(ConfigError, match="playoff_candidates at least 1, got 8 and 0"):
        load_pipeline_config("tiny", ["loop.playoff_episodes=8", "loop.playoff_candidates=0"])


def test_overrides_parse_ints_floats_lists_null_bools():
    config = load_pipeline_config(
        "tiny",
        [
            "tokenizer.train.steps=7",
            "tokenizer.train.lr=0.002",
            "ppo.gamma=1",  # an int YAML value for a float field is coerced
            "tokenizer.model.levels=[4, 3]",
            "collect.source.max_steps=null",
            "run.threads=2",
            "eval.deterministic=false",
            "run.name=custom",
        ],
    )
    assert config.tokenizer.train.steps == 7 and isinstance(config.tokenizer.train.steps, int)
    assert config.tokenizer.train.lr == pytest.approx(0.002) and isinstance(config.tokenizer.train.lr, float)
    assert config.ppo.gamma == 1.0 and isinstance(config.ppo.gamma, float)
    assert config.tokenizer.model.levels == (4, 3)
    assert config.collect.source.max_steps is None
    assert config.run.threads == 2
    assert config.eval.deterministic is False
    assert config.run.name == "custom"


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match="bogus_key"):
        load_pipeline_config("tiny", ["ppo.bogus_key=3"])
    with pytest.raises(ConfigError, match="nosuchsection"):
        load_pipeline_config("tiny", ["nosuchsection.x=3"])
    with pytest.raises(ConfigError, match="frobnicate"):
        load_pipeline_config("tiny", ["tokenizer.model.frobnicate=1"])


@pytest.mark.parametrize(
    "override",
    [
        "tokenizer.train.steps=abc",  # str for int
        "tokenizer.train.steps=[1, 2]",  # list for int
        "tokenizer.model.levels=5",  # scalar for tuple
        "run.wandb=sometimes",  # not in the Literal
        "collect.source=3",  # scalar for a nested dataclass
        "run.name.inner=3",  # a scalar used as a section
        "tokenizer.train.steps",  # no '='
    ],
)
def test_bad_overrides_raise_config_error(override):
    with pytest.raises(ConfigError):
        load_pipeline_config("tiny", [override])


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("definitely-not-a-preset")
    with pytest.raises(ConfigError, match="does not exist"):
        load_preset(tmp_path / "missing.yaml")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_preset(tmp_path / "folder.yaml")


def test_preset_from_custom_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "mine", "val_fraction": 0.2}, "ppo": {"num_envs": 4}}))
    config = load_pipeline_config(str(path), ["run.val_fraction=0.25"])
    assert config.run.name == "mine" and config.run.val_fraction == 0.25 and config.ppo.num_envs == 4
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_preset(bad)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (b"run:\n  device: [cpu\n", r"preset .*bad.yaml is not valid YAML: .*line 3"),  # the line, on one line
        (b"\xaa\xbb\x00\xff", r"preset .*bad.yaml is not a text \(UTF-8\) YAML file"),
        (b"", r"preset .*bad.yaml is empty; expected a mapping of sections"),  # not the defaults, silently
        (b"# only a comment\n", r"is empty"),
    ],
)
def test_a_preset_or_run_config_that_is_not_yaml_is_one_clear_error(tmp_path, text, said):
    from agents.config import read_run_config

    (tmp_path / "bad.yaml").write_bytes(text)
    with pytest.raises(ConfigError, match=said):
        load_pipeline_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_bytes(text)
    with pytest.raises(ConfigError, match=said.replace("preset .*bad.yaml", "run config .*config.yaml")):
        read_run_config(tmp_path / "run")


def test_an_override_whose_value_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'tokenizer.model.levels=\[8,5': the value '\[8,5' is not valid"):
        load_pipeline_config("tiny", ["tokenizer.model.levels=[8,5"])


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "", "a\\b"])
def test_a_run_name_is_one_folder_not_a_path(name):
    with pytest.raises(ConfigError, match="run.name: expected a plain folder name"):
        load_pipeline_config("tiny", [f"run.name={name!r}" if name else "run.name=''"])


def test_highway_source_overlay():
    base = load_pipeline_config("tiny")
    highway = load_pipeline_config("tiny", source="highway")
    assert highway.collect.source.name == "highway"
    overlay = load_preset("tiny")["sources"]["highway"]
    assert highway.collect.source.max_steps == overlay["collect"]["source"]["max_steps"]
    assert highway.collect.episodes == overlay["collect"]["episodes"]
    assert highway.ppo.horizon == overlay["ppo"]["horizon"]
    assert highway.ppo.horizon != base.ppo.horizon or highway.collect.episodes != base.collect.episodes
    # untouched keys keep the preset's values
    assert highway.collect.source.frame_size == base.collect.source.frame_size == 64
    assert highway.ppo.num_envs == base.ppo.num_envs
    # overrides apply after the overlay
    later = load_pipeline_config("tiny", ["ppo.horizon=9", "collect.episodes=4"], source="highway")
    assert later.ppo.horizon == 9 and later.collect.episodes == 4
    # carracing (the preset's own source) gets no highway overlay
    assert load_pipeline_config("tiny", source="carracing").ppo.horizon == base.ppo.horizon


def test_apply_override_nested_and_yaml_values():
    raw = {"a": {"b": 1}}
    apply_override(raw, "a.c.d=[1, 2.5, x]")
    apply_override(raw, "a.b= 3 ")
    assert raw == {"a": {"b": 3, "c": {"d": [1, 2.5, "x"]}}}


@dataclass
class _Inner:
    x: int = 1
    y: float = 0.5
    z: tuple[int, ...] = (1,)


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    maybe: int | None = None


def test_from_dict_roundtrip_and_coercion():
    built = from_dict(_Outer, {"inner": {"x": 2.0, "y": 3, "z": [4, 5]}, "maybe": 7})
    assert built == _Outer(_Inner(2, 3.0, (4, 5)), 7)
    assert isinstance(built.inner.x, int) and isinstance(built.inner.y, float)
    assert from_dict(_Outer, to_dict(built)) == built
    with pytest.raises(ConfigError, match="x"):
        from_dict(_Outer, {"inner": {"x": 2.5}})
    with pytest.raises(ConfigError, match="_Outer.inner"):
        from_dict(_Outer, {"inner": {"w": 1}})


def test_scientific_notation_override_is_a_float():
    raw = {}
    apply_override(raw, "lr=1e-3")
    assert raw["lr"] == pytest.approx(1e-3)
    assert load_pipeline_config("tiny", ["tokenizer.train.lr=1e-3"]).tokenizer.train.lr == pytest.approx(1e-3)


def test_cli_overrides_may_follow_flags_and_strays_are_refused(capsys):
    from pipeline.cli import parse_args

    args = parse_args(["train", "tokenizer", "--preset", "tiny", "tokenizer.train.steps=5", "--name", "x", "a.b=1"])
    assert args.component == "tokenizer" and args.preset == "tiny" and args.name == "x"
    assert args.overrides == ["tokenizer.train.steps=5", "a.b=1"]
    with pytest.raises(SystemExit):
        parse_args(["train", "tokenizer", "--preset", "tiny", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # commands without overrides take none
        parse_args(["eval", "tokenizer", "--checkpoint", "c", "--frames", "f.npy", "a.b=1"])


@pytest.mark.parametrize(
    "override",
    [
        "ppo.num_envs=0",
        "dynamics.reward_smoothing=4",
        "dynamics.termination_lookahead=0",
        "run.val_fraction=1.5",
        "loop.explore=2",
        "ppo.gamma=0",
        "ppo.dtype=float16",
        "ppo.burn_in=7",  # longer than the tiny dynamics model's 6 context frames
        "rollout.burn_in=0",
        "collect.perturb_steps=[5, 2]",
        "tokenizer.train.max_minutes=0",
        "eval.seed=50",  # the tiny preset collects 100 episodes from seed 0
        "eval.seed=120",  # and its 3 loop rounds (and the scoring round) 8 more each, seeds 100 to 131
        "eval.seed=132",  # and the playoff's 8 tracks after them, seeds 132 to 139
        "ppo.lr=.inf",
        "ppo.num_envs=true",  # YAML's true is an int to Python, not a count
        "run.threads=-2",
        "run.device=foo",
        "tokenizer.model.levels=[1]",
        "tokenizer.model.levels=[]",
        "dynamics.model.heads=3",  # the tiny preset's d_model is 128
        "ppo.minibatches=4096",  # the tiny preset's rollout is 64 x 32 = 2,048 steps
    ],
)
def test_a_setting_no_stage_could_run_with_is_refused_at_load_naming_its_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected"):
        load_pipeline_config("tiny", [override])


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["collect.source.frame_size=7"], "7x7 frames: image_size 7 and image_width None must be multiples of 2**3"),
        (["tokenizer.model.widths=[]"], "widths (): expected at least one stage"),
    ],
)
def test_frames_the_tokenizer_cannot_take_are_refused_before_collecting(overrides, said):
    with pytest.raises(ConfigError, match=re.escape("tokenizer.model, for collect.source's ") + ".*" + re.escape(said)):
        load_pipeline_config("tiny", overrides)


def test_cuda_is_refused_at_load_where_torch_has_none(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^run.device: expected"):
        load_pipeline_config("tiny", ["run.device=cuda"])
    assert load_pipeline_config("tiny", ["run.device=auto"]).run.device == "auto"


def test_evaluation_seeds_just_past_every_collection_and_the_playoff_are_accepted():
    assert load_pipeline_config("tiny", ["eval.seed=140"]).eval.seed == 140
    assert load_pipeline_config("tiny", ["eval.seed=132", "loop.playoff_episodes=0"]).eval.seed == 132


def test_a_refused_setting_is_one_line_and_exit_status_2_from_the_command(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--preset", "tiny", "dynamics.reward_smoothing=4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: dynamics.reward_smoothing: expected an odd number of steps >= 1 (centred), got 4\n"


@pytest.mark.parametrize(
    "source, overrides",
    [
        ("kart", []),
        (None, ["ppo.num_envs=0"]),
        (None, ["collect.seed=5"]),
        (None, ["run.runs_dir=elsewhere"]),  # the bench would look for the seeds' runs in --runs-dir
        (None, ["run.name=mine"]),
        (None, ["run={runs_dir: elsewhere}"]),
    ],
)
def test_bench_reliability_refuses_a_bad_setting_before_any_seed_runs(tmp_path, monkeypatch, source, overrides):
    import subprocess

    from bench.reliability import ReliabilityConfig, bench_reliability

    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("a seed's run started"))
    config = ReliabilityConfig(source=source, seeds=(0, 1), runs_dir=str(tmp_path), overrides=overrides)
    named = any(item.startswith("run") for item in overrides)
    with pytest.raises(ConfigError, match="give --runs-dir and --name" if named else None):
        bench_reliability(config, tmp_path)


def test_a_device_torch_cannot_use_is_refused_with_what_to_use(monkeypatch):
    import torch

    from worldmodel.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for bad, message in (("cuda", "sees no CUDA device"), ("foo", "expected cpu, cuda")):
        with pytest.raises(ConfigError, match=message):
            resolve_device(bad)


def test_bench_reliability_stops_at_a_failed_seed_with_one_line(tmp_path, monkeypatch, capsys):
    import subprocess

    from pipeline.cli import main

    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(args, 3))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "reliability", "--preset", "tiny", "--seeds", "1", "--runs-dir", str(tmp_path)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: seed 0's run") and "exit 3" in err and "Traceback" not in err


def test_time_scale_multiplies_every_minute_budget_once_and_records_what_runs(tmp_path):
    plain = load_pipeline_config("tiny", [], source="highway")
    scaled = load_pipeline_config("tiny", ["run.time_scale=2.5"], source="highway")
    for key in MINUTE_BUDGETS:
        *path, name = key.split(".")
        before = getattr(functools.reduce(getattr, path, plain), name)
        after = getattr(functools.reduce(getattr, path, scaled), name)
        assert after == pytest.approx(2.5 * before), key
    assert scaled.run.time_scale == 1.0  # the config says what runs: loading it again scales nothing twice
    assert scaled.tokenizer.train.steps == plain.tokenizer.train.steps  # steps and everything else as they were
    saved = tmp_path / "config.yaml"  # a run's config.yaml, used again as a preset: the same minutes, not 2.5 x 2.5
    saved.write_text(yaml.safe_dump(to_dict(scaled), sort_keys=False))
    assert load_pipeline_config(str(saved)) == scaled
    given = load_pipeline_config("tiny", ["run.time_scale=2", "loop.max_minutes=30"])
    assert given.loop.max_minutes == 60  # a budget given beside the scale is scaled too, as the preset's are
    nothing = load_pipeline_config("tiny", ["run.time_scale=3", "loop.max_minutes=null"])
    assert nothing.loop.max_minutes is None  # no budget stays no budget
    for bad in ("0", "-1", "fast"):
        with pytest.raises(ConfigError, match="run.time_scale"):
            load_pipeline_config("tiny", [f"run.time_scale={bad}"])
    with pytest.raises(ConfigError, match="run.scaled_by records what a run's minutes were scaled by"):
        load_pipeline_config("tiny", ["run.scaled_by=2"])
    auto = load_pipeline_config("tiny", ["run.time_scale=auto"], source="highway")  # for `worldmodel run` to measure
    assert auto.run.time_scale == "auto" and auto.loop.max_minutes == plain.loop.max_minutes


def test_a_branch_scales_its_minute_budgets_as_the_run_was_scaled():
    from bench.branch import apply_scaled_overrides

    raw = {"run": {"scaled_by": 2.5}, "loop": {"ppo_minutes": 1.875, "episodes": 8, "max_minutes": 22.5}}
    apply_scaled_overrides(raw, ["loop.ppo_minutes=2", "loop.episodes=16", "loop.max_minutes=null"])
    assert raw["loop"] == {"ppo_minutes": 5.0, "episodes": 16, "max_minutes": None}  # only the minutes, x2.5


@pytest.mark.parametrize("command", ["evaluate", "rollout"])
def test_a_command_on_a_run_that_does_not_exist_names_the_run(command, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([command, "--preset", "tiny", "--name", "nosuchrun"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: runs/nosuchrun does not exist: no run named 'nosuchrun' in runs"), err
    assert not (tmp_path / "runs").exists()
