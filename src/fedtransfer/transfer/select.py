"""The one selector grammar that every policy uses to pick state-dict keys.

A selector is a string:

* ``"head"`` — the last block (see below);
* ``"last:K"`` — the last ``K`` blocks;
* ``"type:Name"`` — keys owned by modules whose class (or a base class) is named ``Name``,
  e.g. ``"type:Linear"`` or ``"type:_BatchNorm"`` (every BatchNorm variant);
* anything else — a glob on dotted keys (``fnmatch``, case-sensitive); a glob that names a
  module (``"features.0"``) selects every key below it.

A *block* is a module that directly owns parameters or buffers, in registration order; a
normalisation layer joins the block before it, so a conv and its BatchNorm are one block.
"""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase

from torch import nn

from fedtransfer.errors import PlanError

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)


def module_keys(model: nn.Module) -> dict[str, list[str]]:
    """Map each module path that directly owns state-dict entries to its keys, in order."""
    out: dict[str, list[str]] = {}
    for key in model.state_dict():
        path = key.rpartition(".")[0]
        out.setdefault(path, []).append(key)
    return out


def blocks(model: nn.Module) -> list[list[str]]:
    """State-dict keys grouped into blocks (see module docstring)."""
    owned = module_keys(model)
    result: list[list[str]] = []
    for path, module in model.named_modules():
        keys = owned.get(path)
        if not keys:
            continue
        if isinstance(module, _NORM_TYPES) and result:
            result[-1].extend(keys)
        else:
            result.append(list(keys))
    return result


def select(model: nn.Module, selector: str) -> list[str]:
    """Keys of ``model.state_dict()`` picked by ``selector``, in state-dict order.

    Raises :class:`PlanError` when the selector is malformed or matches nothing.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> select(net, "head")
    ['2.weight', '2.bias']
    >>> select(net, "0")
    ['0.weight', '0.bias']
    """
    keys = list(model.state_dict())
    chosen = set(_match(model, selector, keys))
    if not chosen:
        raise PlanError(_no_match_message(model, selector, keys))
    return [k for k in keys if k in chosen]


def _match(model: nn.Module, selector: str, keys: list[str]) -> list[str]:
    if selector == "head":
        found = blocks(model)
        return found[-1] if found else []
    if selector.startswith("last:"):
        k = _parse_k(selector)
        found = blocks(model)
        if k > len(found):
            raise PlanError(
                f"selector {selector!r}: the model has only {len(found)} blocks, asked for {k}; "
                f"blocks start with {[b[0] for b in found]}"
            )
        return [key for block in found[-k:] for key in block]
    if selector.startswith("type:"):
        name = selector.removeprefix("type:")
        owned = module_keys(model)
        return [
            key
            for path, module in model.named_modules()
            if any(c.__name__ == name for c in type(module).__mro__)
            for key in owned.get(path, [])
        ]
    return [k for k in keys if fnmatchcase(k, selector) or fnmatchcase(k, selector + ".*")]


def _parse_k(selector: str) -> int:
    text = selector.removeprefix("last:")
    if not text.isdigit() or int(text) < 1:
        raise PlanError(f"selector {selector!r}: expected 'last:K' with an integer K >= 1")
    return int(text)


def _no_match_message(model: nn.Module, selector: str, keys: list[str]) -> str:
    top = [name for name, _ in model.named_children()]
    paths = sorted({k.rpartition(".")[0] for k in keys} | set(keys))
    near = difflib.get_close_matches(selector.removeprefix("type:"), paths, n=5, cutoff=0.4)
    if selector.startswith("type:"):
        types = sorted({type(m).__name__ for m in model.modules()})
        return f"selector {selector!r} matched no keys; module types in the model are {types}"
    hint = f"; near misses: {near}" if near else ""
    return f"selector {selector!r} matched no keys; top-level modules are {top}{hint}"
