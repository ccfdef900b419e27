"""Training on stacked parameters: a group of clients' minibatch schedule, the ``vmap``-ped
loop over it, and SGD / Adam on the stacked tensors (see :mod:`.vectorized`).

It follows the one definition of the local loop (:mod:`fedtransfer.client.train`): the same
:class:`~fedtransfer.client.train.LocalTraining` options, the same minibatches
(:func:`~fedtransfer.client.train.minibatches`), the same optimiser constants; an option or
value it does not implement raises here, and :func:`~.support.supports` declines it first."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedtransfer.client.train import ADAM_BETAS, ADAM_EPS, LocalTraining, minibatches, set_modes
from fedtransfer.data.federated import TensorData
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.types import Metrics


def batches(
    num_examples: int, spec: LocalTraining, generator: torch.Generator
) -> list[Tensor] | Tensor:
    """The minibatch indices :func:`~fedtransfer.client.train.local_train` draws, in order
    (:func:`~fedtransfer.client.train.minibatches`): a ``(steps, size)`` tensor when every
    minibatch is full, else a list of index tensors."""
    drawn = list(minibatches(num_examples, spec, generator))
    if drawn and num_examples % len(drawn[0]) == 0:  # every minibatch full: one tensor
        return torch.stack(drawn)
    return drawn


@dataclass(frozen=True, eq=False)
class Schedule:
    """A group's minibatches, clients ordered by their number of steps (most first)."""

    order: list[int]
    steps: list[int]
    lengths: list[list[int]]  # per client (in order), its minibatches' sizes
    index: Tensor  # (steps, clients, batch): example indices, padded with 0
    mask: Tensor  # (steps, clients, batch): 1 for a real example, 0 for padding
    count: Tensor  # (steps, clients): real examples per minibatch (1 where none)

    @classmethod
    def build(cls, drawn: Sequence[list[Tensor] | Tensor]) -> Schedule:
        order = sorted(range(len(drawn)), key=lambda i: -len(drawn[i]))
        lengths = [_sizes(drawn[i]) for i in order]
        width = max(max(sizes, default=0) for sizes in lengths)
        steps = [len(sizes) for sizes in lengths]
        full = [d for d in (drawn[i] for i in order) if isinstance(d, Tensor)]
        if steps[0] and len(full) == len(order) and all(d.shape == full[0].shape for d in full):
            index = torch.stack(full, dim=1)  # every client's full minibatches: one copy
            real = torch.full((steps[0], len(order)), width)
            mask = torch.ones(steps[0], len(order), width)
            return cls(order, steps, lengths, index, mask, real.float())
        index = torch.zeros(steps[0], len(order), width, dtype=torch.long)
        for j, i in enumerate(order):
            d = drawn[i]
            if isinstance(d, Tensor):
                if steps[j]:
                    index[: steps[j], j, : d.shape[1]] = d  # full minibatches: one copy
                continue
            if steps[j] and all(size == width for size in lengths[j]):
                index[: steps[j], j] = torch.stack(d)
                continue
            for t, b in enumerate(d):
                index[t, j, : len(b)] = b
        padded = [sizes + [0] * (steps[0] - len(sizes)) for sizes in lengths]
        real = torch.tensor(padded, dtype=torch.long).t().reshape(steps[0], len(order))
        mask = (torch.arange(width) < real.unsqueeze(-1)).float()
        return cls(order, steps, lengths, index, mask, real.clamp(min=1).float())

    def active(self, t: int) -> int:
        """How many clients (a leading slice) take step ``t``."""
        return sum(s > t for s in self.steps)


def _sizes(drawn: list[Tensor] | Tensor) -> list[int]:
    if isinstance(drawn, Tensor):
        return [drawn.shape[1]] * drawn.shape[0]
    return [len(b) for b in drawn]


def _losses(spec: LocalTraining, out: Tensor, y: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    """Every client's minibatch loss as ``local_train`` computes it (the mean over its real
    examples), from the stacked outputs ``(clients, batch, ...)``: computed outside ``vmap``,
    on the flattened batch, where the loss kernels are fast."""
    clients, width = out.shape[:2]
    if spec.loss == "mse":
        per = (out - y.reshape(out.shape).to(out.dtype)).pow(2)
    elif spec.loss != "cross_entropy":
        raise ValueError(f"the stacked loop has no loss {spec.loss!r}")
    elif out.dim() == 3 and y.dim() == 2 and not y.dtype.is_floating_point:
        per = _class_cross_entropy(out.flatten(0, 1), y.flatten(0, 1)).view(clients, width)
    else:
        per = F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1), reduction="none")
    if per.numel() == clients * width:
        per = per.view(clients, width)
    else:  # several outputs per example: the serial loss is their mean too
        per = per.reshape(clients, width, -1).mean(-1)
    return (per * mask).sum(-1) / count


def _class_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``F.cross_entropy(logits, target, reduction="none")`` for ``(examples, classes)``
    logits and class indices, with the log-softmax taken over dimension 0 of the transposed
    logits: on a CPU, its kernel over a short last dimension (a few classes) is ~10x slower.
    (A target out of range raises: the cohort then runs serially.)"""
    log_probs = F.log_softmax(logits.t(), 0)
    return -log_probs.gather(0, target.unsqueeze(0)).squeeze(0)


def stack(
    tensors: list[Tensor], dtype: torch.dtype, order: tuple[int, ...] | None = None
) -> Tensor:
    """``tensors`` (of one shape) stacked on a new leading client dimension, in ``dtype``, as a
    fresh tensor the loop may update, laid out in memory with its dimensions in ``order``
    (outermost first, as :func:`gradient_orders` learns them; default: contiguous)."""
    first = tensors[0]
    shape = (len(tensors), *first.shape)
    order = order if order is not None and len(order) == len(shape) else tuple(range(len(shape)))
    out = torch.empty([shape[d] for d in order], dtype=dtype)
    out = out.permute([order.index(d) for d in range(len(shape))])
    if all(t is first for t in tensors):  # one tensor, first laid out as each row is
        inner = [d - 1 for d in order if d]
        row = torch.empty([first.shape[d] for d in inner], dtype=dtype)
        row = row.permute([inner.index(d) for d in range(first.dim())]).copy_(first)
        out.copy_(row.unsqueeze(0).expand(shape))
    else:
        for row, t in zip(out, tensors, strict=True):
            row.copy_(t)
    return out


_GRAD_ORDERS: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[int, ...]]] = (
    weakref.WeakKeyDictionary()
)
"""Per model, the memory order of each stacked parameter's gradient (a ``Linear`` weight's
comes out transposed): parameters stacked in the same order are updated with contiguous
element-wise kernels (several times faster than mixing layouts), so the next rounds stack
them that way."""


def _memory_order(t: Tensor) -> tuple[int, ...]:
    """``t``'s dimensions from the outermost in memory to the innermost."""
    strides = t.stride()
    return tuple(sorted(range(t.dim()), key=lambda d: (-strides[d], d)))


def gradient_orders(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The memory order of each stacked parameter's gradient in ``model``'s last vectorised
    training (empty before the first): stack parameters in it."""
    return _GRAD_ORDERS.get(model, {})


class _Gather:
    """Client ``j``'s examples ``index[j]`` for each of the leading ``len(index)`` clients.

    Clients whose examples are row slices of one tensor (a population cut from one array)
    are gathered with one index operation per step, from that tensor; others client by
    client."""

    def __init__(self, data: list[TensorData]) -> None:
        self.data = data
        xs, ys = _rows_of_one([d.x for d in data]), _rows_of_one([d.y for d in data])
        self.shared = None if xs is None or ys is None else (xs, ys)
        self.out: tuple[Tensor, Tensor] | None = None  # reused: a step's batch dies with it

    def __call__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        k, width = index.shape
        x0, y0 = self.data[0].x, self.data[0].y
        if self.shared is not None:
            (x, rx), (y, ry) = self.shared
            if self.out is None or self.out[0].shape[0] < k * width:
                self.out = (
                    x.new_empty((k * width, *x.shape[1:])),
                    y.new_empty((k * width, *y.shape[1:])),
                )
            xb, yb = self.out[0][: k * width], self.out[1][: k * width]
            torch.index_select(x, 0, (index + rx[:k, None]).view(-1), out=xb)
            torch.index_select(y, 0, (index + ry[:k, None]).view(-1), out=yb)
            return xb.view(k, width, *x0.shape[1:]), yb.view(k, width, *y0.shape[1:])
        xb = torch.empty((k, width, *x0.shape[1:]), dtype=x0.dtype)
        yb = torch.empty((k, width, *y0.shape[1:]), dtype=y0.dtype)
        for j in range(k):
            torch.index_select(self.data[j].x, 0, index[j], out=xb[j])
            torch.index_select(self.data[j].y, 0, index[j], out=yb[j])
        return xb, yb


def _rows_of_one(tensors: list[Tensor]) -> tuple[Tensor, Tensor] | None:
    """When every non-empty tensor is a slice of rows of one strided tensor: that tensor (as
    a view spanning them all) and each one's first row in it (0 for empty ones)."""
    held = [t for t in tensors if t.shape and t.shape[0]]
    if not held:
        return None
    first = held[0]
    stride, rest, size = first.stride(), first.shape[1:], first.element_size()
    if stride[0] <= 0:
        return None
    base_ptr = first.data_ptr() - first.storage_offset() * size  # its storage's start
    for t in held:
        if (
            t.dtype != first.dtype
            or t.shape[1:] != rest
            or t.stride() != stride
            or t.data_ptr() - t.storage_offset() * size != base_ptr
        ):
            return None
    base = min(t.storage_offset() for t in held)
    rows: list[int] = []
    span = 0
    for t in tensors:
        n = t.shape[0] if t.shape else 0
        shift = t.storage_offset() - base if n else 0
        if shift % stride[0]:
            return None
        rows.append(shift // stride[0])
        span = max(span, rows[-1] + n)
    if first.dim() > 1 and first[0].is_contiguous():  # rows as flat vectors: a faster copy
        return first.as_strided((span, first[0].numel()), (stride[0], 1), base), torch.tensor(rows)
    return first.as_strided((span, *rest), stride, base), torch.tensor(rows)


def train_stacked(
    model: nn.Module,
    plan: ParamPlan,
    spec: LocalTraining,
    sched: Schedule,
    stacked: dict[str, Tensor],
    keys: list[str],
    fixed: dict[str, Tensor],
    data: list[TensorData],
) -> list[list[float]]:
    """The training loop on ``stacked`` (updated in place); every step's minibatch losses."""
    names = list(stacked)

    def run(*args: Tensor) -> Tensor:  # positional tensors: the least work for vmap per call
        own = dict(zip(names, args[:-1], strict=True))
        return functional_call(model, (own, fixed), (args[-1],), tie_weights=False)

    forward = vmap(run)
    opt = _optimizer(spec, [stacked[k] for k in keys])
    losses: list[list[float]] = []
    gather = _Gather(data)
    set_modes(model, plan)
    try:
        for t in range(sched.steps[0]):
            k = sched.active(t)
            xb, yb = gather(sched.index[t, :k])
            leaves = [stacked[key][:k].detach().requires_grad_() for key in keys]
            own = dict(zip(keys, leaves, strict=True))
            out = forward(*[own[n] if n in own else stacked[n][:k] for n in names], xb)
            value = _losses(spec, out, yb, sched.mask[t, :k], sched.count[t, :k])
            grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
            if t == 0 and k > 1:  # (a client dimension of 1 has no meaningful stride)
                _GRAD_ORDERS[model] = {
                    key: _memory_order(g)
                    for key, g in zip(keys, grads, strict=True)
                    if g is not None
                }
            opt.step(k, grads)
            losses.append(value.detach().tolist())
    finally:
        model.eval()
    return losses


def client_metrics(sched: Schedule, j: int, losses: list[list[float]]) -> Metrics:
    """``local_train``'s metrics for the client in position ``j``: the same float sums."""
    if sched.steps[j] == 0:
        return {"loss": float("nan"), "steps": 0.0, "examples": 0.0}
    total, seen = 0.0, 0
    for t, size in enumerate(sched.lengths[j]):
        total += losses[t][j] * size
        seen += size
    return {"loss": total / max(seen, 1), "steps": float(sched.steps[j]), "examples": float(seen)}


def _optimizer(spec: LocalTraining, params: list[Tensor]) -> StackedSGD | StackedAdam:
    if spec.optimizer == "adam":
        return StackedAdam(spec, params)
    if spec.optimizer == "sgd":
        return StackedSGD(spec, params)
    raise ValueError(f"the stacked loop has no optimizer {spec.optimizer!r}")


class StackedSGD:
    """:class:`~fedtransfer.client.train._SGD` (``torch.optim.SGD``'s arithmetic) on stacked
    parameters, moving only the leading ``k`` clients (the others' steps are done)."""

    def __init__(self, spec: LocalTraining, params: list[Tensor]) -> None:
        self.params = params
        self.lr, self.momentum, self.weight_decay = spec.lr, spec.momentum, spec.weight_decay
        self.buffers: list[Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self, k: int, grads: Sequence[Tensor | None]) -> None:
        held = [i for i, g in enumerate(grads) if g is not None]
        if not held:
            return
        params = [self.params[i][:k] for i in held]
        steps: list[Tensor] = [g for g in grads if g is not None]
        if self.weight_decay != 0:
            steps = list(torch._foreach_add(steps, params, alpha=self.weight_decay))
        if self.momentum != 0:
            bufs: list[Tensor] = []
            for i, g in zip(held, steps, strict=True):
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = torch.zeros_like(self.params[i])
                    buf[:k].copy_(g)
                else:
                    buf[:k].mul_(self.momentum).add_(g)
                bufs.append(buf[:k])
            steps = bufs
        torch._foreach_add_(params, steps, alpha=-self.lr)


class StackedAdam:
    """``torch.optim.Adam``'s (default, single-tensor) arithmetic on stacked parameters, moving
    only the leading ``k`` clients; every client still training has taken the same steps."""

    def __init__(self, spec: LocalTraining, params: list[Tensor]) -> None:
        self.params, self.lr, self.weight_decay = params, spec.lr, spec.weight_decay
        (self.beta1, self.beta2), self.eps = ADAM_BETAS, ADAM_EPS  # local_train's Adam
        self.state: list[tuple[list[int], Tensor, Tensor] | None] = [None] * len(params)

    @torch.no_grad()
    def step(self, k: int, grads: Sequence[Tensor | None]) -> None:
        for i, g in enumerate(grads):
            if g is None:
                continue
            full = self.params[i]
            state = self.state[i]
            if state is None:
                state = self.state[i] = ([0], torch.zeros_like(full), torch.zeros_like(full))
            state[0][0] += 1
            param, exp_avg, exp_avg_sq = full[:k], state[1][:k], state[2][:k]
            if self.weight_decay != 0:
                g = g.add(param, alpha=self.weight_decay)
            exp_avg.lerp_(g, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            step = float(state[0][0])
            step_size = self.lr / (1 - self.beta1**step)
            denom = (exp_avg_sq.sqrt() / (1 - self.beta2**step) ** 0.5).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
