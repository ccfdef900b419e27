"""The ``ModelFactory`` protocol: how configs name a model (``model_fn``) and seed its init."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class ModelFactory(Protocol):
    """Builds fresh models; ``init(seed)`` gives weights that depend only on the seed.

    Any zero-argument callable returning an ``nn.Module`` is a ``model_fn`` for the library
    API; configs need this protocol so scratch arms start from a seeded initialisation.
    """

    def __call__(self) -> nn.Module:
        """A new model (weights arbitrary)."""

    def init(self, seed: int) -> nn.Module:
        """A new model initialised from ``seed``."""
