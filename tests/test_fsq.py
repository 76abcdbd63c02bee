import itertools
import math

import pytest
import torch

from worldmodel.fsq import FSQ

LEVELS = [(8, 6, 5), (4, 3), (2, 2, 2), (7,), (5, 5, 4, 3)]


def all_codes(fsq: FSQ) -> torch.Tensor:
    """Every code vector of the grid, built independently of the class: level L has L evenly spaced values."""
    axes = []
    for level in fsq.levels:
        half = level // 2
        axes.append([(d - half) / half for d in range(level)])
    return torch.tensor(list(itertools.product(*axes)), dtype=torch.float32)


@pytest.mark.parametrize("levels", LEVELS)
def test_codes_indices_round_trip_over_all_codes(levels):
    fsq = FSQ(levels)
    codes = all_codes(fsq)
    assert len(codes) == fsq.codebook_size == math.prod(levels)
    indices = fsq.codes_to_indices(codes)
    assert indices.dtype == torch.int64
    # a bijection between the grid and [0, prod(levels))
    assert sorted(indices.tolist()) == list(range(fsq.codebook_size))
    torch.testing.assert_close(fsq.indices_to_codes(indices), codes)


@pytest.mark.parametrize("levels", LEVELS)
def test_indices_codes_round_trip(levels):
    fsq = FSQ(levels)
    indices = torch.arange(fsq.codebook_size).view(-1, 1)  # extra leading dims work
    codes = fsq.indices_to_codes(indices)
    assert codes.shape == (fsq.codebook_size, 1, len(levels))
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(fsq.codes_to_indices(codes), indices)


@pytest.mark.parametrize("levels", LEVELS)
def test_forward_indices_in_range_and_consistent(levels):
    torch.manual_seed(0)
    fsq = FSQ(levels)
    z = torch.randn(4, 5, 7, len(levels)) * 4  # large values reach the extreme levels
    codes, indices = fsq(z)
    assert codes.shape == z.shape and indices.shape == z.shape[:-1]
    assert indices.min() >= 0 and indices.max() < fsq.codebook_size
    assert codes.min() >= -1 and codes.max() <= 1
    # each channel takes exactly its number of levels over enough samples
    big_codes, big_indices = fsq(torch.randn(20000, len(levels)) * 3)
    for channel, level in enumerate(levels):
        assert big_codes[:, channel].unique().numel() == level
    assert torch.equal(fsq.indices_to_codes(indices), codes)
    assert torch.equal(fsq.codes_to_indices(codes), indices)


def test_straight_through_gradient_is_nonzero():
    torch.manual_seed(0)
    fsq = FSQ((8, 6, 5))
    z = (torch.randn(16, 3) * 0.5).requires_grad_()
    codes, _ = fsq(z)
    (codes * torch.randn_like(codes)).sum().backward()
    assert z.grad is not None
    assert torch.isfinite(z.grad).all()
    assert (z.grad.abs() > 0).float().mean() > 0.9


def test_properties_and_validation():
    fsq = FSQ([8, 6, 5])
    assert fsq.dim == 3 and fsq.codebook_size == 240
    assert fsq.bits_per_token == pytest.approx(math.log2(240))
    for bad in ([], [1, 4], [4, 0]):
        with pytest.raises(ValueError):
            FSQ(bad)
