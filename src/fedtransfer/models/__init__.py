"""Ready model builders; any ``nn.Module`` factory works as a ``model_fn``."""

from fedtransfer.models.cnn import CNN, SmallCNN

__all__ = ["CNN", "SmallCNN"]
