"""Ready model builders; any ``nn.Module`` factory works as a ``model_fn``."""

from fedtransfer.models.base import ModelFactory
from fedtransfer.models.cnn import CNN, SmallCNN

__all__ = ["CNN", "ModelFactory", "SmallCNN"]
