"""Personalisation: Ditto and FedRep objectives, and personalised evaluation by fine-tuning."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.client.evaluate import evaluate
from fedtransfer.client.objectives import (
    ClientContext,
    ClientOut,
    _Base,
    _check_nonneg,
    _proximal,
    trainable_shared,
)
from fedtransfer.client.train import LocalTraining, local_train
from fedtransfer.data.federated import TensorData
from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.transfer.policies import Rules
from fedtransfer.types import Metrics, Params, State


@dataclass(frozen=True)
class Ditto(_Base):
    """Ditto (Li et al., arXiv 2012.04221): a personal model regularised towards the global one.

    Each round a client first trains its personal copy ``v`` of the shared keys on
    ``L_i(v) + λ/2 ||v − θ||²`` (``steps`` minibatch steps, or the recipe's local amount when
    ``None``), keeps it in its memory, then trains the global copy as in FedAvg and sends that
    update. The personal model is what personalised evaluation starts from; it never leaves
    the client.

    >>> Ditto(lam=0.1).lam
    0.1
    """

    lam: float = 0.1
    steps: int | None = None

    def __post_init__(self) -> None:
        _check_nonneg("Ditto", "lam", self.lam)
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise ConfigError(f"Ditto: steps must be >= 1 or null, got {self.steps!r}")

    def train(
        self, model: nn.Module, plan: ParamPlan, data: TensorData, ctx: ClientContext
    ) -> ClientOut:
        start = tree.clone(model.state_dict())
        v = {k: ctx.memory.get(f"v/{k}", ctx.global_shared[k]) for k in plan.shared}
        model.load_state_dict({**start, **v}, strict=True)
        anchor = {k: ctx.global_shared[k].detach() for k in plan.shared}
        spec = replace(ctx.spec, steps=self.steps) if self.steps is not None else ctx.spec
        personal = local_train(
            model,
            plan,
            data,
            spec,
            generator=ctx.generator,
            penalty=_proximal(anchor, trainable_shared(plan), self.lam) if self.lam else None,
        )
        trained = model.state_dict()
        memory = {f"v/{k}": trained[k].detach().clone() for k in plan.shared}
        model.load_state_dict(start, strict=True)
        metrics = local_train(model, plan, data, ctx.spec, generator=ctx.generator)
        metrics["personal_loss"] = personal["loss"]
        return ClientOut(metrics, memory=memory)

    def personal(self, weights: Params, memory: State) -> dict[str, Tensor]:
        out = dict(weights)
        out.update({k.removeprefix("v/"): v for k, v in memory.items() if k.startswith("v/")})
        return out


@dataclass(frozen=True)
class Rep(_Base):
    """FedRep (Collins et al., arXiv 2102.07078): alternate head and body training each round.

    The head is the plan's ``local`` keys (pair with ``PersonalHead``): the client first trains
    only its head for ``head_epochs`` epochs with the body fixed, then only the shared body
    for the recipe's local amount; only the body is sent.

    >>> Rep(head_epochs=5).head_epochs
    5
    """

    head_epochs: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.head_epochs, bool) or not isinstance(self.head_epochs, int):
            raise ConfigError(f"Rep: head_epochs must be an integer, got {self.head_epochs!r}")
        if self.head_epochs < 1:
            raise ConfigError(f"Rep: head_epochs must be >= 1, got {self.head_epochs}")

    def check(self, plan: ParamPlan) -> None:
        if not plan.local:
            raise CompatibilityError(
                "Rep: FedRep trains a local head, but the policy labels no key 'local'; "
                "hint: use policy PersonalHead (head local, body shared)"
            )

    def train(
        self, model: nn.Module, plan: ParamPlan, data: TensorData, ctx: ClientContext
    ) -> ClientOut:
        self.check(plan)
        head_spec = replace(ctx.spec, epochs=self.head_epochs, steps=None)
        head = local_train(model, plan.only(plan.local), data, head_spec, generator=ctx.generator)
        body = local_train(model, plan.only(plan.shared), data, ctx.spec, generator=ctx.generator)
        metrics: Metrics = dict(body)
        metrics["head_loss"] = head["loss"]
        metrics["head_steps"] = head["steps"]
        return ClientOut(metrics)


@dataclass(frozen=True)
class Personalization:
    """Personalised evaluation: each client fine-tunes ``steps`` SGD steps on its own training
    split, starting from the model it holds (global shared + its local keys, or the objective's
    personal model), then is evaluated on its own test split.

    ``finetune`` is a selector (see :mod:`fedtransfer.transfer.select`) naming what adapts:
    ``"*"`` everything, ``"head"`` the last block (FedBABU fine-tunes the head it kept frozen).
    ``steps = 0`` evaluates the held model as it is.

    >>> Personalization(steps=5).training().steps
    5
    """

    steps: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 32
    finetune: str = "*"

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"Personalization: steps must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.lr, int | float) or not (0 < self.lr < math.inf):
            raise ConfigError(f"Personalization: lr must be finite and > 0, got {self.lr!r}")
        self.training()

    def training(self) -> LocalTraining:
        """The fine-tuning spec (validated like any local training)."""
        return LocalTraining(
            lr=self.lr,
            momentum=self.momentum,
            steps=max(self.steps, 1),
            batch_size=self.batch_size,
        )


def personalize(
    model: nn.Module,
    weights: Params,
    data: TensorData,
    spec: Personalization,
    *,
    generator: torch.Generator,
) -> nn.Module:
    """Load ``weights`` into ``model`` and fine-tune the ``spec.finetune`` keys on ``data``."""
    model.load_state_dict(dict(weights), strict=True)
    if spec.steps == 0 or len(data) == 0:
        return model
    plan = Rules(rules=((spec.finetune, "shared"),), default="frozen").plan(model)
    local_train(model, plan, data, spec.training(), generator=generator)
    return model


def personalized_accuracy(
    model: nn.Module,
    weights: Params,
    train: TensorData,
    test: TensorData,
    spec: Personalization,
    *,
    generator: torch.Generator,
) -> dict[str, float]:
    """Evaluation on ``test`` after :func:`personalize` on ``train``."""
    return evaluate(personalize(model, weights, train, spec, generator=generator), test)
