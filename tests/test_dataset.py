import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
from conftest import BOX_SPACE, make_episode, write_synthetic_dataset

from worldmodel.dataset import (
    Dataset,
    DatasetError,
    Episode,
    EpisodeError,
    EpisodeRecord,
    FrameSampler,
    sample_windows,
    space_from_dict,
    space_to_dict,
    write_episode,
)


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    dataset = Dataset.create(tmp_path, "synthetic", (16, 16, 3), BOX_SPACE, meta={"note": "x"})
    episode = make_episode(9, 16, 3, BOX_SPACE, rng, terminal=True)
    write_episode(tmp_path, "000000", episode)
    dataset.add(EpisodeRecord("000000", 9, seed=5, ret=1.5, kind="expert"))

    reopened = Dataset.open(tmp_path)
    assert len(reopened) == 1
    assert reopened.frame_shape == (16, 16, 3)
    assert reopened.manifest.meta == {"note": "x"}
    space = reopened.action_space
    assert isinstance(space, gym.spaces.Box)
    np.testing.assert_array_equal(space.low, BOX_SPACE.low)
    np.testing.assert_array_equal(space.high, BOX_SPACE.high)
    for mmap in (True, False):
        loaded = reopened.load(0, mmap=mmap)
        assert len(loaded) == 9
        for name in ("frames", "actions", "rewards", "terminated", "truncated"):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(episode, name))
            assert getattr(loaded, name).dtype == getattr(episode, name).dtype
    record = reopened.episodes[0]
    assert (record.name, record.length, record.seed, record.ret, record.kind) == ("000000", 9, 5, 1.5, "expert")
    # no temporary files are left behind
    assert sorted(p.name for p in (tmp_path / "episodes").iterdir()) == ["000000"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_manifest_lists_episodes(tmp_path):
    write_synthetic_dataset(tmp_path, gym.spaces.Discrete(5), episodes=3, steps=6, channels=1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "worldmodel-dataset"
    assert manifest["version"] == 1
    assert manifest["frame_shape"] == [16, 16, 1]
    assert manifest["action_space"] == {"type": "discrete", "n": 5}
    assert [e["name"] for e in manifest["episodes"]] == ["000000", "000001", "000002"]
    assert [e["length"] for e in manifest["episodes"]] == [6, 6, 6]
    dataset = Dataset.open(tmp_path)
    assert dataset.load(2).actions.dtype == np.int64
    # re-adding an episode with the same name replaces its entry
    dataset.add(EpisodeRecord("000001", 6, seed=9))
    assert [e.name for e in Dataset.open(tmp_path).episodes] == ["000000", "000002", "000001"]


def test_create_reopens_compatible_and_refuses_mismatch(tmp_path):
    write_synthetic_dataset(tmp_path, BOX_SPACE, episodes=2, steps=5)
    again = Dataset.create(tmp_path, "synthetic", (16, 16, 3), BOX_SPACE)
    assert len(again) == 2
    with pytest.raises(DatasetError, match="frame_shape"):
        Dataset.create(tmp_path, "synthetic", (32, 32, 3), BOX_SPACE)
    with pytest.raises(DatasetError, match="source"):
        Dataset.create(tmp_path, "other", (16, 16, 3), BOX_SPACE)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="is a file"):
        Dataset.create(tmp_path / "notes.txt", "synthetic", (16, 16, 3), BOX_SPACE)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(DatasetError, match="action_space"):
        Dataset.create(tmp_path, "synthetic", (16, 16, 3), gym.spaces.Discrete(3))


def test_a_dataset_is_made_only_in_a_new_or_empty_folder_below_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="notes.txt is a file, so .* cannot be written below it"):
        Dataset.create(tmp_path / "notes.txt" / "data", "synthetic", (16, 16, 3), BOX_SPACE)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "readme.txt").write_text("keep me")
    with pytest.raises(DatasetError, match=r"holds readme.txt and no dataset \(manifest.json\)"):
        Dataset.create(mine, "synthetic", (16, 16, 3), BOX_SPACE)
    assert sorted(p.name for p in mine.iterdir()) == ["readme.txt"]
    (tmp_path / "empty" / ".manifest.json.x.tmp").parent.mkdir()
    (tmp_path / "empty" / ".manifest.json.x.tmp").write_text("")  # what a kill during an atomic write leaves
    assert len(Dataset.create(tmp_path / "empty", "synthetic", (16, 16, 3), BOX_SPACE)) == 0
    assert len(Dataset.create(tmp_path / "new" / "data", "synthetic", (16, 16, 3), BOX_SPACE)) == 0


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("array", ["frames", "actions"])
def test_truncated_npy_names_the_file(tmp_path, mmap, array):
    dataset = write_synthetic_dataset(tmp_path, BOX_SPACE, episodes=3, steps=8)
    bad = dataset.episode_dir(1) / f"{array}.npy"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])

    with pytest.raises(EpisodeError) as info:
        dataset.load(1, mmap=mmap)
    assert str(bad) in str(info.value)
    assert isinstance(info.value, DatasetError)
    # the other episodes still load
    assert len(dataset.load(0, mmap=mmap)) == 8
    assert len(dataset.load(2, mmap=mmap)) == 8

    with pytest.warns(UserWarning, match=str(bad).replace("\\", "\\\\")):
        assert dataset.usable() == [0, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataset.usable([0, 2]) == [0, 2]


def test_missing_and_inconsistent_episode_files(tmp_path):
    dataset = write_synthetic_dataset(tmp_path, BOX_SPACE, episodes=3, steps=8)
    missing = dataset.episode_dir(0) / "rewards.npy"
    missing.unlink()
    with pytest.raises(EpisodeError, match="rewards.npy"):
        dataset.load(0)
    # an array of the wrong length
    np.save(dataset.episode_dir(1) / "actions.npy", np.zeros((3, 3), np.float32))
    with pytest.raises(EpisodeError, match="actions"):
        dataset.load(1)
    # the manifest disagrees with the files
    dataset.manifest.episodes[2].length = 5
    with pytest.raises(EpisodeError, match="manifest"):
        dataset.load(2)
    with pytest.warns(UserWarning):
        assert dataset.usable() == []


def test_expert_actions_are_optional_and_checked(tmp_path):
    rng = np.random.default_rng(2)
    dataset = Dataset.create(tmp_path, "synthetic", (16, 16, 3), BOX_SPACE)
    plain = make_episode(6, 16, 3, BOX_SPACE, rng)
    labelled = make_episode(6, 16, 3, BOX_SPACE, rng)
    labelled.expert_actions = np.clip(labelled.actions + 0.5, 0.0, 1.0).astype(np.float32)
    for name, episode in (("000000", plain), ("000001", labelled)):
        write_episode(tmp_path, name, episode)
        dataset.add(EpisodeRecord(name, 6))
    assert dataset.load(0).expert_actions is None
    assert not (dataset.episode_dir(0) / "expert_actions.npy").exists()
    loaded = dataset.load(1)
    np.testing.assert_array_equal(loaded.expert_actions, labelled.expert_actions)
    # the labels are no input to the tokens, so they do not change the episode's content key
    key = dataset.content_key(1)
    np.save(dataset.episode_dir(1) / "expert_actions.npy", np.zeros((6, 3), np.float32))
    assert dataset.content_key(1) == key
    # labels of another length or kind than the actions are refused, naming them
    np.save(dataset.episode_dir(1) / "expert_actions.npy", np.zeros((5, 3), np.float32))
    with pytest.raises(EpisodeError, match="expert_actions"):
        dataset.load(1)
    np.save(dataset.episode_dir(1) / "expert_actions.npy", np.zeros(6, np.int64))
    with pytest.raises(EpisodeError, match="expert_actions"):
        dataset.load(1)
    with pytest.raises(EpisodeError, match="expert_actions"):
        write_episode(tmp_path, "000002", Episode(**{**vars(plain), "expert_actions": np.zeros(6, np.int64)}))


def test_wrong_frame_shape_is_rejected(tmp_path):
    dataset = write_synthetic_dataset(tmp_path, BOX_SPACE, episodes=1, steps=4)
    np.save(dataset.episode_dir(0) / "frames.npy", np.zeros((5, 8, 8, 3), np.uint8))
    with pytest.raises(EpisodeError, match="manifest"):
        dataset.load(0)


def test_missing_manifest(tmp_path):
    with pytest.raises(DatasetError, match="manifest.json"):
        Dataset.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="JSON"):
        Dataset.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(DatasetError, match="format"):
        Dataset.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "worldmodel-dataset", "version": 1}))
    with pytest.raises(DatasetError, match="malformed"):
        Dataset.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(["worldmodel-dataset", 1]))  # AttributeError before
    with pytest.raises(DatasetError, match="expected a JSON object .* got a list"):
        Dataset.open(tmp_path)
    good = write_synthetic_dataset(tmp_path / "good", BOX_SPACE, episodes=1, steps=3).manifest.to_json()
    for change, message in (
        ({"episodes": [["ep0", 3]]}, "malformed"),  # an episode entry that is not an object
        ({"episodes": [{"length": 3}]}, "malformed"),
        ({"frame_shape": [16, 16]}, r"expected frame_shape \(height, width, channels\) .* got \[16, 16\]"),
    ):
        (tmp_path / "manifest.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(DatasetError, match=message):
            Dataset.open(tmp_path)


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 0), (16, 16.0, 3), 16, (16, 16, True)])
def test_create_refuses_a_frame_shape_that_is_not_three_positive_integers(tmp_path, shape):
    with pytest.raises(DatasetError, match="expected frame_shape"):
        Dataset.create(tmp_path / "new", "synthetic", shape, BOX_SPACE)
    assert not (tmp_path / "new").exists()  # nothing written


def test_write_episode_validates():
    bad = Episode(
        frames=np.zeros((3, 4, 4, 3), np.uint8),  # 3 frames for 3 steps
        actions=np.zeros((3, 3), np.float32),
        rewards=np.zeros(3, np.float32),
        terminated=np.zeros(3, bool),
        truncated=np.zeros(3, bool),
    )
    with pytest.raises(EpisodeError, match="steps \\+ 1"):
        bad.validate()
    bad.frames = np.zeros((4, 4, 4, 3), np.float32)
    with pytest.raises(EpisodeError, match="uint8"):
        bad.validate()


def test_space_dict_round_trip():
    for space in (BOX_SPACE, gym.spaces.Discrete(7)):
        back = space_from_dict(json.loads(json.dumps(space_to_dict(space))))
        assert back == space
    with pytest.raises(DatasetError):
        space_to_dict(gym.spaces.MultiBinary(3))
    with pytest.raises(DatasetError):
        space_from_dict({"type": "tuple"})


@pytest.mark.parametrize("window", [1, 3, 6])
def test_sample_windows_never_cross_episode_ends(window):
    lengths = np.array([5, 0, 2, 9, 6, 3])
    rng = np.random.default_rng(0)
    episode, start = sample_windows(lengths, window, 4000, rng)
    assert episode.shape == start.shape == (4000,)
    assert (start >= 0).all()
    assert (start + window <= lengths[episode]).all()
    # every valid (episode, start) pair is reachable, none of the too-short episodes is
    valid = {(e, s) for e, n in enumerate(lengths) for s in range(n - window + 1)}
    assert set(zip(episode.tolist(), start.tolist(), strict=True)) == valid


def test_sample_windows_too_long():
    with pytest.raises(DatasetError, match="long enough"):
        sample_windows(np.array([2, 3]), 4, 1, np.random.default_rng(0))


def test_split():
    dataset = Dataset("unused", None)  # type: ignore[arg-type]
    dataset.manifest = type("M", (), {"episodes": list(range(8))})()
    train, val = dataset.split(0.25)
    assert val == [3, 7] and train == [0, 1, 2, 4, 5, 6]
    assert set(train).isdisjoint(val)
    dataset.manifest.episodes = [0]
    with pytest.raises(DatasetError, match="at least 2"):
        dataset.split(0.5)


def test_frame_sampler(tmp_path):
    dataset = write_synthetic_dataset(tmp_path, BOX_SPACE, episodes=3, steps=5, lengths=[5, 2, 7])
    sampler, rng = FrameSampler(dataset, [0, 2]), np.random.default_rng(0)
    batch = sampler.sample(10, rng)
    assert batch.shape == (10, 16, 16, 3) and batch.dtype == np.uint8
    everything = sampler.all_frames()
    assert everything.shape == (6 + 8, 16, 16, 3)
    assert sampler.all_frames(stride=2).shape == (3 + 4, 16, 16, 3)
    # every sampled frame is one of the sampler's episodes' frames
    pool = {f.tobytes() for f in everything}
    assert all(f.tobytes() in pool for f in sampler.sample(50, rng))
    excluded = dataset.load(1).frames
    assert not any(np.array_equal(f, g) for f in sampler.sample(50, rng) for g in excluded)


def test_saved_episodes_are_never_replaced_by_mistake_and_only_written_ones_are_added(tmp_path):
    rng = np.random.default_rng(5)
    dataset = write_synthetic_dataset(tmp_path / "data", BOX_SPACE, episodes=2, steps=5)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious.txt").write_text("keep me")
    for name in ("", "../../victim", "a/b", ".."):  # never a path: it would replace another folder whole
        with pytest.raises(DatasetError, match="episode name"):
            write_episode(dataset.root, name, make_episode(3, 16, 3, BOX_SPACE, rng))
    assert (tmp_path / "victim" / "precious.txt").read_text() == "keep me"
    with pytest.raises(DatasetError, match="already holds episode 000000"):  # registered: refused unless asked
        write_episode(dataset.root, "000000", make_episode(3, 16, 3, BOX_SPACE, rng))
    assert len(Dataset.open(dataset.root).load(0)) == 5
    write_episode(dataset.root, "000000", make_episode(5, 16, 3, BOX_SPACE, rng), replace=True)  # mended in place
    with pytest.raises(DatasetError, match="write it with write_episode"):
        dataset.add(EpisodeRecord("ghost", 10))
    write_episode(dataset.root, "000002", make_episode(4, 16, 3, BOX_SPACE, rng))
    for record in (EpisodeRecord("000002", 5), EpisodeRecord("000002", -1)):
        with pytest.raises(DatasetError, match="holds 4 steps"):
            dataset.add(record)
    with pytest.raises(DatasetError, match="expected an EpisodeRecord"):
        dataset.add({"name": "000002", "length": 4})
    write_episode(dataset.root, "000003", make_episode(4, 8, 3, BOX_SPACE, rng))  # another frame size
    with pytest.raises(DatasetError, match=r"this dataset's frames are \(16, 16, 3\)"):
        dataset.add(EpisodeRecord("000003", 4))
    dataset.add(EpisodeRecord("000002", 4))
    assert [e.name for e in Dataset.open(dataset.root).episodes] == ["000000", "000001", "000002"]


def test_a_missing_or_damaged_token_cache_is_named_with_what_to_do(tmp_path):
    from worldmodel.tokens import TokenizedDataset

    path = tmp_path / "tokens.npz"
    with pytest.raises(DatasetError, match="not found: no token cache"):
        TokenizedDataset.load(path)
    path.write_bytes(b"PK\x03\x04 cut short")  # a zip's first bytes, then nothing
    with pytest.raises(DatasetError, match="unreadable token cache .*delete it to re-tokenize"):
        TokenizedDataset.load(path)
    np.savez(path, tokens=np.zeros((2, 4, 4), np.int16))  # a zip without the cache's other arrays
    with pytest.raises(DatasetError, match="unreadable token cache"):
        TokenizedDataset.load(path)


def test_a_resumed_training_draws_new_batches_and_a_fresh_one_its_seeds_stream():
    from worldmodel.train import StepRng

    lengths = np.array([40, 50, 60])
    fresh, plain = StepRng(3), np.random.default_rng(3)
    drawn = [sample_windows(lengths, 4, 8, fresh(step)) for step in range(6)]
    # from the first step on, one stream, as the generator seeded alone would draw it
    for episode, start in drawn:
        want_episode, want_start = sample_windows(lengths, 4, 8, plain)
        assert np.array_equal(episode, want_episode) and np.array_equal(start, want_start)
    # a training resumed at step 3 draws neither its first batches again nor the ones it drew there before
    resumed = StepRng(3)
    again = [sample_windows(lengths, 4, 8, resumed(step)) for step in range(3, 6)]
    for episode, start in again:
        assert not any(np.array_equal(start, s) and np.array_equal(episode, e) for e, s in drawn)
    # and the same resume draws the same batches
    twice = StepRng(3)
    for (episode, start), step in zip(again, range(3, 6), strict=True):
        want_episode, want_start = sample_windows(lengths, 4, 8, twice(step))
        assert np.array_equal(episode, want_episode) and np.array_equal(start, want_start)
