"""The one local training loop: minibatch SGD or Adam on exactly the plan's trainable keys.

Its definition — the options of :class:`LocalTraining`, the optimisers' constants, the
minibatches drawn (:func:`minibatches`) — is the one the fast path
(:mod:`fedtransfer.client.fast`) follows too: it reads the same options from the same
``LocalTraining``, and declines an option (or value) it does not know, with a log line."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtransfer.data.federated import TensorData
from fedtransfer.errors import ConfigError
from fedtransfer.types import Metrics

if TYPE_CHECKING:
    from fedtransfer.transfer.plan import ParamPlan

Optimizer = Literal["sgd", "adam"]
Loss = Literal["cross_entropy", "mse"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
LOSSES: tuple[str, ...] = get_args(Loss)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""Adam's constants (``torch.optim.Adam``'s defaults), for every loop that implements it."""


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains: optimiser, learning rate, and ``epochs`` or, when set, ``steps``.

    A step is one minibatch of ``batch_size``; ``steps`` (when not ``None``) replaces
    ``epochs`` as the amount of training. ``loss`` is cross-entropy on integer labels, or mean
    squared error on real targets (regression, and the closed-form golden tests).
    """

    optimizer: Optimizer = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 32
    loss: Loss = "cross_entropy"

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or self.epochs < 1:
            raise ConfigError(f"LocalTraining: epochs must be an integer >= 1, got {self.epochs!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise ConfigError(
                f"LocalTraining: steps must be >= 1 or null (train by epochs), got {self.steps!r}"
            )
        if self.loss not in LOSSES:
            raise ConfigError(f"LocalTraining: loss {self.loss!r} not in {list(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"LocalTraining: optimizer {self.optimizer!r} not in {list(OPTIMIZERS)}"
            )
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"LocalTraining: {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"LocalTraining: {name} must be finite, got {value!r}")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(
                    f"LocalTraining: {name} must be an integer, got {getattr(self, name)!r}"
                )
        if not self.lr > 0:
            raise ConfigError(f"LocalTraining: lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"LocalTraining: momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"LocalTraining: weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ConfigError(f"LocalTraining: batch_size must be >= 1, got {self.batch_size}")

    def num_steps(self, num_examples: int) -> int:
        """Minibatch steps this spec takes on ``num_examples`` examples."""
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(num_examples / self.batch_size)


def minibatches(
    num_examples: int, spec: LocalTraining, generator: torch.Generator
) -> Iterator[Tensor]:
    """The example indices of each minibatch the loop takes on ``num_examples`` examples, in
    order: ``spec.num_steps`` minibatches of ``batch_size`` (the last of an epoch shorter), from
    one ``randperm`` of ``generator`` per epoch, drawn when the epoch starts (so draws made
    between minibatches, such as augmentation's, interleave with them as they always have)."""
    total = spec.num_steps(num_examples) if num_examples else 0
    size = min(spec.batch_size, num_examples)
    step = 0
    while step < total:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, size):
            if step == total:
                return
            yield order[start : start + size]
            step += 1


class _SGD:
    """``torch.optim.SGD``'s update (no dampening, no Nesterov) on a fixed parameter list,
    with ``torch._foreach`` kernels: the same arithmetic in the same order, so the same bits,
    without the per-step bookkeeping of ``torch.optim`` that dominates small models' steps.
    Parameters without a gradient are skipped, as ``torch.optim`` does."""

    def __init__(self, spec: LocalTraining, params: list[nn.Parameter]) -> None:
        self.params = params
        self.lr, self.momentum, self.weight_decay = spec.lr, spec.momentum, spec.weight_decay
        self.buffers: list[Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self) -> None:
        held = [i for i, p in enumerate(self.params) if p.grad is not None]
        params: list[Tensor] = [self.params[i] for i in held]
        grads: list[Tensor] = [g for i in held if (g := self.params[i].grad) is not None]
        if not params:
            return
        if self.weight_decay != 0:
            grads = list(torch._foreach_add(grads, params, alpha=self.weight_decay))
        if self.momentum != 0:
            bufs: list[Tensor] = []
            for i, g in zip(held, grads, strict=True):
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = torch.clone(g).detach()
                else:
                    buf.mul_(self.momentum).add_(g)
                bufs.append(buf)
            grads = bufs
        torch._foreach_add_(params, grads, alpha=-self.lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _optimizer(spec: LocalTraining, params: list[nn.Parameter]) -> torch.optim.Optimizer | _SGD:
    if spec.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=spec.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=spec.weight_decay
        )
    return _SGD(spec, params)


def _loss(spec: LocalTraining, out: Tensor, y: Tensor) -> Tensor:
    if spec.loss == "mse":
        return F.mse_loss(out, y.reshape(out.shape).to(out.dtype))
    return F.cross_entropy(out, y)


def set_modes(model: nn.Module, plan: ParamPlan) -> None:
    """Train mode, except modules whose state is entirely frozen: those run in eval mode, so
    a frozen pre-trained trunk keeps its BatchNorm statistics and computes the same features."""
    _set_modes(model, _layout(model, plan))


def _set_modes(model: nn.Module, layout: _Layout) -> None:
    if not layout.plain_modes:
        model.train()
        for module in layout.frozen_modules:
            module.eval()
        return
    for module in layout.modules:  # what train() and eval() do, without their recursion
        object.__setattr__(module, "training", True)
    for module in layout.frozen_modules:
        object.__setattr__(module, "training", False)


def _eval(model: nn.Module, layout: _Layout) -> None:
    if not layout.plain_modes:
        model.eval()
        return
    for module in layout.modules:
        object.__setattr__(module, "training", False)


@dataclass(frozen=True, eq=False)
class _Layout:
    """What the loop needs of a (model, plan) pair, worked out once: every parameter by key,
    the trainable ones, and the modules whose state is entirely frozen."""

    plan: ParamPlan
    named: dict[str, nn.Parameter]
    by_key: dict[str, nn.Parameter]
    frozen_modules: tuple[nn.Module, ...]
    modules: tuple[nn.Module, ...]
    plain_modes: bool
    """No module overrides ``train``/``eval``: modes can be set module by module."""


_LAYOUTS = threading.local()


def _layout(model: nn.Module, plan: ParamPlan) -> _Layout:
    """The layout of ``(model, plan)``, remembered per model (weakly: it goes with the model)
    for its latest plan — a worker reuses its model and a round's clients share a plan. A
    model whose parameters were replaced since gets a fresh layout."""
    cache: weakref.WeakKeyDictionary[nn.Module, _Layout] | None = getattr(_LAYOUTS, "cache", None)
    if cache is None:
        cache = _LAYOUTS.cache = weakref.WeakKeyDictionary()
    hit = cache.get(model)
    if hit is not None and hit.plan is plan:
        params = [p for m in hit.modules for p in m._parameters.values() if p is not None]
        if len(params) == len(hit.named) and all(
            p is q for p, q in zip(params, hit.named.values(), strict=True)
        ):
            return hit
    named = dict(model.named_parameters())
    keys_by_prefix: dict[str, list[str]] = {}
    for k in plan.labels:
        parts = k.split(".")
        for i in range(len(parts)):
            keys_by_prefix.setdefault(".".join(parts[:i]), []).append(k)
    modules = tuple(model.modules())
    frozen_modules = tuple(
        module
        for path, module in model.named_modules()
        if keys_by_prefix.get(path)
        and all(plan.labels[k] == "frozen" for k in keys_by_prefix[path])
    )
    layout = _Layout(
        plan,
        named,
        {name: p for name, p in named.items() if name in plan.trainable},
        frozen_modules,
        modules,
        all(type(m).train is nn.Module.train and type(m).eval is nn.Module.eval for m in modules),
    )
    cache[model] = layout
    return layout


def local_train(
    model: nn.Module,
    plan: ParamPlan,
    data: TensorData,
    spec: LocalTraining,
    *,
    generator: torch.Generator,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    penalty: Callable[[dict[str, nn.Parameter]], Tensor] | None = None,
    correct: Callable[[dict[str, nn.Parameter]], None] | None = None,
) -> Metrics:
    """Train ``model`` in place on ``data``; only ``plan.trainable`` parameters get gradients.

    Minibatch order (and ``augment``'s draws, if given) come from ``generator`` alone.
    Objectives add to the loop without replacing it: ``penalty(params)`` is added to each
    minibatch loss (FedProx, FedDyn, Ditto) and ``correct(params)`` edits the gradients after
    ``backward`` (SCAFFOLD); both see the trainable parameters by state-dict key. Returns the
    mean training loss (without the penalty), the number of steps and of examples seen.
    """
    layout = _layout(model, plan)
    named, by_key = layout.named, layout.by_key
    for name, p in named.items():
        want = name in by_key
        if p.requires_grad != want:
            p.requires_grad_(want)
    trainable = list(by_key.values())
    total_steps = spec.num_steps(len(data)) if len(data) else 0
    if not trainable or total_steps == 0:
        return {"loss": float("nan"), "steps": 0.0, "examples": 0.0}
    opt = _optimizer(spec, trainable)
    _set_modes(model, layout)
    loss_sum, seen, step = 0.0, 0, 0
    for idx in minibatches(len(data), spec, generator):
        x, y = data.x[idx], data.y[idx]
        if augment is not None:
            x = augment(x, generator)
        opt.zero_grad(set_to_none=True)
        loss = _loss(spec, model(x), y)
        (loss + penalty(by_key) if penalty is not None else loss).backward()
        if correct is not None:
            correct(by_key)
        opt.step()
        loss_sum += float(loss.detach()) * len(idx)
        seen += len(idx)
        step += 1
    _eval(model, layout)
    for p in named.values():
        if not p.requires_grad:
            p.requires_grad_(True)
    return {"loss": loss_sum / max(seen, 1), "steps": float(step), "examples": float(seen)}
