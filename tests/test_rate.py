import lzma
import math

import numpy as np
import pytest

from worldmodel.rate import (
    LZMA_FILTERS,
    bits_per_token,
    entropy_bits,
    lzma_compress,
    pack_tokens,
    token_rate,
    unpack_tokens,
)
from worldmodel.tokenizer import TokenizerConfig


@pytest.mark.parametrize(("codebook", "bits"), [(1, 1), (2, 1), (3, 2), (12, 4), (240, 8), (256, 8), (257, 9)])
def test_bits_per_token(codebook, bits):
    assert bits_per_token(codebook) == bits


@pytest.mark.parametrize("codebook", [2, 12, 240, 1000, 65536])
def test_packing_round_trips(codebook):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, codebook, size=(7, 3, 5))  # 105 tokens: the last byte is padded for most widths
    tokens[0, 0, 0], tokens[-1, -1, -1] = 0, codebook - 1
    packed = pack_tokens(tokens, codebook)
    assert len(packed) == math.ceil(tokens.size * bits_per_token(codebook) / 8)
    np.testing.assert_array_equal(unpack_tokens(packed, tokens.size, codebook), tokens.reshape(-1))


def test_lzma_stream_decodes():
    data = pack_tokens(np.arange(1000) % 240, 240)
    assert lzma.decompress(lzma_compress(data), lzma.FORMAT_RAW, filters=LZMA_FILTERS) == data


def test_tokens_outside_the_codebook_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        pack_tokens(np.array([0, 12]), 12)


def test_constant_tokens_cost_far_less_than_raw():
    rate = token_rate(np.full((256, 8, 8), 17), 240)
    assert rate.entropy_bits_per_token == 0.0 and rate.entropy_bytes_per_frame == 0.0
    assert rate.codes_used == 1
    assert rate.packed_bytes_per_frame == 64  # 8 bits per 240-way token
    assert rate.lzma_bytes_per_frame < 0.02 * rate.raw_bytes_per_frame


def test_uniform_tokens_are_incompressible():
    codebook = 1000
    tokens = np.random.default_rng(0).integers(0, codebook, size=(1024, 8, 8))
    rate = token_rate(tokens, codebook)
    assert rate.entropy_bits_per_token == pytest.approx(math.log2(codebook), abs=0.02)
    assert rate.entropy_bytes_per_frame == pytest.approx(rate.raw_bytes_per_frame, rel=0.01)
    assert rate.packed_bytes_per_frame == 8 * 8 * 10 / 8
    assert rate.lzma_bytes_per_frame > 0.97 * rate.packed_bytes_per_frame


def test_entropy_of_a_known_distribution():
    # three quarters zeros, one quarter ones: H = 0.811 bits
    tokens = np.array([0, 0, 0, 1] * 100)
    assert entropy_bits(tokens, 4) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))


def test_raw_rate_is_the_configs():
    config = TokenizerConfig(image_size=64, widths=(16, 32, 64, 96), levels=(8, 6, 5))
    tokens = np.zeros((3, config.grid_size, config.grid_size), np.int64)
    rate = token_rate(tokens, config.codebook_size)
    assert rate.raw_bytes_per_frame == pytest.approx(config.bytes_per_frame)
    assert rate.tokens_per_frame == config.tokens_per_frame and rate.frames == 3
