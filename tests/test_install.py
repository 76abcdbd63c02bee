"""The project installed as a user installs it: a wheel (not an editable install) in a fresh virtualenv, its command
run from a folder outside the checkout."""

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_and_its_command_finds_the_presets_outside_the_checkout(tmp_path):
    # built from a copy of the sources: setuptools writes build/ beside them, which must neither litter the checkout
    # nor hand a stale file to the wheel
    source = tmp_path / "source"
    skip = (".venv", ".git", "runs", "data", "wandb", "build", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skip))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", wheels],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("driving_worldmodel-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # the dependencies (torch, gymnasium, ...) come from this environment, as a plain path: its .pth files, among
    # them the checkout's editable install, are not read, so only the wheel provides the project's packages
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "-q",
            wheel,
        ],
        check=True,
        cwd=tmp_path,
    )

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "configs").mkdir(parents=True)  # a user's own folder of that name must not hide the presets
    (elsewhere / "configs" / "notes.yaml").write_text("mine: true\n")
    where = subprocess.check_output(
        [python, "-c", "import worldmodel.config as c, agents, envs; print(c.__file__); print(c.CONFIG_DIR)"],
        text=True,
        cwd=elsewhere,
    ).split()
    assert all(Path(p).is_relative_to(site) for p in where), where  # the wheel's files, not the checkout's
    assert sorted(p.name for p in Path(where[1]).glob("*.yaml")) == ["base.yaml", "small.yaml", "tiny.yaml"]

    command = env_dir / "bin" / "worldmodel"
    short = ["collect.episodes=1", "collect.workers=1", "collect.source.max_steps=4"]
    by_name = subprocess.run(  # as torchrun starts it: python -m, the working directory first on the import path
        [python, "-m", "pipeline", "collect", "--preset", "tiny", "--name", "installed", *short],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert by_name.returncode == 0, by_name.stderr[-2000:]
    assert (elsewhere / "runs" / "installed" / "dataset" / "manifest.json").is_file()

    # a user's own YAML file, by path, keeps working
    (elsewhere / "mine.yaml").write_text(
        (Path(where[1]) / "tiny.yaml").read_text().replace("episodes: 100", "episodes: 2")
    )
    by_path = subprocess.run(
        [
            command,
            "collect",
            "--preset",
            "mine.yaml",
            "--name",
            "mine",
            "collect.workers=1",
            "collect.source.max_steps=4",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert by_path.returncode == 0, by_path.stderr[-2000:]
    assert "2 episodes" in by_path.stdout

    # the shipped world model dreams right after the install, with no run folder
    dream = subprocess.run(
        [
            python,
            "-c",
            "import gymnasium as gym, envs, envs.dream as d; env = gym.make('WorldModel/Dream-v0'); env.reset(seed=0);"
            " env.step(env.action_space.sample()); print(d.SHIPPED_MODEL)",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dream.returncode == 0, dream.stderr[-2000:]
    assert Path(dream.stdout.strip()).is_relative_to(site)
    shipped = sum(f.stat().st_size for f in Path(dream.stdout.strip()).iterdir())
    assert shipped <= 15 * 2**20, f"the shipped model is {shipped / 2**20:.1f} MB, more than the 15 MB promised"
