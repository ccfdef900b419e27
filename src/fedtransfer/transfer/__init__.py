"""What trains and what travels: transfer policies, their plans, and pre-trained checkpoints.

A policy says what trains and what travels, nothing else: a stage with its own objective or
codec is a recipe, so staged schedules are schedules of recipes
(:class:`fedtransfer.rounds.schedule.Schedule`; the named ones are in :mod:`fedtransfer.algorithms`).
"""

from fedtransfer.transfer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtransfer.transfer.lora import Lora, LoRAConv2d, LoRALinear, merge
from fedtransfer.transfer.peft import PeftAdapters
from fedtransfer.transfer.plan import ParamPlan, TransferPolicy
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
from fedtransfer.transfer.pretrain import PretrainSpec, pretrain
from fedtransfer.transfer.select import blocks, select

__all__ = [
    "Checkpoint",
    "FrozenHead",
    "Full",
    "GlobalHead",
    "HeadOnly",
    "LastK",
    "LoRAConv2d",
    "LoRALinear",
    "LocalBatchNorm",
    "Lora",
    "ParamPlan",
    "PeftAdapters",
    "PersonalHead",
    "PretrainSpec",
    "Rules",
    "TransferPolicy",
    "blocks",
    "load_checkpoint",
    "merge",
    "pretrain",
    "save_checkpoint",
    "select",
]
