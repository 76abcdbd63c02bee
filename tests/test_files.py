import json
import os
import stat

import numpy as np
import pytest
from conftest import BOX_SPACE, make_episode

import worldmodel.files as files
from worldmodel.dataset import Dataset, write_episode
from worldmodel.files import atomic_path, save_figure_atomic, write_json_atomic, write_text_atomic


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022(monkeypatch):
    """The usual umask, for this process (files written by numpy or matplotlib) and for the helper."""
    before = os.umask(0o022)
    monkeypatch.setattr(files, "UMASK", 0o022)
    yield
    os.umask(before)


def test_json_is_written_atomically_with_nan_and_infinity_as_null(tmp_path):
    path = tmp_path / "out" / "figures.json"
    write_json_atomic(path, {"psnr": {"1": 25.5, "64": float("nan")}, "ratio": [float("inf"), 2], "n": 3})
    assert json.loads(path.read_text()) == {"psnr": {"1": 25.5, "64": None}, "ratio": [None, 2], "n": 3}
    assert [p.name for p in path.parent.iterdir()] == ["figures.json"]  # no temporary file left behind


def test_a_new_file_gets_the_umasks_permissions_not_tempfiles_owner_only(tmp_path, umask_022):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": 1})
    assert mode(path) == 0o644  # tempfile.mkstemp alone would leave 0o600


def test_a_replaced_file_keeps_its_permissions(tmp_path, umask_022):
    path = tmp_path / "notes.md"
    path.write_text("old")
    path.chmod(0o640)
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert mode(path) == 0o640


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_the_temporary_name_keeps_the_suffix_for_writers_that_choose_the_format_by_it(tmp_path):
    with atomic_path(tmp_path / "rollout.mp4") as tmp:
        assert tmp.suffix == ".mp4" and tmp.parent == tmp_path and tmp.name.startswith(".rollout.mp4.")
        tmp.write_bytes(b"x")
    assert (tmp_path / "rollout.mp4").read_bytes() == b"x"


def test_an_episode_folder_is_replaced_whole_and_readable_by_others(tmp_path, umask_022):
    rng = np.random.default_rng(0)
    Dataset.create(tmp_path, "synthetic", (8, 8, 3), BOX_SPACE)
    first = write_episode(tmp_path, "000000", make_episode(5, 8, 3, BOX_SPACE, rng))
    (first / "stale.npy").write_bytes(b"from an older write")
    again = write_episode(tmp_path, "000000", make_episode(7, 8, 3, BOX_SPACE, rng))
    assert sorted(p.name for p in again.iterdir()) == sorted(
        f"{a}.npy" for a in ("frames", "actions", "rewards", "terminated", "truncated")
    )
    assert np.load(again / "actions.npy").shape[0] == 7
    assert mode(again) == 0o755 and mode(again / "frames.npy") == 0o644
    assert [p.name for p in (tmp_path / "episodes").iterdir()] == ["000000"]


def test_a_figure_is_saved_as_png_and_closed(tmp_path, umask_022):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure_atomic(fig, tmp_path / "curve.png", dpi=50)
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mode(tmp_path / "curve.png") == 0o644
    assert not plt.fignum_exists(fig.number)


def test_a_folder_whose_replacement_fails_is_put_back(tmp_path):
    old = tmp_path / "000000"
    old.mkdir()
    (old / "frames.npy").write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        files._replace_folder(tmp_path / "never-written", old)
    assert (old / "frames.npy").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["000000"]  # nothing left aside


def test_a_figure_path_without_a_suffix_is_still_a_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    save_figure_atomic(fig, tmp_path / "psnr", dpi=30)
    assert (tmp_path / "psnr").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_damaged_json_file_is_named_not_a_parser_traceback(tmp_path, capsys):
    from pipeline.cli import main

    path = tmp_path / "results.json"
    assert files.read_json(path, {}) == {}  # no file: the default
    write_json_atomic(path, {"collect": {"episodes": 3}})
    assert files.read_json(path) == {"collect": {"episodes": 3}}
    path.write_text('{"collect": {"epis')  # cut short
    with pytest.raises(files.DamagedFile, match="results.json is not readable JSON"):
        files.read_json(path)
    summary = tmp_path / "summary.json"
    summary.write_text("{")
    with pytest.raises(SystemExit) as exit_:  # a run whose summary is damaged: one line, status 2, no page
        main(["report", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {summary} is not readable JSON")
    summary.write_text("[1, 2]")  # JSON, but not the object a summary is
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert capsys.readouterr().err.startswith(f"error: {summary} holds a JSON list, not the object expected")
    assert files.read_json(summary) == [1, 2]  # read by a caller that takes any JSON
    assert not (tmp_path / "report.html").exists()


def test_an_output_that_cannot_be_written_is_refused_before_the_work_that_fills_it(tmp_path, capsys):
    from pipeline.cli import build_parser, main

    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "folder").mkdir()
    check = files.check_output_place
    assert check(tmp_path / "new" / "x.json") == tmp_path / "new" / "x.json"
    assert check(tmp_path / "folder", folder=True) == tmp_path / "folder"
    for path, folder, said in (
        (tmp_path / "afile" / "x.json", False, "afile is a file, so"),
        (tmp_path / "folder", False, "folder is a folder; give a file"),
        (tmp_path / "afile", True, "afile is a file; give a folder"),
    ):
        with pytest.raises(files.UnwritablePath, match=said):
            check(path, folder=folder)
        with pytest.raises(files.UnwritablePath, match=said), files.atomic_path(path, folder=folder):
            pass  # the atomic writes say the same
    parser = build_parser()
    for args, said in (
        (["report", "runs/x", "--out", str(tmp_path / "afile" / "r.html")], "argument --out: "),
        (["bench", "sight", "--json", str(tmp_path / "folder")], "argument --json: "),
        (["bench", "reliability", "--out", str(tmp_path / "afile")], "argument --out: "),
        (["export", "runs/x", "--out", str(tmp_path / "afile" / "m")], "argument --out: "),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(args)
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a runs folder that is a file, before any stage
        main(["run", "--preset", "tiny", f"run.runs_dir={tmp_path / 'afile'}"])
    assert exit_.value.code == 2 and "afile is a file, so" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"
