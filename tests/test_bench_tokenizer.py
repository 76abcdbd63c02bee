import dataclasses
import json
import math

import pytest
from conftest import BOX_SPACE, write_synthetic_dataset

from bench.tokenizer import TokenizerBenchConfig, bench_tokenizer
from pipeline.cli import main
from worldmodel.config import ConfigError
from worldmodel.tokenizer import TokenizerConfig
from worldmodel.train import TokenizerStage
from worldmodel.trainer import TrainConfig

TINY = ["tokenizer.model.widths=[8, 16, 16]", "tokenizer.train.warmup_steps=1", "tokenizer.val_frames=8"]
FAST = ["--eval-frames", "8", "--batch-sizes", "1,4", "--seconds", "0.01", "--device", "cpu"]
CODEC_FLAGS = ["--webp-qualities", "0,50,100", "--jpeg-qualities", "10,90"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokbench") / "dataset"
    write_synthetic_dataset(root, BOX_SPACE, episodes=4, steps=12, size=16)
    return root


def test_bench_tokenizer_command_writes_table_json_and_plot(data_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    args = [
        *["bench", "tokenizer", "--data", str(data_dir), "--out", str(out), "--backbones", "conv,nosuch"],
        *["--rate", "{levels: [4, 3]}", "--rate", "{levels: [8, 5, 5, 5]}", "--steps", "2", "--batch-size", "4"],
        *["--resolutions", "16,32", *FAST, *CODEC_FLAGS, "run.val_fraction=0.25", *TINY],
    ]
    main(args)
    printed = capsys.readouterr().out
    assert "| conv | levels=4,3 |" in printed and "not in this checkout" in printed
    results = json.loads((out / "tokenizer_bench.json").read_text())
    assert (out / "rate_distortion.png").stat().st_size > 0
    assert (out / "tokenizer_bench.md").read_text().startswith("# Tokenizer bench")
    assert results["budget"]["steps"] == 2 and results["budget"]["batch_size"] == 4
    assert results["frames"] == 8 and results["held_out_episodes"] == [3]
    rows = {(row["backbone"], row["rate"]): row for row in results["tokenizers"]}
    assert set(rows) == {(b, r) for b in ("conv", "nosuch") for r in ("levels=4,3", "levels=8,5,5,5")}
    assert "not in this checkout" in rows["nosuch", "levels=4,3"]["skipped"]
    small, large = rows["conv", "levels=4,3"], rows["conv", "levels=8,5,5,5"]
    for row in (small, large):
        for key in ("bytes_per_frame", "entropy_coded_bytes_per_frame", "lzma_bytes_per_frame", "psnr", "ssim"):
            assert math.isfinite(row[key]), key
        assert row["train_seconds"] > 0 and row["parameters"] > 0
        assert set(row["encode_frames_per_s"]) == set(row["decode_frames_per_s"]) == {"1", "4"}
        assert all(v > 0 for v in row["encode_frames_per_s"].values())
        assert "webp_bytes_at_equal_psnr" in row and "jpeg_bytes_at_equal_psnr" in row
    # a 4x4 grid of 12-way and of 1000-way tokens
    assert small["bytes_per_frame"] == pytest.approx(
        TokenizerConfig(image_size=16, levels=(4, 3), widths=(8, 16, 16)).bytes_per_frame
    )
    assert large["bytes_per_frame"] > small["bytes_per_frame"]
    assert [p["quality"] for p in results["codecs"]["webp"]] == [0, 50, 100]
    timing = {(row["backbone"], row["size"]): row for row in results["resolution_timing"]}
    assert timing["conv", 32]["tokens_per_frame"] == 64 and timing["conv", 16]["encode_ms_per_frame"] > 0
    assert "skipped" in timing["nosuch", 16]

    # a second run loads the trained tokenizers and the codec curves instead of redoing them
    checkpoint = out / "tokenizers" / "conv-levels-4-3" / "tokenizer.safetensors"
    written = checkpoint.stat().st_mtime_ns
    main(args)
    printed = capsys.readouterr()
    assert "loaded" in printed.out + printed.err and "codec curves from" in printed.out + printed.err
    assert checkpoint.stat().st_mtime_ns == written
    again = json.loads((out / "tokenizer_bench.json").read_text())
    assert again["tokenizers"][0]["psnr"] == results["tokenizers"][0]["psnr"]
    assert again["tokenizers"][0]["train_seconds"] == results["tokenizers"][0]["train_seconds"]


def test_bench_tokenizer_refuses_a_tokenizer_of_another_budget(data_dir, tmp_path):
    stage = TokenizerStage(
        TokenizerConfig(widths=(8, 16, 16)), TrainConfig(warmup_steps=1, log_every=1, eval_every=100), val_frames=8
    )
    config = TokenizerBenchConfig(
        backbones=("conv",),
        rates=({"levels": [4, 3]},),
        steps=1,
        batch_size=4,
        val_fraction=0.25,
        eval_frames=4,
        timing_batches=(1,),
        seconds=0.0,
        resolutions=(16,),
        qualities={"webp": (50,), "jpeg": (50,)},
        device="cpu",
    )
    bench_tokenizer(data_dir, tmp_path, stage, config)
    with pytest.raises(ConfigError, match="another batch_size"):
        bench_tokenizer(data_dir, tmp_path, stage, dataclasses.replace(config, batch_size=2))
    with pytest.raises(ConfigError, match="another config"):
        other = TokenizerStage(TokenizerConfig(widths=(8, 8, 16)), stage.train, stage.val_frames)
        bench_tokenizer(data_dir, tmp_path, other, config)


def test_bench_tokenizer_refuses_a_bad_rate(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "tokenizer", "--data", str(data_dir), "--out", str(tmp_path), "--rate", "[8, 6, 5]"])
    assert exit_info.value.code == 2 and "YAML mapping" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "tokenizer", "--data", str(data_dir), "--out", str(tmp_path), "--rate", "{levelz: [8]}"])
    assert exit_info.value.code == 2 and "levelz" in capsys.readouterr().err
    # a rate no tokenizer can have, and a bench whose every backbone is missing, are refused before any work
    for args, said in (
        (["--rate", "{levels: [1]}"], "tokenizer rate levels=1 with backbone 'conv': "),
        (["--backbones", "nosuch,other"], "no backbone asked for is in this checkout (['nosuch', 'other']"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "tokenizer", "--data", str(data_dir), "--out", str(tmp_path / "b"), *args, *TINY])
        assert exit_info.value.code == 2 and said in capsys.readouterr().err
        assert not (tmp_path / "b").exists()
