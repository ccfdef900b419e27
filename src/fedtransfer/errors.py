"""The error types fedtransfer raises for bad input; all are ``ValueError`` subclasses."""

from __future__ import annotations


class FedTransferError(ValueError):
    """Base class: something given to fedtransfer is not what it expects."""


class ConfigError(FedTransferError):
    """An experiment configuration is malformed; the message names the dotted path."""


class PlanError(FedTransferError):
    """A transfer policy cannot label a model's state-dict keys as asked."""


class CompatibilityError(FedTransferError):
    """Components or checkpoints that cannot work together (e.g. a weights hash mismatch)."""


class PayloadError(FedTransferError):
    """Bytes on the wire that do not decode into a valid payload."""


class UpdateRejected(FedTransferError):
    """A client update failed validation and was excluded from aggregation."""

    def __init__(self, message: str, *, client: str | None = None, round: int | None = None):
        super().__init__(message)
        self.client = client
        self.round = round


class DataMissing(FedTransferError):
    """Dataset files are not in the data directory (the message names what to put where)."""


class ChecksumError(FedTransferError):
    """A dataset or weights file does not match its published checksum."""
