"""Evaluation of a model on one dataset: mean cross-entropy and accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtransfer.data.federated import TensorData


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, *, batch_size: int = 1024) -> dict[str, float]:
    """``{"loss", "accuracy", "examples"}`` of ``model`` (in eval mode) on ``data``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    n = max(len(data), 1)
    return {"loss": loss_sum / n, "accuracy": correct / n, "examples": float(len(data))}
