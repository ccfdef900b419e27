"""``TensorData`` (one pre-collated dataset) and ``FederatedDataset`` (client id → train/test)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class TensorData:
    """Inputs and integer labels as tensors, collated once (no per-round DataLoader)."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"TensorData: {self.x.shape[0]} inputs but {self.y.shape[0]} labels; expected equal"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: Sequence[int] | np.ndarray | Tensor) -> TensorData:
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return TensorData(self.x[idx], self.y[idx])

    @staticmethod
    def concat(parts: Sequence[TensorData]) -> TensorData:
        return TensorData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def check_labels(y: Tensor, num_classes: int, *, where: str) -> None:
    """Raise :class:`~fedtransfer.errors.FedTransferError` unless integer class labels ``y``
    lie in ``[0, num_classes)``, naming ``where`` and the first label seen out of range (one
    would end a client's training with an IndexError). Other targets (soft labels for a
    custom loss: floating or several per example) are the loss's to check."""
    from fedtransfer.errors import FedTransferError

    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1 or not y.numel():
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise FedTransferError(
            f"{where}: label {bad} is outside [0, {num_classes}) (num_classes = {num_classes}); "
            "hint: check the source's labels, or the number of classes the model and data "
            "are given"
        )


@dataclass(frozen=True, eq=False)
class FederatedDataset:
    """The population: each client's private train and test data, by client id."""

    train: Mapping[str, TensorData]
    test: Mapping[str, TensorData]
    num_classes: int

    def __post_init__(self) -> None:
        if list(self.train) != list(self.test):
            raise ValueError(
                "FederatedDataset: train and test must have the same client ids in order"
            )
        for split, parts in (("train", self.train), ("test", self.test)):
            if isinstance(parts, dict):  # a lazy population is checked as each client is read
                for client, data in parts.items():
                    check_labels(data.y, self.num_classes, where=f"client {client!r} ({split})")

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(self.train)

    def pooled_test(self) -> TensorData:
        """All clients' test data together: the global test set."""
        return TensorData.concat([self.test[c] for c in self.clients])

    def pooled_train(self) -> TensorData:
        """All clients' training data together (for a centralised oracle only)."""
        return TensorData.concat([self.train[c] for c in self.clients])

    def label_counts(self, split: str = "train") -> np.ndarray:
        """Matrix ``[client, class]`` of example counts."""
        parts = self.train if split == "train" else self.test
        return np.stack(
            [np.bincount(parts[c].y.numpy(), minlength=self.num_classes) for c in self.clients]
        )


def federate(
    data: TensorData,
    parts: Sequence[np.ndarray],
    *,
    num_classes: int,
    test_fraction: float,
    seed: int,
) -> FederatedDataset:
    """Give client ``i`` the examples ``parts[i]``, each split into its own train and test data.

    Each client keeps ``round(test_fraction × n)`` examples (at least one) for its test split,
    chosen by a seeded shuffle; the pooled client test splits form the global test set.
    """
    from fedtransfer.seeding import derive_seed

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"federate: test_fraction must be in (0, 1), got {test_fraction}")
    width = len(str(len(parts) - 1))
    train: dict[str, TensorData] = {}
    test: dict[str, TensorData] = {}
    for i, idx in enumerate(parts):
        if len(idx) < 2:
            raise ValueError(f"federate: client {i} has {len(idx)} examples; needs at least 2")
        rng = np.random.default_rng(derive_seed(seed, "client-split", i))
        shuffled = rng.permutation(np.asarray(idx))
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
        cid = f"{i:0{width}d}"
        test[cid] = data.subset(np.sort(shuffled[:n_test]))
        train[cid] = data.subset(np.sort(shuffled[n_test:]))
    return FederatedDataset(train, test, num_classes)
