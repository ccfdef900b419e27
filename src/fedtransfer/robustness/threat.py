"""``Threat``: malicious clients around a round's :data:`~fedtransfer.rounds.messages.Send`,
like a Flower mod: their data is poisoned before they train, their updates replaced after
they reply. The round itself never knows."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedtransfer.codecs import Payload
from fedtransfer.data.federated import FederatedDataset, TensorData
from fedtransfer.errors import ConfigError, FedTransferError, PayloadError
from fedtransfer.recipe import Recipe
from fedtransfer.robustness.attacks import Attack
from fedtransfer.rounds.messages import Reply, Request, Send
from fedtransfer.rounds.simulate import InProcess
from fedtransfer.seeding import generator as seeded_generator
from fedtransfer.state import ServerState
from fedtransfer.transfer.ranks import slots_of
from fedtransfer.types import UpdateContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Threat:
    """Which clients are malicious and what they do: ``fraction`` of the population, chosen by seed.

    >>> from fedtransfer.robustness.attacks import SignFlip
    >>> threat = Threat(SignFlip(), fraction=0.25)
    >>> len(threat.malicious([f"c{i}" for i in range(8)], seed=0))
    2
    """

    attack: Attack
    fraction: float

    def __post_init__(self) -> None:
        if not isinstance(self.attack, Attack):
            raise ConfigError(
                f"Threat: attack must implement Attack (poison and corrupt), got "
                f"{type(self.attack).__name__}; hint: e.g. SignFlip() or LabelFlip()"
            )
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ConfigError(
                f"Threat: fraction must be in [0, 1), got {f!r}; hint: the share of the "
                "population that is malicious, e.g. 0.2"
            )

    def malicious(self, population: Sequence[str], *, seed: int) -> frozenset[str]:
        """``floor(fraction × N)`` client ids from a permutation seeded by ``(seed, "threat")``."""
        count = math.floor(self.fraction * len(population) + 1e-9)
        order = torch.randperm(len(population), generator=seeded_generator(seed, "threat"))
        return frozenset(population[i] for i in order[:count].tolist())

    def around(
        self,
        send: InProcess,
        recipe: Recipe,
        state: ServerState,
        *,
        population: FederatedDataset,
        malicious: frozenset[str],
    ) -> Send:
        """``send`` (the simulated clients of round ``state.round + 1`` under ``recipe``) with
        the ``malicious`` clients attacking: they train on poisoned data (seeded by
        ``(seed, "poison", round, client)``), and the updates they send are replaced by the
        attack's (seeded by ``(seed, "attack", round)``), re-encoded with the uplink."""
        r = state.round + 1

        def data(client: str) -> TensorData:
            clean = population.train[client]
            if client not in malicious:
                return clean
            gen = seeded_generator(state.seed, "poison", r, client)
            return self.attack.poison(clean, num_classes=population.num_classes, generator=gen)

        poisoned = replace(send, data=data)

        def threatened(requests: Sequence[Request]) -> Mapping[str, Reply]:
            replies = poisoned(requests)
            order = [replies[q.client] for q in requests if q.client in replies]
            return {rep.client: rep for rep in self._corrupt(recipe, order, malicious, state, r)}

        return threatened

    def _corrupt(
        self,
        recipe: Recipe,
        replies: list[Reply],
        malicious: frozenset[str],
        state: ServerState,
        r: int,
    ) -> list[Reply]:
        """The replies with the malicious clients' updates replaced; the attack sees every
        update that decodes (in the global shapes), in the cohort's order."""
        slots = slots_of(recipe)  # heterogeneous LoRA ranks: the attack sees global shapes
        decoded: dict[str, dict[str, Tensor]] = {}
        for rep in replies:
            if rep.error:
                continue
            try:
                update = recipe.uplink.decode(Payload.from_bytes(rep.uplink), state.params)
                if slots is not None:
                    update = slots[0].pad(update, rep.client)
            except (FedTransferError, RuntimeError, TypeError, ValueError, OverflowError):
                continue  # the round rejects it
            decoded[rep.client] = update
        if not decoded:
            return replies
        clients = list(decoded)
        replaced = self.attack.corrupt(
            [decoded[c] for c in clients],
            [c in malicious for c in clients],
            generator=seeded_generator(state.seed, "attack", r),
        )
        new = {c: u for c, u in zip(clients, replaced, strict=True) if u is not decoded[c]}
        out = []
        for rep in replies:
            if rep.client not in new:
                out.append(rep)
                continue
            update = new[rep.client]
            if slots is not None:
                update = slots[1].apply(update, {}, UpdateContext({}, client=rep.client)).value
            try:
                out.append(replace(rep, uplink=recipe.uplink.encode(update).to_bytes()))
            except PayloadError as exc:
                why = f"its (attacked) update does not encode with {recipe.uplink!r}: {exc}"
                out.append(replace(rep, uplink=b"", error=why))
        return out
