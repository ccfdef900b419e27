"""Robustness evaluation: simulated attacks and the threat that wraps a round's clients."""

from fedtransfer.robustness.attacks import (
    ALIE,
    IPM,
    Attack,
    GaussianAttack,
    LabelFlip,
    Scale,
    SignFlip,
)
from fedtransfer.robustness.threat import Threat

__all__ = ["ALIE", "IPM", "Attack", "GaussianAttack", "LabelFlip", "Scale", "SignFlip", "Threat"]
