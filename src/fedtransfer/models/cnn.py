"""A small CNN with BatchNorm for 28×28 single-channel images (MNIST, resized digits)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from fedtransfer.seeding import global_cpu_seed


class SmallCNN(nn.Module):
    """Two conv–BN–ReLU–pool blocks, a hidden linear layer and a linear head.

    The head is ``classifier``, the last block, so ``HeadOnly()`` trains only it.

    >>> import torch
    >>> SmallCNN()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self, num_classes: int = 10, *, channels: tuple[int, int] = (16, 32), hidden: int = 64
    ):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 7 * 7, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(self.features(x)))


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """A fresh model from ``factory`` whose weights depend only on ``seed``."""
    with global_cpu_seed(seed):
        return factory()


@dataclass(frozen=True)
class CNN:
    """Model factory for :class:`SmallCNN`, as it appears in configs (``kind: cnn``)."""

    num_classes: int = 10
    channels: tuple[int, int] = (16, 32)
    hidden: int = 64

    def __call__(self) -> nn.Module:
        return SmallCNN(self.num_classes, channels=self.channels, hidden=self.hidden)

    def init(self, seed: int) -> nn.Module:
        """A freshly initialised model whose weights depend only on ``seed``."""
        return seeded(self, seed)


class LeafNet(nn.Module):
    """The CNN of the LEAF benchmark for FEMNIST (Caldas et al. 2018): two 5×5 convolutions
    (32 and 64 channels, "same" padding) each followed by ReLU and 2×2 max-pooling, a hidden
    linear layer (2,048 units in LEAF) and a linear head over 62 classes. No BatchNorm: every
    layer trains and aggregates the same way.

    The head is ``classifier``; ``LastK(k)`` trains the last ``k`` blocks of
    ``features.0`` (conv1), ``features.3`` (conv2), ``embed.1`` and ``classifier``.

    >>> import torch
    >>> LeafNet(62, hidden=128)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 62])
    """

    def __init__(
        self, num_classes: int = 62, *, channels: tuple[int, int] = (32, 64), hidden: int = 2048
    ):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 7 * 7, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(self.features(x)))


@dataclass(frozen=True)
class LeafCNN:
    """Model factory for :class:`LeafNet` (``kind: leaf_cnn``)."""

    num_classes: int = 62
    channels: tuple[int, int] = (32, 64)
    hidden: int = 2048

    def __call__(self) -> nn.Module:
        return LeafNet(self.num_classes, channels=self.channels, hidden=self.hidden)

    def init(self, seed: int) -> nn.Module:
        """A freshly initialised model whose weights depend only on ``seed``."""
        return seeded(self, seed)
