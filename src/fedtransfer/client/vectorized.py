"""Moved to :mod:`fedtransfer.client.fast.vectorized` (vectorised client updates); this module
re-exports :func:`vectorized_update` so that old imports keep working (patch it at its new
home: :class:`~fedtransfer.client.job.ClientUpdate` calls it there)."""

from fedtransfer.client.fast.vectorized import GROUP_BYTES, vectorized_update

__all__ = ["GROUP_BYTES", "vectorized_update"]
