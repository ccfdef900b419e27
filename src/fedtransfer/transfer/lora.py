"""``Lora``: low-rank adapters as a transfer policy, with FFA-LoRA (heterogeneous client ranks
are the wrappers of :mod:`fedtransfer.transfer.ranks`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from fedtransfer.errors import PlanError
from fedtransfer.seeding import generator
from fedtransfer.transfer.lora_modules import (
    LoRAConv2d,
    LoRALinear,
    LoRAModule,
    merge,
    merged_state_dict,
    set_module,
    unwrapped_view,
    wrap,
)
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.transfer.select import module_keys, select
from fedtransfer.types import Label

__all__ = ["LoRAConv2d", "LoRALinear", "LoRAModule", "Lora", "merge", "merged_state_dict"]

_WRAPPABLE = (nn.Linear, nn.Conv2d)
_KIND_SELECTORS = ("type:Linear", "type:Conv2d")


@dataclass(frozen=True)
class Lora:
    """LoRA (Hu et al., arXiv 2106.09685): frozen base weights, trained low-rank factors.

    ``targets`` (selectors, see :mod:`.select`) pick the ``nn.Linear`` / ``nn.Conv2d`` layers
    that get adapters, minus the layers ``train`` selects: those train fully and are shared
    (``train=("head",)`` for a new classifier). ``lora_A`` and ``lora_B`` are shared, all else
    frozen. With ``ffa`` (FFA-LoRA, Sun et al., arXiv 2403.12313) ``lora_A`` stays frozen at its
    seeded initialisation, identical on every client, so averaging ``B`` averages the clients'
    weight deltas ``B·A`` exactly. Clients of different ranks (HetLoRA) are a recipe wrapper:
    :func:`fedtransfer.algorithms.hetlora`.

    A target ``type:Linear`` / ``type:Conv2d`` may be absent from a model (the default works
    on MLPs and CNNs alike) as long as the targets together select some layer; any other
    target that selects no such layer is an error.

    >>> from torch import nn
    >>> policy = Lora(rank=2, train=("head",))
    >>> net = policy.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    >>> policy.plan(net).shared
    ('0.lora_A', '0.lora_B', '2.weight', '2.bias')
    >>> tuple(net[0].lora_A.shape), tuple(net[0].lora_B.shape)
    ((2, 4), (8, 2))
    """

    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = _KIND_SELECTORS
    train: tuple[str, ...] = ()
    ffa: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise PlanError(f"Lora: rank must be an integer >= 1, got {self.rank!r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise PlanError(f"Lora: alpha must be a number > 0, got {alpha!r}")
        if not math.isfinite(alpha):
            raise PlanError(f"Lora: alpha must be finite, got {alpha!r}")
        for name in ("targets", "train"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(s, str) for s in value):
                raise PlanError(
                    f"Lora: {name} must be a tuple of selector strings, got {value!r}; "
                    f"hint: {name}=('type:Linear',), not {name}='type:Linear'"
                )
        if not self.targets:
            raise PlanError("Lora: targets is empty; expected at least one selector")
        if not isinstance(self.ffa, bool):
            raise PlanError(f"Lora: ffa must be True or False, got {self.ffa!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PlanError(f"Lora: seed must be an integer, got {self.seed!r}")

    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap every target layer in place (idempotent) and return the model.

        ``lora_A`` is drawn from a generator seeded by ``(seed, layer path)``, so two fresh
        copies of a model prepare bit-identically.
        """
        for path in self._target_paths(model):
            layer = model.get_submodule(path) if path else model
            if isinstance(layer, LoRAModule):
                if (layer.rank, layer.alpha) != (self.rank, self.alpha):
                    raise PlanError(
                        f"Lora: layer {path or '<root>'!r} already has a LoRA adapter of rank "
                        f"{layer.rank}, alpha {layer.alpha}, not rank {self.rank}, alpha "
                        f"{self.alpha}; hint: every Lora stage of a schedule must use the same "
                        "rank and alpha (adapters are created once, by the first)"
                    )
                continue
            gen = generator(self.seed, "lora_A", path)
            wrapper = wrap(layer, rank=self.rank, alpha=self.alpha, generator=gen)
            if not path:
                return wrapper
            set_module(model, path, wrapper)
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        """LoRA factors shared (``lora_A`` frozen under ``ffa``), ``train`` keys shared, the
        rest frozen. ``model`` must have been prepared."""
        wrappers = [p for p, m in model.named_modules() if isinstance(m, LoRAModule)]
        missing = [p or "<root>" for p in self._target_paths(model) if p not in wrappers]
        if missing:
            raise PlanError(
                f"Lora: target layers {missing[:5]} have no LoRA adapter; "
                "hint: call Lora.prepare(model) before Lora.plan (Recipe.plan does both)"
            )
        labels: dict[str, Label] = {}
        for path in wrappers:
            prefix = f"{path}." if path else ""
            labels[prefix + "lora_A"] = "frozen" if self.ffa else "shared"
            labels[prefix + "lora_B"] = "shared"
        base_key = {_key(p, n): _key(p, f"base.{n}") for p in wrappers for n in ("weight", "bias")}
        view = unwrapped_view(model)
        for selector in self.train:
            for key in _select(view, selector, "train"):
                labels.setdefault(base_key.get(key, key), "shared")
        for key in model.state_dict():
            labels.setdefault(key, "frozen")
        return ParamPlan.for_model(model, labels)

    def _target_paths(self, model: nn.Module) -> list[str]:
        """Paths of the layers to adapt, in module order, resolved on the unwrapped model."""
        view = unwrapped_view(model)
        layers = dict(view.named_modules())
        owner = {k: path for path, keys in module_keys(view).items() for k in keys}
        trained = {owner[k] for s in self.train for k in _select(view, s, "train")}
        wrappable = [p for p, m in layers.items() if type(m) in _WRAPPABLE]
        chosen: set[str] = set()
        for selector in self.targets:
            if selector in _KIND_SELECTORS:  # may be absent: the default suits MLPs and CNNs
                chosen |= {p for p in wrappable if type(layers[p]).__name__ == selector[5:]}
                continue
            hits = {p for k in _select(view, selector, "targets") if (p := owner[k]) in wrappable}
            if not hits:
                raise PlanError(
                    f"Lora: target {selector!r} selects no nn.Linear or nn.Conv2d; the model's "
                    f"Linear/Conv2d layers are {wrappable[:10]}"
                )
            chosen |= hits
        paths = [p for p in wrappable if p in chosen and p not in trained]
        if not paths:
            raise PlanError(
                f"Lora: no layer to adapt: targets {self.targets} select "
                f"{sorted(chosen)[:10]} and train {self.train} selects {sorted(trained)[:10]}; "
                f"the model's Linear/Conv2d layers are {wrappable[:10]}"
            )
        return paths


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _select(view: nn.Module, selector: str, field: str) -> list[str]:
    try:
        return select(view, selector)
    except PlanError as exc:
        raise PlanError(f"Lora.{field}: {exc}") from None
