"""Offline data sources from PyPI wheels: shapes, label ranges, MNIST-like framing."""

from __future__ import annotations

import torch

from fedtransfer.data import Digits, MNIST5k
from fedtransfer.data.bundled import MNIST_MEAN, MNIST_STD


def test_digits_loads_all_1797_images_as_28x28():
    data = Digits().load()
    assert data.x.shape == (1797, 1, 28, 28) and data.x.dtype == torch.float32
    assert data.y.dtype == torch.int64 and set(data.y.tolist()) == set(range(10))


def test_digits_are_framed_like_mnist():
    data = Digits().load()
    background = -MNIST_MEAN / MNIST_STD
    border = torch.cat([data.x[..., :4, :].flatten(), data.x[..., -4:, :].flatten()])
    assert torch.allclose(border, torch.full_like(border, background))
    assert float(data.x.max()) <= (1 - MNIST_MEAN) / MNIST_STD + 1e-5


def test_mnist5k_loads_5000_labelled_images():
    data = MNIST5k().load()
    assert data.x.shape == (5000, 1, 28, 28)
    assert torch.bincount(data.y).tolist() == [500] * 10
    assert abs(float(data.x.mean())) < 0.2  # normalised with MNIST statistics
