"""Moved to :mod:`fedtransfer.client.fast.features` (the frozen-trunk feature cache); this
module re-exports its public names so that old imports keep working."""

from fedtransfer.client.fast.features import (
    BUDGET_BYTES,
    DISK_BUDGET_BYTES,
    SPILL_DIR_ENV,
    enabled,
    evaluate_cached,
    head_path,
    no_feature_cache,
    train_head_cached,
)

__all__ = [
    "BUDGET_BYTES",
    "DISK_BUDGET_BYTES",
    "SPILL_DIR_ENV",
    "enabled",
    "evaluate_cached",
    "head_path",
    "no_feature_cache",
    "train_head_cached",
]
