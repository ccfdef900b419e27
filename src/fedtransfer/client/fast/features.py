"""Frozen-trunk feature caching: a frozen trunk computes the same features every round, so a
worker computes them once per client and trains only the head on them (a fast path of
:mod:`fedtransfer.client.fast` whose tolerance is zero: the same bits as the whole model)."""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.client.train import LocalTraining, local_train, set_modes
from fedtransfer.data.federated import TensorData
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.types import Metrics

BUDGET_BYTES = 512 * 1024 * 1024
"""Cached features a worker keeps in memory at most; past it, the least recently used spill to
memory-mapped files (the operating system pages them in and out)."""

DISK_BUDGET_BYTES = 16 * 1024**3
"""Spilled features a worker keeps on disk at most (least recently used first out)."""

SPILL_DIR_ENV = "FEDTRANSFER_FEATURE_SPILL_DIR"
"""Where spilled features go (a fresh folder inside it per process); default: the system's
temporary folder. Each process removes its own folder at exit."""

_WORKER = threading.local()


@dataclass(frozen=True)
class _Entry:
    data: Tensor  # held so that its id stays unique while the entry lives
    features: Tensor
    file: Path | None = None  # spilled: ``features`` maps this file


class _Spill:
    """This process's spill folder, made on first use and removed at exit."""

    _dir: Path | None = None
    _lock = threading.Lock()
    _count = itertools.count()

    @classmethod
    def new_file(cls) -> Path:
        with cls._lock:
            if cls._dir is None or not cls._dir.is_dir():
                root = os.environ.get(SPILL_DIR_ENV) or None
                cls._dir = Path(tempfile.mkdtemp(prefix="fedtransfer-features-", dir=root))
                atexit.register(shutil.rmtree, cls._dir, True)
            return cls._dir / f"{os.getpid()}-{next(cls._count)}.bin"


def _spill(entry: _Entry) -> _Entry:
    """``entry`` with its features written to a file and mapped back (same values)."""
    features = entry.features.contiguous()
    path = _Spill.new_file()
    raw = features.reshape(-1).view(torch.uint8)
    raw.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=True, size=raw.numel(), dtype=torch.uint8)
    return _Entry(entry.data, mapped.view(features.dtype).reshape(features.shape), path)


def _drop(entry: _Entry) -> None:
    if entry.file is not None:
        entry.file.unlink(missing_ok=True)


def _fit(cache: OrderedDict[tuple[int, str, str], _Entry]) -> None:
    """Keep the cache within its budgets: spill the least recently used in-memory entries
    (never the newest), then drop the least recently used spilled ones."""
    in_memory = sum(e.features.nbytes for e in cache.values() if e.file is None)
    for key in list(cache)[:-1]:
        if in_memory <= BUDGET_BYTES:
            break
        entry = cache[key]
        if entry.file is None:
            cache[key] = _spill(entry)
            in_memory -= entry.features.nbytes
    on_disk = sum(e.features.nbytes for e in cache.values() if e.file is not None)
    for key in list(cache)[:-1]:
        if on_disk <= DISK_BUDGET_BYTES:
            break
        if cache[key].file is not None:
            on_disk -= cache[key].features.nbytes
            _drop(cache.pop(key))


@contextmanager
def no_feature_cache() -> Iterator[None]:
    """Train without the cache in this block (for comparisons and benchmarks)."""
    before = getattr(_WORKER, "off", False)
    _WORKER.off = True
    try:
        yield
    finally:
        _WORKER.off = before


def enabled() -> bool:
    """Whether the cache serves this thread (it does unless in :func:`no_feature_cache`)."""
    return not getattr(_WORKER, "off", False)


def head_path(model: nn.Module, plan: ParamPlan) -> str | None:
    """The module that holds every key not frozen, if that is a proper submodule (else None)."""
    free = [k.split(".")[:-1] for k, label in plan.labels.items() if label != "frozen"]
    if not free:
        return None
    common: list[str] = []
    for parts in zip(*free, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or None


def train_head_cached(
    model: nn.Module,
    plan: ParamPlan,
    data: TensorData,
    spec: LocalTraining,
    *,
    generator: torch.Generator,
    trunk: str = "",
) -> Metrics | None:
    """``local_train`` of a model whose only trainable part is its final module (the head),
    on cached features of the frozen trunk; ``None`` when that does not apply exactly (then
    the caller trains the whole model). Same minibatches from ``generator``, same results.

    ``trunk`` names the trunk's weights (the run's starting-weights hash: every key outside
    the head is frozen, so it comes from the starting weights); empty, they are hashed here.
    """
    found = _head_features(model, plan, data, trunk)
    if found is None:
        return None
    path, head, features = found
    prefix = path + "."
    labels = {k[len(prefix) :]: v for k, v in plan.labels.items() if k.startswith(prefix)}
    head_plan = ParamPlan.for_model(head, labels)
    metrics = local_train(head, head_plan, TensorData(features, data.y), spec, generator=generator)
    model.eval()
    return metrics


@torch.no_grad()
def evaluate_cached(
    model: nn.Module, plan: ParamPlan, data: TensorData, *, trunk: str = ""
) -> dict[str, float] | None:
    """:func:`~fedtransfer.client.evaluate.evaluate` of a model whose only non-frozen part is
    its final module, from the frozen trunk's cached features of ``data`` (computed once per
    evaluation set and trunk); ``None`` when that does not apply exactly (then evaluate the
    whole model). ``trunk`` names the frozen weights' hash, as in :func:`train_head_cached`
    (empty: hashed here)."""
    found = _head_features(model, plan, data, trunk)
    if found is None:
        return None
    _, head, features = found
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), 1024):
        logits = head(features[start : start + 1024])
        y = data.y[start : start + 1024]
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    n = len(data)
    return {"loss": loss_sum / n, "accuracy": correct / n, "examples": float(n)}


def _head_features(
    model: nn.Module, plan: ParamPlan, data: TensorData, trunk: str
) -> tuple[str, nn.Module, Tensor] | None:
    """The head's path, the head, and its cached inputs for ``data``; None when the model is
    not a frozen trunk feeding a trainable final module (or caching is off)."""
    path = head_path(model, plan)
    if path is None or not enabled() or len(data) == 0:
        return None
    head = model.get_submodule(path)
    features = _features(model, plan, head, path, data, trunk)
    return None if features is None else (path, head, features)


def _features(
    model: nn.Module, plan: ParamPlan, head: nn.Module, path: str, data: TensorData, trunk: str
) -> Tensor | None:
    if not trunk:
        frozen = set(plan.frozen)
        trunk = tree.sha256({k: v for k, v in model.state_dict().items() if k in frozen})
    key = (id(data.x), path, trunk)
    cache: OrderedDict[tuple[int, str, str], _Entry] = _cache()
    hit = cache.get(key)
    if hit is not None and hit.data is data.x:
        cache.move_to_end(key)
        return hit.features
    features = _compute(model, plan, head, data.x)
    if features is None:
        return None
    if hit is not None:
        _drop(hit)
    cache[key] = _Entry(data.x, features)
    _fit(cache)
    return features


def _cache() -> OrderedDict[tuple[int, str, str], _Entry]:
    cache = getattr(_WORKER, "features", None)
    if cache is None:
        cache = _WORKER.features = OrderedDict()
    return cache


def _compute(model: nn.Module, plan: ParamPlan, head: nn.Module, x: Tensor) -> Tensor | None:
    """The head's inputs for ``x``, with the trunk in the modes training gives it; None unless
    the head is the model's last step and the trunk is deterministic (no active dropout …)."""
    captured: list[Tensor | None] = []

    def capture(_m: nn.Module, args: tuple[object, ...], _o: object) -> None:
        # a head called with anything but one tensor (keywords, several inputs) is not cached
        first = args[0] if len(args) == 1 else None
        captured.append(first.detach() if isinstance(first, Tensor) else None)

    hook = head.register_forward_hook(capture)
    rng = torch.default_generator.get_state()  # probing must not move a dropout's draws
    try:
        set_modes(model, plan)
        head.eval()  # the head must not update its own statistics while features are read
        with torch.no_grad():
            probe = x[:2]
            first = model(probe)
            again = model(probe)
            head_in = captured[0] if len(captured) == 2 else None
            exact = (
                head_in is not None
                and isinstance(first, Tensor)
                and torch.equal(first, again)
                and torch.equal(head(head_in), first)
            )
            if not exact:
                return None
            captured.clear()
            parts = []
            for i in range(0, len(x), 256):
                model(x[i : i + 256])
                part = captured[-1]
                assert part is not None  # the probe saw a single tensor input
                parts.append(part)
    finally:
        hook.remove()
        model.eval()
        torch.default_generator.set_state(rng)
    return torch.cat(parts)
