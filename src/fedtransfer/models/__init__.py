"""Ready model builders; any ``nn.Module`` factory works as a ``model_fn``."""

from fedtransfer.models.base import ModelFactory
from fedtransfer.models.cnn import CNN, LeafCNN, LeafNet, SmallCNN
from fedtransfer.models.hf import HFClassifier

__all__ = ["CNN", "HFClassifier", "LeafCNN", "LeafNet", "ModelFactory", "SmallCNN"]
