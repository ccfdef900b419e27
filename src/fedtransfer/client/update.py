"""One client's work in a round: verify start ▸ decode ▸ train ▸ delta ▸ encode. No orchestration."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from fedtransfer import tree
from fedtransfer.client.objectives import ClientContext, ClientOut, scale_floats
from fedtransfer.codecs import Exact, Payload
from fedtransfer.data.federated import TensorData
from fedtransfer.errors import CompatibilityError, FedTransferError, PayloadError
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import FAILED, Reply
from fedtransfer.seeding import derive_seed, generator, global_cpu_seed
from fedtransfer.transfer.plan import ParamPlan, TransferPolicy
from fedtransfer.types import Metrics, Params, UpdateContext

log = logging.getLogger(__name__)

SETUP_CODEC = Exact()
"""The set-up distribution of the starting weights is always lossless."""


@dataclass(frozen=True, eq=False)
class ClientTask:
    """What the server sends a client for one round (plus, in simulation, its private data).

    ``setup`` carries the encoded starting weights on a client's first participation; the
    client checks their hash against ``start_sha256`` before it trains. ``handover`` carries,
    in a staged schedule, the keys that changed since the starting weights this client holds
    (see :mod:`fedtransfer.rounds.schedule`).
    """

    client: str
    round: int
    seed: int
    downlink: bytes
    data: TensorData
    local: dict[str, Tensor]
    frozen: Params
    start_sha256: str
    setup: bytes | None = None
    memory: dict[str, Tensor] = field(default_factory=dict)
    broadcast: bytes | None = None
    handover: bytes | None = None


TRANSFORM_MEMORY = "transform/"
"""Client memory under this prefix belongs to the client transforms (``transform/<i>/<key>``);
the rest is the objective's."""


def verify_start(setup: bytes, expected_sha256: str, *, client: str) -> dict[str, Tensor]:
    """Decode the set-up payload and check its weights' hash (the identical-start guarantee).

    Every new client of a run receives the same set-up bytes: a worker that has verified
    exactly these bytes against this hash reuses its result (the decoded tensors are only
    read: loading copies them into the model)."""
    last = getattr(_WORKER, "start", None)
    if last is not None and last[0] == expected_sha256 and last[1] == setup:
        return dict(last[2])
    weights = SETUP_CODEC.decode(Payload.from_bytes(setup))
    seen = tree.sha256(weights)
    if seen == expected_sha256:
        _WORKER.start = (expected_sha256, setup, weights)
    else:
        raise CompatibilityError(
            f"client {client}: starting weights sha256 {seen[:16]}… does not match the run's "
            f"recorded {expected_sha256[:16]}…; every client must start from the same checkpoint "
            "(was the pre-trained checkpoint replaced after the run began?)"
        )
    return weights


def client_update(task: ClientTask, *, recipe: Recipe, model_fn: Callable[[], nn.Module]) -> Reply:
    """Run one client's round. If it raises (a label out of range, a model that does not fit
    its data …), the reply carries the error (``FAILED`` + the reason), logged with the
    client and the round: that client's rejection, not the end of the round."""
    try:
        return _client_update(task, recipe, model_fn)
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}" if isinstance(exc, FedTransferError) else repr(exc)
        log.error("client %s, round %d failed: %s", task.client, task.round, why, exc_info=exc)
        return Reply(task.client, b"", 0, error=FAILED + why)


def _client_update(task: ClientTask, recipe: Recipe, model_fn: Callable[[], nn.Module]) -> Reply:
    model, plan = worker_model(recipe.policy, model_fn)
    start = start_client(task, recipe, plan)
    load_weights(model, start.weights)
    # user models may draw from the global RNG (dropout): seed it per (run, round, client)
    with global_cpu_seed(derive_seed(task.seed, "torch", task.round, task.client)):
        out = recipe.objective.train(model, plan, task.data, start.ctx)
    return finish_client(task, recipe, plan, model.state_dict(), start, out)


@dataclass(frozen=True, eq=False)
class ClientStart:
    """A client's round before training: the weights it holds (every state-dict key), the
    decoded global shared keys, the objective's context, and the client transforms' memory."""

    weights: dict[str, Tensor]
    global_shared: Params
    ctx: ClientContext
    kept: dict[str, Tensor]


def start_client(task: ClientTask, recipe: Recipe, plan: ParamPlan) -> ClientStart:
    """Everything a client does before it trains (shared by the serial and vectorised paths):
    verify and assemble its weights, decode the broadcast, split its memory, seed its context."""
    weights, global_shared = _weights(plan, task, recipe)
    broadcast = {}
    if task.broadcast is not None:
        broadcast = recipe.downlink.decode(Payload.from_bytes(task.broadcast))
    memory, kept = _split_memory(task.memory)
    ctx = ClientContext(
        global_shared=global_shared,
        memory=memory,
        broadcast=broadcast,
        spec=recipe.training,
        generator=generator(task.seed, "batches", task.round, task.client),
        start_sha256=task.start_sha256,
    )
    return ClientStart(weights, global_shared, ctx, kept)


def finish_client(
    task: ClientTask,
    recipe: Recipe,
    plan: ParamPlan,
    trained: Params,
    start: ClientStart,
    out: ClientOut,
    *,
    delta: dict[str, Tensor] | None = None,
) -> Reply:
    """Everything a client does after it trains (shared by the serial and vectorised paths):
    delta ▸ scale ▸ client transforms ▸ encode ▸ result, from its ``trained`` weights
    (``delta``, the trained minus the global shared keys, when the caller has it already)."""
    if delta is None:
        delta = tree.sub(tree.select(trained, plan.shared), start.global_shared)
    if out.update_scale != 1.0:
        delta = scale_floats(delta, out.update_scale)
    try:
        ctx = UpdateContext(start.global_shared, client=task.client, uplink=recipe.uplink)
        delta, transformed, metrics = _transform(recipe, delta, start.kept, ctx)
        uplink = recipe.uplink.encode(delta).to_bytes()
        extras = recipe.uplink.encode(out.extras).to_bytes() if out.extras else b""
    except PayloadError as exc:
        # e.g. a diverged update that an affine or sparse codec cannot hold: this client's
        # rejection (the server names it), not the end of the round
        why = f"its update does not encode with {recipe.uplink!r}: {exc}"
        log.warning("client %s, round %d: %s", task.client, task.round, why)
        return Reply(task.client, b"", len(task.data), metrics=out.metrics, error=why)
    return Reply(
        client=task.client,
        uplink=uplink,
        num_examples=len(task.data),
        local=tree.clone(tree.select(trained, plan.local)),
        metrics={**out.metrics, **metrics},
        extras=extras,
        memory=tree.clone({**out.memory, **transformed}),
    )


_WORKER = threading.local()
_KEEP = 4


def worker_model(
    policy: TransferPolicy, model_fn: Callable[[], nn.Module]
) -> tuple[nn.Module, ParamPlan]:
    """The prepared model and its plan for ``(policy, model_fn)``, built once per worker thread
    and reused by every client it runs (each client loads its whole state dict, strictly, so
    nothing of the previous client's weights survives). ``model_fn`` must build the same
    architecture on every call, and buffers left out of the state dict (``persistent=False``)
    must be constants. Unhashable factories get a fresh model each time.
    """
    try:
        key = (policy, model_fn)
        hash(key)
    except TypeError:
        fresh = policy.prepare(model_fn())
        return fresh, policy.plan(fresh)
    cache: OrderedDict[object, tuple[nn.Module, ParamPlan]] = (
        getattr(_WORKER, "models", None) or OrderedDict()
    )
    _WORKER.models = cache
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    model = policy.prepare(model_fn())
    cache[key] = (model, policy.plan(model))
    while len(cache) > _KEEP:  # stages and arms switch policies: keep the latest few
        cache.popitem(last=False)
    return cache[key]


def _downlink(recipe: Recipe, data: bytes) -> dict[str, Tensor]:
    """The decoded global model: every client of a round receives the same bytes, so a worker
    decodes them once (keyed by the bytes themselves, whose hash Python caches; the decoded
    tensors are only read: loading copies them into the model)."""
    last = getattr(_WORKER, "downlink", None)
    if last is not None and last[0] == (recipe.downlink, data):
        return dict(last[1])
    decoded = recipe.downlink.decode(Payload.from_bytes(data))
    _WORKER.downlink = ((recipe.downlink, data), decoded)
    return dict(decoded)


def _weights(plan: ParamPlan, task: ClientTask, recipe: Recipe) -> tuple[dict[str, Tensor], Params]:
    """The weights the client holds this round: its starting weights (verified at set-up), a
    stage hand-over, its local keys, the decoded global shared keys — then the recipe's
    ``client_start`` steps (HetLoRA narrows them to the client's own slice). Returns them and
    the global shared keys as the client holds them."""
    frozen: Params = task.frozen
    local = task.local
    received: dict[str, Tensor] = {}  # set-up (new clients) or hand-over (clients behind)
    if task.setup is not None:
        received = verify_start(task.setup, task.start_sha256, client=task.client)
    if task.handover is not None:
        received = {**received, **SETUP_CODEC.decode(Payload.from_bytes(task.handover))}
    if received:
        more_frozen, local = plan.held(received, local)
        frozen = {**frozen, **more_frozen}
    global_shared = _downlink(recipe, task.downlink)
    weights = {**frozen, **local, **global_shared}
    if recipe.client_start:
        ctx = UpdateContext(global_shared, client=task.client)
        for step in recipe.client_start:
            weights = step.apply(weights, ctx)
        global_shared = {k: weights[k] for k in global_shared}
    return weights, global_shared


_PLAIN_LOADERS = (nn.Module._load_from_state_dict, _NormBase._load_from_state_dict)


def load_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """``model.load_state_dict(weights, strict=True)``, as one batched copy when that is what it
    amounts to: the same keys and shapes, and no module that loads or names its state its own
    way (hooks, a custom ``_load_from_state_dict``); otherwise ``load_state_dict`` itself (and
    its errors)."""
    for m in model.modules():
        if (
            type(m)._load_from_state_dict not in _PLAIN_LOADERS
            or m._load_state_dict_pre_hooks
            or m._load_state_dict_post_hooks
            or m._state_dict_hooks
            or m._state_dict_pre_hooks
        ):
            model.load_state_dict(weights, strict=True)
            return
    targets = model.state_dict()
    if targets.keys() != weights.keys() or any(
        t.shape != weights[k].shape for k, t in targets.items()
    ):
        model.load_state_dict(weights, strict=True)  # raises with its own message
        return
    with torch.no_grad():
        torch._foreach_copy_(list(targets.values()), [weights[k] for k in targets])


def _split_memory(memory: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The objective's part of a client's memory, and the client transforms' part."""
    ours = {k: v for k, v in memory.items() if k.startswith(TRANSFORM_MEMORY)}
    return {k: v for k, v in memory.items() if k not in ours}, ours


def _transform(
    recipe: Recipe, delta: dict[str, Tensor], memory: dict[str, Tensor], ctx: UpdateContext
) -> tuple[dict[str, Tensor], dict[str, Tensor], Metrics]:
    """Run the client transforms in order; their states are kept under ``transform/<i>/``
    (``init`` the first time a client holds none for a transform)."""
    kept: dict[str, Tensor] = {}
    metrics: Metrics = {}
    for i, t in enumerate(recipe.client_transforms):
        prefix = f"{TRANSFORM_MEMORY}{i}/"
        state = {k[len(prefix) :]: v for k, v in memory.items() if k.startswith(prefix)}
        out = t.apply(delta, state or t.init(ctx.params), ctx)
        delta = out.value
        kept.update({prefix + k: v for k, v in out.state.items()})
        metrics.update({f"transform/{i}/{k}": v for k, v in out.metrics.items()})
    return delta, kept, metrics
