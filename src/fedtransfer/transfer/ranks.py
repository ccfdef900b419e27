"""Heterogeneous LoRA ranks (HetLoRA, Cho et al., arXiv 2401.06432) as three wrappers of a
recipe, so the round itself never asks about ranks.

The global adapter has rank ``rank``; client ``c`` holds only the first ``client_rank(c)``
slots (``ranks[sha256(c) mod len(ranks)]``):

- :class:`RankNarrow` (``Recipe.client_start``) zeroes the slots a client does not hold in
  the weights it trains from; with both slices zero their gradients are zero, so SGD leaves
  them zero and the client's adapter is exactly its rank;
- :class:`RankTrim` (the first client transform) cuts the update to the client's slots before the
  uplink, so a rank-1 client sends a rank-1 update;
- :class:`RankPad` (the first per-client server step) zero-pads each update back to the global shape
  before it is validated, so slots a client does not hold contribute a zero update to the
  weighted mean; an update of any other shape is that client's rejection.

:func:`fedtransfer.algorithms.hetlora` puts all three in a recipe whose policy is a
:class:`~fedtransfer.transfer.lora.Lora` of rank ``max(ranks)``; :func:`check` (called by
``Recipe.validate``) refuses a recipe that has some of them but not all, or whose ranks do
not fit its adapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from fedtransfer.errors import CompatibilityError, PlanError, UpdateRejected
from fedtransfer.transfer.lora import Lora
from fedtransfer.transfer.lora_modules import lora_kind
from fedtransfer.types import Out, Params, State, UpdateContext

if TYPE_CHECKING:
    from fedtransfer.recipe import Recipe

__all__ = ["RankNarrow", "RankPad", "RankTrim", "check", "client_rank", "slots_of"]


def client_rank(client: str, rank: int, ranks: tuple[int, ...]) -> int:
    """Client ``client``'s adapter rank: ``ranks[sha256(client) mod len(ranks)]``, or
    ``rank`` when ``ranks`` is empty.

    >>> client_rank("c0", 4, ()), client_rank("c0", 4, (1, 2, 4)) in (1, 2, 4)
    (4, True)
    """
    if not ranks:
        return rank
    digest = hashlib.sha256(client.encode("utf-8")).digest()
    return ranks[int.from_bytes(digest[:8], "big") % len(ranks)]


@dataclass(frozen=True)
class _Slots:
    """The settings the three steps share: the global ``rank`` and the clients' ``ranks``;
    each step acts on one client's weights or update, so it needs the client."""

    rank: int = 4
    ranks: tuple[int, ...] = (4,)
    needs: ClassVar[tuple[str, ...]] = ("client",)

    def __post_init__(self) -> None:
        self._check()

    def init(self, params: Params) -> State:
        """No state: the steps are pure functions of the client and the update."""
        return {}

    def _check(self) -> None:
        name, rank, ranks = type(self).__name__, self.rank, self.ranks
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise PlanError(f"{name}: rank must be an integer >= 1, got {rank!r}")
        if not isinstance(ranks, tuple) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranks
        ):
            raise PlanError(f"{name}: ranks must be a tuple of integers, got {ranks!r}")
        if not ranks:
            raise PlanError(f"{name}: ranks is empty; expected the clients' ranks, e.g. (2, 4)")
        bad = [r for r in ranks if not 1 <= r <= rank]
        if bad:
            raise PlanError(f"{name}: ranks {bad} are outside 1..rank={rank}")
        if max(ranks) != rank:
            raise PlanError(
                f"{name}: max(ranks) = {max(ranks)} but rank = {rank}; the global adapter "
                f"has the largest client rank, hint: {name}(rank={max(ranks)}, ranks={ranks})"
            )

    def client_rank(self, client: str) -> int:
        """Client ``client``'s adapter rank (:func:`client_rank`)."""
        return client_rank(client, self.rank, self.ranks)

    def _client(self, ctx: UpdateContext) -> str:
        if ctx.client is None:
            raise CompatibilityError(
                f"{type(self).__name__}: no client in its context; it acts on one client's "
                "weights or update (client_start, client_transforms or pipeline.per_client)"
            )
        return ctx.client


@dataclass(frozen=True)
class RankNarrow(_Slots):
    """The weights a client trains from, with ``lora_A`` rows and ``lora_B`` columns from its
    rank on set to zero (frozen and shared keys alike: under FFA-LoRA ``lora_A`` is frozen).

    >>> import torch
    >>> step = RankNarrow(rank=2, ranks=(1, 2))
    >>> w = {"0.lora_A": torch.ones(2, 3), "0.lora_B": torch.ones(3, 2)}
    >>> r = step.client_rank("c0")
    >>> out = step.apply(w, UpdateContext({}, client="c0"))
    >>> int(out["0.lora_A"].sum()) == 3 * r, int(out["0.lora_B"].sum()) == 3 * r
    (True, True)
    """

    def apply(self, weights: Params, ctx: UpdateContext) -> dict[str, Tensor]:
        r, out = self.client_rank(self._client(ctx)), dict(weights)
        for key, value in weights.items():
            kind = lora_kind(key)
            if kind is not None:
                narrowed = value.detach().clone()
                if kind == "lora_A":
                    narrowed[r:] = 0
                else:
                    narrowed[:, r:] = 0
                out[key] = narrowed
        return out


@dataclass(frozen=True)
class RankTrim(_Slots):
    """A client's update with ``lora_A`` cut to its first ``client_rank`` rows and ``lora_B``
    to as many columns; other keys unchanged. Stateless."""

    def apply(self, update: Params, state: State, ctx: UpdateContext) -> Out[dict[str, Tensor]]:
        r, out = self.client_rank(self._client(ctx)), dict(update)
        for key, value in update.items():
            kind = lora_kind(key)
            if kind == "lora_A":
                out[key] = value[:r].clone()
            elif kind == "lora_B":
                out[key] = value[:, :r].clone()
        return Out(out, state)


@dataclass(frozen=True)
class RankPad(_Slots):
    """A trimmed update back at full rank, zeros in the slots its client does not hold.

    Raises :class:`~fedtransfer.errors.UpdateRejected` when a LoRA key's shape is not the
    trimmed shape for this client (checked against the global shapes in ``ctx.params``).
    Stateless."""

    def apply(self, update: Params, state: State, ctx: UpdateContext) -> Out[dict[str, Tensor]]:
        client = self._client(ctx)
        return Out(self.pad(update, client, reference=ctx.params), state)

    def pad(
        self,
        update: Mapping[str, Tensor],
        client: str,
        *,
        reference: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """``update`` at full rank (the attack simulation pads with this too)."""
        r, out = self.client_rank(client), dict(update)
        for key, value in update.items():
            kind = lora_kind(key)
            if kind is None:
                continue
            expected = self._trimmed_shape(kind, key, value, r, reference)
            if not isinstance(value, Tensor) or tuple(value.shape) != expected:
                seen = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise UpdateRejected(
                    f"client {client}: {key!r} has shape {seen}, expected {expected} (a rank-{r} "
                    f"slice of the rank-{self.rank} adapter)",
                    client=client,
                )
            if kind == "lora_A":
                out[key] = value.new_zeros((self.rank, value.shape[1]))
                out[key][:r] = value
            else:
                out[key] = value.new_zeros((value.shape[0], self.rank))
                out[key][:, :r] = value
        return out

    def _trimmed_shape(
        self,
        kind: str,
        key: str,
        value: object,
        r: int,
        reference: Mapping[str, Tensor] | None,
    ) -> tuple[int, ...]:
        """The exact shape client rank ``r`` must send for ``key``."""
        if reference is not None and key in reference:
            full = tuple(reference[key].shape)
        elif isinstance(value, Tensor) and value.ndim == 2:
            full = (self.rank, value.shape[1]) if kind == "lora_A" else (value.shape[0], self.rank)
        else:
            full = (self.rank, -1) if kind == "lora_A" else (-1, self.rank)
        return (r, *full[1:]) if kind == "lora_A" else (*full[:-1], r)


def slots_of(recipe: Recipe) -> tuple[RankPad, RankTrim] | None:
    """The recipe's rank pad and trim, when it has heterogeneous ranks (for a wrapper that
    must see every update in the global shapes and send it back trimmed: the attack
    simulation)."""
    pads = [t for t in recipe.pipeline.per_client if isinstance(t, RankPad)]
    trims = [t for t in recipe.client_transforms if isinstance(t, RankTrim)]
    return (pads[0], trims[0]) if pads and trims else None


def check(recipe: Recipe) -> None:
    """All three steps or none, with the same ranks, on a LoRA adapter of rank ``rank``."""
    steps: dict[str, list[_Slots]] = {
        "client_start": [t for t in recipe.client_start if isinstance(t, RankNarrow)],
        "client_transforms": [t for t in recipe.client_transforms if isinstance(t, RankTrim)],
        "pipeline.per_client": [t for t in recipe.pipeline.per_client if isinstance(t, RankPad)],
    }
    found = [s for group in steps.values() for s in group]
    if not found:
        return
    missing = [g for g, group in steps.items() if len(group) != 1]
    settings = {(s.rank, s.ranks) for s in found}
    if missing or len(settings) != 1:
        raise CompatibilityError(
            f"Recipe: heterogeneous LoRA ranks need exactly one RankNarrow (client_start), one "
            f"RankTrim (client_transforms) and one RankPad (pipeline.per_client) with the same "
            f"rank and ranks; got {found!r}; hint: build the recipe with hetlora(recipe, "
            "ranks=...)"
        )
    rank = found[0].rank
    if not isinstance(recipe.policy, Lora) or recipe.policy.rank != rank:
        raise CompatibilityError(
            f"Recipe: heterogeneous ranks up to {rank} need a Lora policy of rank {rank}, got "
            f"{recipe.policy!r}; hint: policy=Lora(rank={rank}, ...)"
        )
    if [type(t).__name__ for t in recipe.pipeline.per_client][:1] != ["RankPad"]:
        raise CompatibilityError(
            "Recipe: RankPad must be the first per-client step (the others see updates in the "
            f"global shapes); got pipeline.per_client={recipe.pipeline.per_client!r}"
        )
    if [type(t).__name__ for t in recipe.client_transforms][:1] != ["RankTrim"]:
        raise CompatibilityError(
            "Recipe: RankTrim must be the first client transform (the others, error feedback "
            f"included, see the update the client sends); got "
            f"client_transforms={recipe.client_transforms!r}"
        )
