"""What trains and what travels: transfer policies, their plans, and pre-trained checkpoints."""

from fedtransfer.transfer.policies import (
    FrozenHead,
    Full,
    GlobalHead,
    HeadOnly,
    LastK,
    LocalBatchNorm,
    PersonalHead,
    Rules,
)
from fedtransfer.transfer.policy import ParamPlan, TransferPolicy
from fedtransfer.transfer.pretrain import PretrainSpec, pretrain
from fedtransfer.transfer.pretrained import Checkpoint, load_checkpoint, save_checkpoint
from fedtransfer.transfer.select import blocks, select

__all__ = [
    "Checkpoint",
    "FrozenHead",
    "Full",
    "GlobalHead",
    "HeadOnly",
    "LastK",
    "LocalBatchNorm",
    "ParamPlan",
    "PersonalHead",
    "PretrainSpec",
    "Rules",
    "TransferPolicy",
    "blocks",
    "load_checkpoint",
    "pretrain",
    "save_checkpoint",
    "select",
]
