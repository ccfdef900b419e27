"""Moved to :mod:`fedtransfer.client.fast.runtimes` (``VectorizedRuntime`` and
``AutoRuntime``, also exported by :mod:`fedtransfer.runtime`); this module re-exports them
so that old imports keep working."""

from fedtransfer.client.fast.runtimes import MAX_PARAMS, AutoRuntime, VectorizedRuntime, batched_map

__all__ = ["MAX_PARAMS", "AutoRuntime", "VectorizedRuntime", "batched_map"]
