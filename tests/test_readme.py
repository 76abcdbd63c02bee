"""The README is what a newcomer reads first: it stays short, and what it tells them to type runs."""

import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import parse_args
from worldmodel.config import preset_path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[list[str]]:
    """Every `worldmodel ...` line of the README's shell blocks as argv (without the comment), torchrun's too."""
    found = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["worldmodel"]:
                found.append(words[1:])
            elif words[:1] == ["torchrun"]:
                found.append(words[words.index("pipeline") + 1 :])
    return found


def test_the_readme_is_short():
    assert len(README) <= 8000, f"README.md is {len(README)} characters; move detail to docs/"


def test_the_readmes_links_lead_to_files():
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        assert link.startswith("http") or (ROOT / link).is_file(), link


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv[:3]))
def test_every_readme_command_is_accepted_by_the_cli(argv):
    args = parse_args(argv)  # an unknown flag or a missing argument exits here
    if getattr(args, "preset", None):
        assert preset_path(args.preset).is_file()


def test_the_readme_shows_every_command():
    assert {argv[0] for argv in commands()} >= {"run", "collect", "train", "evaluate", "rollout", "bench", "eval"}


def test_the_readmes_dream_snippet_runs(box_run, monkeypatch):
    (snippet,) = [block for block in code_blocks("python") if "Dream-v0" in block]
    monkeypatch.chdir(box_run.parent)
    namespace = {}
    exec(snippet.replace('"runs/tiny-carracing"', repr(str(box_run))), namespace)
    assert namespace["env"].observation_space.contains(namespace["obs"])
    assert isinstance(namespace["reward"], float) and namespace["vec"].num_envs == 256
