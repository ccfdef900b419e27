"""Ready model builders; any ``nn.Module`` factory works as a ``model_fn``."""

from fedtransfer.models.base import ModelFactory
from fedtransfer.models.cnn import CNN, SmallCNN
from fedtransfer.models.hf import HFClassifier

__all__ = ["CNN", "HFClassifier", "ModelFactory", "SmallCNN"]
