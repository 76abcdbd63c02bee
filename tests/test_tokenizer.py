import math

import pytest
import torch

from worldmodel.tokenizer import Tokenizer, TokenizerConfig, psnr, ssim


@pytest.mark.parametrize(
    ("size", "channels", "widths"),
    [(32, 3, (8, 16, 16)), (32, 1, (8, 8, 16, 16)), (64, 3, (8, 16, 16, 16)), (64, 1, (8, 16))],
)
def test_encode_decode_shapes(size, channels, widths):
    torch.manual_seed(0)
    config = TokenizerConfig(image_size=size, channels=channels, widths=widths, levels=(4, 3))
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
    with pytest.raises(ValueError, match="divisible"):
        Tokenizer(TokenizerConfig(image_size=36, widths=(8, 16, 16, 16)))


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


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    tokenizer = Tokenizer(TokenizerConfig(image_size=16, channels=3, widths=(8, 16), levels=(4, 3)))
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
