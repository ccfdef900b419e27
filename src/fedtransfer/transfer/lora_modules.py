"""LoRA adapter modules (Hu et al., arXiv 2106.09685): wrappers, merging and key helpers."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtransfer.errors import PlanError

LoraKind = Literal["lora_A", "lora_B"]


class LoRAModule(nn.Module):
    """A frozen-friendly base layer plus a low-rank update ``(alpha / rank) · B @ A``.

    State-dict keys under the wrapper's path ``m``: ``m.lora_A`` (``rank × fan_in``),
    ``m.lora_B`` (``out × rank``), ``m.base.weight`` and ``m.base.bias`` (if any). ``A`` is
    drawn like PEFT (Kaiming-uniform, ``a = √5``) from ``generator``; ``B`` starts at zero, so a
    fresh wrapper computes exactly what its base computes.
    """

    base: nn.Linear | nn.Conv2d

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        fan_in: int,
        *,
        rank: int,
        alpha: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise PlanError(f"{type(self).__name__}: rank must be an integer >= 1, got {rank!r}")
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        like = base.weight
        a = torch.empty(rank, fan_in, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device=like.device, dtype=like.dtype))
        out_features = like.shape[0]
        self.lora_B = nn.Parameter(
            torch.zeros(out_features, rank, dtype=like.dtype, device=like.device)
        )

    def delta_weight(self) -> Tensor:
        """``(alpha / rank) · B @ A`` in the shape of ``base.weight``."""
        return (self.scaling * (self.lora_B @ self.lora_A)).reshape(self.base.weight.shape)

    def merged(self) -> nn.Linear | nn.Conv2d:
        """A copy of the base layer with the adapter folded into its weight."""
        plain = copy.deepcopy(self.base)
        with torch.no_grad():
            plain.weight.add_(self.delta_weight().to(plain.weight.dtype))
        return plain

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class LoRALinear(LoRAModule):
    """LoRA around an ``nn.Linear``: ``base(x) + (alpha / rank) · B(A(x))``.

    >>> import torch
    >>> from torch import nn
    >>> layer = LoRALinear(nn.Linear(4, 3), rank=2, alpha=4.0, generator=torch.Generator())
    >>> x = torch.randn(5, 4)
    >>> torch.equal(layer(x), layer.base(x))
    True
    """

    base: nn.Linear

    def __init__(
        self, base: nn.Linear, *, rank: int, alpha: float, generator: torch.Generator
    ) -> None:
        super().__init__(base, base.in_features, rank=rank, alpha=alpha, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoRAConv2d(LoRAModule):
    """LoRA around an ``nn.Conv2d``: ``A`` is a convolution with the base's kernel, stride,
    padding and dilation producing ``rank`` channels, ``B`` a 1×1 convolution back to
    ``out_channels``; ``lora_A`` is stored as ``rank × (in_channels · kh · kw)``.

    Grouped convolutions (``groups != 1``) are refused.
    """

    base: nn.Conv2d

    def __init__(
        self, base: nn.Conv2d, *, rank: int, alpha: float, generator: torch.Generator
    ) -> None:
        if base.groups != 1:
            raise PlanError(
                f"LoRAConv2d: grouped convolutions are not supported (groups={base.groups}, "
                "expected 1); hint: leave depthwise/grouped convolutions out of Lora.targets"
            )
        fan_in = base.in_channels * base.kernel_size[0] * base.kernel_size[1]
        super().__init__(base, fan_in, rank=rank, alpha=alpha, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        in_channels, (kh, kw) = self.base.in_channels, self.base.kernel_size
        down = self.lora_A.reshape(self.rank, in_channels, kh, kw)
        hidden = self.base._conv_forward(x, down, None)
        up = self.lora_B.reshape(self.lora_B.shape[0], self.rank, 1, 1)
        return self.base(x) + self.scaling * F.conv2d(hidden, up)


def wrap(module: nn.Module, *, rank: int, alpha: float, generator: torch.Generator) -> LoRAModule:
    """The LoRA wrapper for an ``nn.Linear`` or ``nn.Conv2d`` (exact types only)."""
    if type(module) is nn.Linear:
        return LoRALinear(module, rank=rank, alpha=alpha, generator=generator)
    if type(module) is nn.Conv2d:
        return LoRAConv2d(module, rank=rank, alpha=alpha, generator=generator)
    raise PlanError(f"LoRA wraps nn.Linear and nn.Conv2d, got {type(module).__name__}")


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (not the root) by ``module``."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def unwrapped_view(module: nn.Module) -> nn.Module:
    """``module`` as it was before LoRA: each wrapper replaced by its base layer.

    Shares every tensor and leaves ``module`` untouched (only containers on the way to a
    wrapper are shallow-copied), so selectors see the original key names and blocks.
    """
    if isinstance(module, LoRAModule):
        return module.base
    children = {
        name: None if child is None else unwrapped_view(child)
        for name, child in module._modules.items()
    }
    if all(children[name] is child for name, child in module._modules.items()):
        return module
    view = copy.copy(module)
    view.__dict__["_modules"] = children
    return view


def merge(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every LoRA wrapper folded back into a plain layer.

    The result has the original architecture and state-dict key names (export).
    """
    out = copy.deepcopy(model)
    if isinstance(out, LoRAModule):
        return out.merged()
    for path, module in list(out.named_modules()):
        if isinstance(module, LoRAModule):
            set_module(out, path, module.merged())
    return out


def lora_kind(key: str) -> LoraKind | None:
    """``"lora_A"`` or ``"lora_B"`` for a LoRA factor's state-dict key, else ``None``."""
    name = key.rpartition(".")[2]
    if name == "lora_A":
        return "lora_A"
    if name == "lora_B":
        return "lora_B"
    return None


def merged_state_dict(
    state_dict: Mapping[str, Tensor], *, alpha: float, rank: int
) -> dict[str, Tensor]:
    """The state dict :func:`merge` would give, computed from a prepared model's state dict
    (e.g. a server's global weights) without building the model.

    >>> import torch
    >>> sd = {"lora_A": torch.ones(1, 2), "lora_B": torch.ones(3, 1),
    ...       "base.weight": torch.zeros(3, 2), "base.bias": torch.zeros(3)}
    >>> merged = merged_state_dict(sd, alpha=2.0, rank=1)
    >>> list(merged), merged["weight"][0].tolist()
    (['weight', 'bias'], [2.0, 2.0])
    """
    scaling = alpha / rank
    prefixes = [k[: -len("lora_A")] for k in state_dict if lora_kind(k) == "lora_A"]
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix) :]
        if rest == "base.weight":
            a, b = state_dict[prefix + "lora_A"], state_dict[prefix + "lora_B"]
            delta = (scaling * (b @ a)).reshape(value.shape).to(value.dtype)
            out[prefix + "weight"] = value + delta
        elif rest.startswith("base."):
            out[prefix + rest.removeprefix("base.")] = value
    return out
