import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.checkpoint import load_module, save_checkpoint
from worldmodel.config import ConfigError, from_dict, load_preset
from worldmodel.tokenizer import (
    BACKBONES,
    Tokenizer,
    TokenizerConfig,
    box_mean,
    box_mean_reference,
    frames_to_float,
    psnr,
    ssim,
)

# transformer blocks small enough that every backbone runs in milliseconds
TINY_ATTENTION = {"attention_width": 16, "attention_layers": 1, "attention_heads": 2}


def tiny_config(backbone: str = "conv", **kwargs) -> TokenizerConfig:
    return TokenizerConfig(backbone=backbone, **{**TINY_ATTENTION, **kwargs})


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize(
    ("size", "channels", "widths"),
    [
        (32, 3, (8, 16, 16)),
        (32, 1, (8, 8, 16, 16)),
        (64, 3, (8, 16, 16, 16)),
        (64, 1, (8, 16)),
        (128, 3, (8, 8, 16, 16)),
    ],
)
def test_encode_decode_shapes(backbone, size, channels, widths):
    torch.manual_seed(0)
    config = tiny_config(backbone, image_size=size, channels=channels, widths=widths, levels=(4, 3))
    tokenizer = Tokenizer(config).eval()
    grid = size // 2 ** (len(widths) - 1)
    assert config.grid_size == grid and config.tokens_per_frame == grid * grid
    frames = torch.randint(0, 256, (2, size, size, channels), dtype=torch.uint8)
    with torch.no_grad():
        out = tokenizer.encode(frames)
    assert out.tokens.shape == (2, grid, grid) and out.tokens.dtype == torch.int64
    assert out.z.shape == out.z_quantized.shape == (2, 2, grid, grid)
    assert out.tokens.min() >= 0 and out.tokens.max() < config.codebook_size
    images = tokenizer.decode(out.tokens)
    assert images.shape == (2, channels, size, size)
    assert images.min() >= 0 and images.max() <= 1
    back = tokenizer.tokens_to_frames(out.tokens)
    assert back.shape == (2, size, size, channels) and back.dtype == torch.uint8
    # decoding tokens equals decoding the quantized codes of the encoder
    with torch.no_grad():
        torch.testing.assert_close(tokenizer.decode_codes(out.z_quantized).clamp(0, 1), images)


@pytest.mark.parametrize(
    ("size", "widths", "levels"),
    [(64, (16, 32, 64, 96), (8, 6, 5)), (32, (8, 16, 16), (4, 3)), (64, (8, 16), (2,))],
)
def test_bytes_per_frame(size, widths, levels):
    config = TokenizerConfig(image_size=size, widths=widths, levels=levels)
    tokens = (size // 2 ** (len(widths) - 1)) ** 2
    assert config.codebook_size == math.prod(levels)
    assert config.bytes_per_frame == pytest.approx(tokens * math.log2(math.prod(levels)) / 8)


def test_bytes_per_frame_of_tiny_preset():
    # 8x8 grid of 240-way tokens: 64 * log2(240) / 8 bytes
    config = TokenizerConfig(image_size=64, widths=(16, 32, 64, 96), levels=(8, 6, 5))
    assert config.bytes_per_frame == pytest.approx(63.255, abs=0.001)


def test_image_size_must_divide():
    with pytest.raises(ValueError, match="multiples of 2\\*\\*3 = 8"):
        Tokenizer(TokenizerConfig(image_size=36, widths=(8, 16, 16, 16)))
    with pytest.raises(ValueError, match="image_width 100"):
        Tokenizer(TokenizerConfig(image_size=64, image_width=100, widths=(8, 16, 16, 16)))
    with pytest.raises(ValueError, match="image_width 0"):
        Tokenizer(TokenizerConfig(image_size=64, image_width=0, widths=(8, 16, 16, 16)))
    with pytest.raises(ValueError, match="vit_stem 'convolution'"):
        Tokenizer(TokenizerConfig(backbone="vit", vit_stem="convolution"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "frames",
    [
        torch.zeros(2, 32, 32, 3, dtype=torch.float32),  # wrong dtype
        torch.zeros(2, 32, 32, 3, dtype=torch.int64),
        torch.zeros(2, 3, 32, 32, dtype=torch.uint8),  # channels first
        torch.zeros(32, 32, 3, dtype=torch.uint8),  # no batch
        torch.zeros(2, 16, 16, 3, dtype=torch.uint8),  # wrong size
        torch.zeros(2, 32, 32, 1, dtype=torch.uint8),  # wrong channels
    ],
)
def test_wrong_input_raises(frames):
    tokenizer = Tokenizer(TokenizerConfig(image_size=32, channels=3, widths=(8, 16, 16), levels=(4, 3)))
    with pytest.raises(ValueError, match="uint8"):
        tokenizer.encode(frames)
    with pytest.raises(ValueError):
        tokenizer(frames)


def test_numpy_frames_and_tokens_give_what_tensors_give():
    tokenizer = Tokenizer(TokenizerConfig(image_size=32, channels=3, widths=(8, 16, 16), levels=(4, 3))).eval()
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    tokens = tokenizer.encode(frames).tokens
    assert torch.equal(tokens, tokenizer.encode(torch.as_tensor(frames)).tokens)
    frames = tokenizer.tokens_to_frames(tokens)
    assert torch.equal(tokenizer.tokens_to_frames(tokens.numpy()), frames)
    # any integer type: torch has no min/max of uint16, which the check would have needed
    assert torch.equal(tokenizer.tokens_to_frames(tokens.numpy().astype(np.uint16)), frames)
    assert torch.equal(tokenizer.tokens_to_frames(tokens.to(torch.uint16)), frames)
    assert torch.equal(tokenizer.tokens_to_frames(tokens.to(torch.int16)), frames)
    read_only_reversed = tokens.numpy()[:, ::-1, :].copy()[:, ::-1, :]  # a reversed view, read-only
    read_only_reversed.flags.writeable = False
    assert torch.equal(tokenizer.tokens_to_frames(read_only_reversed), frames)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (torch.full((2, 8, 8), 12), "got values from 12 to 12"),  # the codebook has 4 x 3 codes: 0..11
        (torch.full((2, 8, 8), -1), "got values from -1 to -1"),
        (torch.zeros(2, 8, 8, dtype=torch.float32), "got torch.float32"),
        (torch.zeros(2, 8, 8, dtype=torch.bool), "got torch.bool"),
        (torch.zeros(8, 8, dtype=torch.long), r"got shape \(8, 8\)"),
        (np.zeros((2, 4, 4), dtype=np.int64), r"got shape \(2, 4, 4\)"),
    ],
)
def test_tokens_that_name_no_code_are_refused_before_decoding(tokens, message):
    """FSQ's index arithmetic wraps around: without the check, token 12 decoded as token 0, a float as its integer
    part."""
    tokenizer = Tokenizer(TokenizerConfig(image_size=32, channels=3, widths=(8, 16, 16), levels=(4, 3)))
    with pytest.raises(ValueError, match=r"expected \(B, 8, 8\) integer tokens in \[0, 12\), " + message):
        tokenizer.tokens_to_frames(tokens)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_a_few_steps_reduce_the_loss(backbone):
    torch.manual_seed(0)
    config = tiny_config(backbone, image_size=16, channels=3, widths=(8, 16), levels=(4, 3), attention_width=32)
    tokenizer = Tokenizer(config)
    frames = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    frames[:, 4:10, 4:10] = 255
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    first, logs = tokenizer.forward_batch({"frames": frames})
    assert set(logs) >= {"loss", "l1", "ssim", "psnr", "z_absmax", "codes_used"}
    assert logs["loss"] == pytest.approx(first.item())
    for _ in range(30):
        loss, _ = tokenizer(frames)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last, _ = tokenizer(frames)
    assert last.item() < 0.8 * first.item()


def test_psnr_and_ssim():
    x = torch.rand(2, 3, 16, 16)
    assert psnr(x, x).item() == pytest.approx(100.0)  # the 1e-10 MSE floor
    noisy = (x + 0.1).clamp(0, 1)
    assert 10 < psnr(x, noisy).item() < 40
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-4)
    assert ssim(x, torch.rand(2, 3, 16, 16)).item() < 0.5
    # per-image PSNR averaged over the batch
    y = x.clone()
    y[1] = (x[1] + 0.1).clamp(0, 1)
    expected = (psnr(x[:1], y[:1]) + psnr(x[1:], y[1:])) / 2
    assert psnr(x, y).item() == pytest.approx(expected.item())


def test_bottom_rows_weight_the_gauge_strip():
    torch.manual_seed(0)
    plain = Tokenizer(TokenizerConfig(image_size=16, channels=3, widths=(8, 16), levels=(4, 3)))
    weighted = Tokenizer(
        TokenizerConfig(image_size=16, channels=3, widths=(8, 16), levels=(4, 3), bottom_rows=0.25, bottom_weight=5.0)
    )
    weighted.load_state_dict(plain.state_dict())
    frames = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    _, plain_logs = plain(frames)
    loss, logs = weighted(frames)
    assert logs["l1"] == pytest.approx(plain_logs["l1"])  # the logged error is the plain one
    # the 4 bottom rows count 5 times: the loss grows by 4 x their share of the mean error
    recon = plain.decode_codes(plain.encode(frames).z_quantized)
    error = (recon - frames.permute(0, 3, 1, 2).float() / 255).abs()
    extra = 4 * error[..., -4:, :].sum() / error.numel()
    plain_loss, _ = plain(frames)
    assert loss.item() == pytest.approx(plain_loss.item() + extra.item(), rel=1e-4)


def test_rare_pixels_weigh_rare_weight_times_the_others():
    # three grey road frames, one with a dark car: only the car's pixels differ from the batch's per-pixel median
    torch.manual_seed(0)
    base = {"image_size": 16, "channels": 1, "widths": (8, 16), "levels": (4, 3), "l1_weight": 0.0, "mse_weight": 1.0}
    plain = Tokenizer(TokenizerConfig(**base, ssim_weight=0.0))
    rare = Tokenizer(TokenizerConfig(**base, ssim_weight=0.0, rare_weight=10.0, rare_threshold=0.1))
    rare.load_state_dict(plain.state_dict())
    frames = torch.full((3, 16, 16, 1), 99, dtype=torch.uint8)
    frames[:, :, 3] = 254  # a lane line in every frame: not rare
    frames[1, 5:12, 8:11] = 59  # the car: 21 pixels
    weights = rare.pixel_weights(frames.permute(0, 3, 1, 2).float() / 255)
    assert weights.shape == (3, 1, 16, 16) and weights[1, 0, 5:12, 8:11].eq(10).all() and weights.sum() == 768 + 9 * 21
    error = plain.decode_codes(plain.encode(frames).z_quantized) - frames.permute(0, 3, 1, 2).float() / 255
    extra = 9 * error[1, :, 5:12, 8:11].square().sum() / error.numel()
    assert rare(frames)[0].item() == pytest.approx(plain(frames)[0].item() + extra.item(), rel=1e-4)
    assert plain.pixel_weights(frames.float()) is None  # weight 1: the plain mean, no weight map
    # and it multiplies with the gauge strip's weight
    both = Tokenizer(TokenizerConfig(**base, rare_weight=10.0, bottom_rows=0.5, bottom_weight=2.0))
    weights = both.pixel_weights(frames.permute(0, 3, 1, 2).float() / 255)
    assert weights[1, 0, 10, 9] == 20 and weights[1, 0, 6, 9] == 10 and weights[0, 0, 10, 9] == 2
    with pytest.raises(ValueError, match="rare_threshold"):
        TokenizerConfig(**base, rare_threshold=1.5).validate()


@pytest.mark.parametrize(
    ("shape", "window"), [((2, 3, 64, 64), 7), ((1, 1, 5, 9), 7), ((2, 2, 3, 3), 3), ((1, 3, 12, 40), 5)]
)
def test_box_mean_is_the_padded_average_pool_forward_and_backward(shape, window):
    # the fast path (cumulative sums) against the plain one (avg_pool2d without the padding in the count), windows
    # wider than the image included
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    fast, plain = box_mean(x, window), box_mean_reference(x, window)
    torch.testing.assert_close(fast, plain)
    weights = torch.rand(shape, dtype=torch.float64)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), x)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), x)
    torch.testing.assert_close(grad_fast, grad_plain)


def test_squared_error_term_is_weighted_like_the_l1_term():
    torch.manual_seed(0)
    base = {"image_size": 16, "channels": 3, "widths": (8, 16), "levels": (4, 3), "bottom_rows": 0.25}
    l1_only = Tokenizer(TokenizerConfig(**base, bottom_weight=5.0))
    both = Tokenizer(TokenizerConfig(**base, bottom_weight=5.0, l1_weight=0.5, mse_weight=20.0))
    both.load_state_dict(l1_only.state_dict())
    frames = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    error = l1_only.decode_codes(l1_only.encode(frames).z_quantized) - frames.permute(0, 3, 1, 2).float() / 255
    weights = torch.ones(16, 1)
    weights[-4:] = 5.0  # the 4 bottom rows count 5 times in both terms
    l1, mse = (error.abs() * weights).mean(), (error.square() * weights).mean()
    loss_l1, logs = l1_only(frames)
    loss_both, logs_both = both(frames)
    assert logs_both["l1"] == pytest.approx(logs["l1"])  # the logged error is the plain one
    assert loss_both.item() - loss_l1.item() == pytest.approx((-0.5 * l1 + 20 * mse).item(), rel=1e-4)


@pytest.mark.parametrize(
    ("size", "widths", "levels"), [(64, (16, 32, 64, 96), (8, 6, 5)), (32, (8, 16), (4, 3)), (128, (8, 8, 16), (5,))]
)
def test_every_backbone_gives_the_same_token_grid(size, widths, levels):
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    configs = {name: tiny_config(name, image_size=size, widths=widths, levels=levels) for name in BACKBONES}
    assert len({c.tokens_per_frame for c in configs.values()}) == 1
    assert len({c.bytes_per_frame for c in configs.values()}) == 1
    grid = configs["conv"].grid_size
    for config in configs.values():
        assert config.patch_size * grid == size
        tokenizer = Tokenizer(config).eval()
        with torch.no_grad():
            out = tokenizer.encode(frames)
        assert out.tokens.shape == (2, grid, grid) and out.z.shape == (2, len(levels), grid, grid)
        assert out.tokens.max() < config.codebook_size
        assert tokenizer.tokens_to_frames(out.tokens).shape == frames.shape


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_trains_at_the_road_camera_size(backbone):
    # 128x256 frames, five stages: an 8x16 grid of 1,000-code tokens, 160 bytes a frame (commaVQ's budget)
    torch.manual_seed(0)
    config = tiny_config(backbone, image_size=128, image_width=256, widths=(8, 8, 16, 16, 16), levels=(8, 5, 5, 5))
    assert config.image_shape == (128, 256) and config.grid_shape == (8, 16) and config.tokens_per_frame == 128
    assert config.bytes_per_frame == pytest.approx(128 * math.log2(1000) / 8)
    with pytest.raises(ValueError, match="not square"):
        config.grid_size  # noqa: B018  (the dynamics model's square grid does not exist here)
    tokenizer = Tokenizer(config)
    frames = torch.randint(0, 256, (4, 128, 256, 3), dtype=torch.uint8)
    frames[:, 64:] = 40  # a frame half flat, half noise: something to learn in a few steps
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss, _ = tokenizer(frames)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    with torch.no_grad():
        out = tokenizer.encode(frames)
    assert out.tokens.shape == (4, 8, 16)
    assert tokenizer.tokens_to_frames(out.tokens).shape == frames.shape
    with pytest.raises(ValueError, match=r"\(B, 128, 256, 3\)"):
        tokenizer.encode(frames.transpose(1, 2).contiguous())  # 256x128: the other way round


@pytest.mark.parametrize(
    ("size", "width", "widths"), [(32, None, (8, 16, 16)), (128, 256, (8, 8, 16, 16, 16)), (8, None, (8,))]
)
def test_vit_with_a_convolutional_stem(size, width, widths):
    torch.manual_seed(0)
    config = tiny_config("vit", image_size=size, image_width=width, widths=widths, levels=(4, 3), vit_stem="conv")
    tokenizer = Tokenizer(config)
    strided = [m for m in tokenizer.encoder.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == len(widths) - 1  # one 3x3 stride-2 convolution per halving, then the transformer
    assert not any(isinstance(m, nn.Conv2d) for m in tokenizer.decoder.modules())  # the ViT's linear decoder
    frames = torch.randint(0, 256, (2, size, width or size, 3), dtype=torch.uint8)
    loss, _ = tokenizer(frames)
    loss.backward()
    assert all(p.grad is not None for p in tokenizer.encoder.stem.parameters())
    with torch.no_grad():
        tokens = tokenizer.encode(frames).tokens
    assert tokens.shape == (2, *config.grid_shape)


def test_vit_projects_patches_linearly_with_no_convolution():
    tokenizer = Tokenizer(tiny_config("vit", image_size=32, widths=(8, 16, 16), levels=(4, 3)))
    assert not any(isinstance(m, nn.Conv2d) for m in tokenizer.modules())
    assert tokenizer.encoder.transformer.embed.in_features == 3 * 4 * 4  # one 4x4 RGB patch per token
    assert tokenizer.decoder.transformer.head.out_features == 3 * 4 * 4
    # the hybrid shares the conv backbone's stages and the vit's transformer
    hybrid = Tokenizer(tiny_config("hybrid", image_size=32, widths=(8, 16, 16), levels=(4, 3)))
    conv = Tokenizer(tiny_config("conv", image_size=32, widths=(8, 16, 16), levels=(4, 3)))
    stem = [k for k in hybrid.encoder.state_dict() if k.startswith("stem.")]
    assert {k.removeprefix("stem.") for k in stem} <= {k.removeprefix("net.") for k in conv.encoder.state_dict()}
    assert type(hybrid.encoder.transformer) is type(tokenizer.encoder.transformer)


@pytest.mark.parametrize(
    ("backbone", "adversarial_weight"), [("vit", 0.0), ("hybrid", 0.0), ("conv", 0.0), ("vit", 0.1)]
)
def test_checkpoint_restores_the_backbone(tmp_path, backbone, adversarial_weight):
    torch.manual_seed(0)
    config = tiny_config(
        backbone, image_size=32, widths=(8, 16, 16), levels=(4, 3), adversarial_weight=adversarial_weight
    )
    tokenizer = Tokenizer(config)
    frames = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    tokenizer(frames)  # one training forward: advances the adversarial schedule when there is one
    tokenizer.eval()
    save_checkpoint(tmp_path / "tokenizer", tokenizer, "tokenizer", {"step": 1})
    restored, meta, _ = load_module(tmp_path / "tokenizer", "tokenizer", Tokenizer, TokenizerConfig)
    restored.eval()
    assert meta["config"]["backbone"] == backbone and restored.config == config
    assert type(restored.encoder) is type(tokenizer.encoder) and type(restored.decoder) is type(tokenizer.decoder)
    with torch.no_grad():
        tokens = tokenizer.encode(frames).tokens
        assert torch.equal(restored.encode(frames).tokens, tokens)
        assert torch.equal(restored.tokens_to_frames(tokens), tokenizer.tokens_to_frames(tokens))
    if adversarial_weight:
        assert int(restored.adversarial_step) == 1
        for name, weight in tokenizer.discriminator.state_dict().items():
            assert torch.equal(restored.discriminator.state_dict()[name], weight)


@pytest.mark.parametrize("backbone", ["conv", "vit", "hybrid"])
def test_a_run_of_each_backbone_dreams_in_the_env(tmp_path, backbone):
    """Tokenizer checkpoint, dynamics trained on its tokens, and the dream env reading both from the run
    folder: every backbone plugs in unchanged."""
    import dataclasses

    import gymnasium as gym
    import numpy as np
    from conftest import BOX_SPACE, TINY_TOKENIZER, build_run

    from envs.dream import DreamVectorEnv
    from worldmodel.checkpoint import read_checkpoint

    config = dataclasses.replace(TINY_TOKENIZER, backbone=backbone, attention_width=16, attention_heads=2)
    _, run_dir = build_run(tmp_path, BOX_SPACE, tokenizer=config)
    assert read_checkpoint(run_dir / "tokenizer", "tokenizer")[0]["config"]["backbone"] == backbone
    env = DreamVectorEnv(run_dir, 2, obs_mode="pixels", burn_in=2, horizon=3)
    obs, _ = env.reset(seed=0)
    for _ in range(4):
        obs, reward, *_ = env.step(env.action_space.sample())
    assert obs.shape == (2, 16, 16, 3) and obs.dtype == np.uint8 and np.isfinite(reward).all()
    assert isinstance(env.single_observation_space, gym.spaces.Box)


def test_unknown_backbone_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'mlp'.*\['conv', 'hybrid', 'vit'\]"):
        Tokenizer(TokenizerConfig(backbone="mlp"))
    with pytest.raises(ConfigError, match="backbone.*'conv', 'vit', 'hybrid'"):
        from_dict(TokenizerConfig, {"backbone": "mlp"})


@pytest.mark.parametrize(
    "bad",
    [
        {"backbone": "vit", "attention_width": 30, "attention_heads": 3},  # not a multiple of 4
        {"backbone": "hybrid", "attention_width": 32, "attention_heads": 3},  # not a multiple of the heads
        {"backbone": "vit", "attention_layers": 0},
        {"adversarial_weight": -1.0},
        {"mse_weight": -1.0},
        {"l1_weight": 0.0},  # no pixel loss at all
        {"adversarial_weight": 0.1, "discriminator_widths": (12, 24)},
    ],
)
def test_bad_settings_raise(bad):
    with pytest.raises(ValueError):
        Tokenizer(TokenizerConfig(image_size=32, widths=(8, 16), levels=(4, 3), **bad))


def test_preset_overrides_reach_the_new_fields():
    overrides = [
        "tokenizer.model.backbone=hybrid",
        "tokenizer.model.attention_width=32",
        "tokenizer.model.attention_layers=1",
        "tokenizer.model.attention_heads=2",
        "tokenizer.model.adversarial_weight=1",  # an int for a float field
        "tokenizer.model.adversarial_start=200",
        "tokenizer.model.discriminator_widths=[16, 32]",
    ]
    raw = load_preset("tiny", overrides)["tokenizer"]["model"]
    config = from_dict(TokenizerConfig, raw)
    assert config.backbone == "hybrid" and (config.attention_width, config.attention_layers) == (32, 1)
    assert config.adversarial_weight == 1.0 and isinstance(config.adversarial_weight, float)
    assert config.adversarial_start == 200 and config.discriminator_widths == (16, 32)
    plain = from_dict(TokenizerConfig, load_preset("tiny")["tokenizer"]["model"])
    assert plain.backbone == "conv" and plain.adversarial_weight == 0.0
    assert config.tokens_per_frame == plain.tokens_per_frame == 64
    assert from_dict(TokenizerConfig, dataclasses.asdict(config)) == config


def test_adversarial_term_is_off_by_default():
    tokenizer = Tokenizer(TokenizerConfig(image_size=16, widths=(8, 16), levels=(4, 3)))
    assert tokenizer.discriminator is None
    assert not any(k.startswith(("discriminator", "adversarial")) for k in tokenizer.state_dict())
    _, logs = tokenizer(torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8))
    assert "discriminator" not in logs


def test_adversarial_gradients_reach_each_player_only():
    config = TokenizerConfig(
        image_size=16,
        widths=(8, 16),
        levels=(4, 3),
        adversarial_weight=0.5,
        adversarial_start=1,
        discriminator_widths=(8, 16),
    )
    torch.manual_seed(0)
    tokenizer = Tokenizer(config)
    torch.manual_seed(0)
    plain = Tokenizer(dataclasses.replace(config, adversarial_weight=0.0))  # the same encoder and decoder
    frames = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)

    def generator_grads(model: Tokenizer) -> list[torch.Tensor]:
        return [p.grad.clone() for p in [*model.encoder.parameters(), *model.decoder.parameters()]]

    # step 0, before adversarial_start: the encoder and decoder get exactly the plain gradients
    loss, logs = tokenizer.forward_batch({"frames": frames})
    assert torch.isfinite(loss) and {"adversarial", "discriminator", "discriminator_accuracy"} <= set(logs)
    loss.backward()
    plain(frames)[0].backward()
    for ours, theirs in zip(generator_grads(tokenizer), generator_grads(plain), strict=True):
        torch.testing.assert_close(ours, theirs)
    grads = [p.grad for p in tokenizer.discriminator.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert int(tokenizer.adversarial_step) == 1

    # step 1: the generator term reaches the decoder, but the discriminator still gets only its hinge gradient
    tokenizer.zero_grad()
    loss, _ = tokenizer(frames)
    loss.backward()
    assert torch.isfinite(loss)
    ours = generator_grads(tokenizer)
    assert not all(torch.allclose(a, b) for a, b in zip(ours, generator_grads(plain), strict=True))
    discriminator_grads = [p.grad.clone() for p in tokenizer.discriminator.parameters()]
    tokenizer.zero_grad()
    with torch.no_grad():
        recon = tokenizer.decode_codes(tokenizer.encode(frames).z_quantized)
    real, fake = tokenizer.discriminator(torch.cat([frames_to_float(frames), recon])).chunk(2)
    (F.relu(1 - real).mean() + F.relu(1 + fake).mean()).backward()
    for combined, alone in zip(discriminator_grads, tokenizer.discriminator.parameters(), strict=True):
        torch.testing.assert_close(combined, alone.grad)

    # evaluation forwards do not advance the schedule
    tokenizer.eval()
    with torch.no_grad():
        tokenizer(frames)
    assert int(tokenizer.adversarial_step) == 2


# --- the decoder's upsampling convolution: four 2x2 phase convolutions instead of upsample-then-3x3 ----------


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsampled_conv_equals_upsampling_then_convolving(channels_last):
    from worldmodel.tokenizer import UpsampledConv

    torch.manual_seed(0)
    conv = UpsampledConv(6, 5)
    x = torch.randn(3, 6, 4, 7, requires_grad=True)  # not square: rows and columns are not mixed up
    given = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    fast, plain = conv(given), conv.plain_forward(given)
    assert fast.shape == (3, 5, 8, 14)
    assert fast.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    # the same gradients for the 3x3 kernel, the bias and the input: training learns the same weights
    fast_grads = torch.autograd.grad(fast.square().sum(), [conv.weight, conv.bias, x])
    plain_grads = torch.autograd.grad(plain.square().sum(), [conv.weight, conv.bias, x])
    for got, want in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_upsampled_conv_derives_its_kernels_again_after_the_weights_change():
    from worldmodel.tokenizer import UpsampledConv

    conv = UpsampledConv(4, 3).eval()
    x = torch.randn(2, 4, 5, 5)
    conv(x)  # inference caches the phase kernels
    conv.weight.mul_(2.0)  # as an optimizer step or a loaded checkpoint changes them
    torch.testing.assert_close(conv(x), conv.plain_forward(x), atol=1e-5, rtol=0)
    conv.bias.add_(1.0)  # the bias alone, too
    torch.testing.assert_close(conv(x), conv.plain_forward(x), atol=1e-5, rtol=0)
    # a fused optimizer writes the weights without bumping their version: switching modes forgets the kernels
    conv(x)
    with torch.enable_grad():
        conv.train()
        conv.weight.grad = torch.ones_like(conv.weight)
        torch.optim.AdamW(conv.parameters(), lr=0.1, fused=True).step()
    conv.eval()
    torch.testing.assert_close(conv(x), conv.plain_forward(x), atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), conv.plain_forward(x), atol=0.05, rtol=0.02)
    torch.testing.assert_close(conv(x), conv.plain_forward(x), atol=1e-5, rtol=0)  # and back to float32


@torch.no_grad()
def test_decoder_keeps_the_checkpoints_of_upsample_then_conv():
    """Checkpoints written when the decoder was nn.Upsample followed by nn.Conv2d load unchanged and decode the
    same images."""
    from worldmodel.tokenizer import UpsampledConv

    torch.manual_seed(0)
    decoder = Tokenizer(TokenizerConfig(image_size=32, widths=(8, 16, 16), levels=(4, 4))).decoder
    old_layers = []
    for layer in decoder.net:
        if isinstance(layer, nn.Identity):
            layer = nn.Upsample(scale_factor=2, mode="nearest")
        elif isinstance(layer, UpsampledConv):
            layer = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1)
        old_layers.append(layer)
    old = nn.Sequential(*old_layers)
    assert sum(isinstance(layer, nn.Upsample) for layer in old) == 2
    old.load_state_dict(decoder.net.state_dict())  # strict: the same keys and shapes
    codes = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(decoder.net(codes), old(codes), atol=1e-5, rtol=0)


# --- GroupNorm's inference path for small channels-last maps, and the in-place SiLU after it -------------------


@pytest.mark.parametrize(("size", "dtype"), [(8, torch.float32), (16, torch.bfloat16), (32, torch.float32)])
def test_group_norm_inference_path_is_the_same_function_in_the_same_layout(size, dtype):
    from worldmodel.tokenizer import GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(8, 64).to(dtype)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(4, 64, size, size + 1, dtype=dtype).contiguous(memory_format=torch.channels_last)
    want = F.group_norm(x.float(), 8, norm.weight.float(), norm.bias.float())
    with torch.no_grad():
        got = norm(x)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)


def test_group_norm_goes_channels_first_only_for_small_channels_last_maps_in_inference():
    from worldmodel.tokenizer import normalise_channels_first

    small = torch.randn(2, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert normalise_channels_first(small)
        assert not normalise_channels_first(small.contiguous())  # already channels-first
        assert not normalise_channels_first(torch.randn(2, 16, 32, 32).contiguous(memory_format=torch.channels_last))
    assert not normalise_channels_first(small)  # training (gradients recorded) keeps the plain path


def test_tokenizer_in_place_silu_trains_like_the_plain_one():
    # nn.SiLU(inplace=True) overwrites the GroupNorm's output; autograd must still give the plain gradients
    torch.manual_seed(0)
    config = TokenizerConfig(image_size=16, widths=(8, 16), levels=(5, 3), channels=3)
    tokenizer = Tokenizer(config)
    frames = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    loss, _ = tokenizer(frames)
    grads = torch.autograd.grad(loss, list(tokenizer.parameters()), allow_unused=True)
    silus = [module for module in tokenizer.modules() if isinstance(module, nn.SiLU)]
    assert silus and all(module.inplace for module in silus)
    for module in silus:
        module.inplace = False
    plain_loss, _ = tokenizer(frames)
    plain = torch.autograd.grad(plain_loss, list(tokenizer.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, plain_loss)
    for got, want in zip(grads, plain, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)
