"""What comes back in a round: every reply decoded and validated, into the accepted updates
and the rejections (a reply that does not decode or validate is its client's rejection, never
the end of the round)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from fedtransfer.codecs import Payload
from fedtransfer.errors import FedTransferError, UpdateRejected
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import NO_REPLY, Reply
from fedtransfer.server.validate import validate_update
from fedtransfer.state import ServerState
from fedtransfer.transfer.plan import ParamPlan, per_client_rank
from fedtransfer.types import State

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Accepted:
    """One client's update that decoded and validated: its reply, the decoded update (in
    the global shapes) and the objective's decoded extras."""

    reply: Reply
    update: dict[str, Tensor]
    extras: State


@dataclass(frozen=True, eq=False)
class Collected:
    """A round's replies (in the order they were collected), the accepted updates among them,
    and the rejections as ``(client, reason)``."""

    replies: tuple[Reply, ...]
    accepted: tuple[Accepted, ...]
    rejected: tuple[tuple[str, str], ...]

    @property
    def bytes_up(self) -> int:
        return sum(rep.nbytes for rep in self.replies)


def answered(clients: Sequence[str], replies: Mapping[str, Reply]) -> list[Reply]:
    """The replies of ``clients`` in their order, a client without one given an error reply,
    then any reply that aggregates some of them (:attr:`Reply.covers`, a secure sum). A reply
    from anyone else is dropped: only the cohort is heard."""
    cohort = set(clients)
    sums = {n: rep for n, rep in replies.items() if n not in cohort}
    for name, rep in list(sums.items()):
        if not rep.covers or not set(rep.covers) <= cohort:
            log.warning("dropped a reply from %r, which is not in the round's cohort", name)
            del sums[name]
    covered = {c for rep in sums.values() for c in rep.covers}
    out = [
        replies.get(c) or Reply(c, b"", 0, error=NO_REPLY)
        for c in clients
        if c in replies or c not in covered
    ]
    return out + list(sums.values())


def heard(replies: Sequence[Reply]) -> set[str]:
    """The clients heard from through ``replies`` (an error reply included: the client
    answered)."""
    return {c for rep in replies if rep.error != NO_REPLY for c in rep.senders}


def collect(
    recipe: Recipe,
    state: ServerState,
    replies: Sequence[Reply],
    *,
    plan: ParamPlan,
) -> Collected:
    """Decode and validate ``replies`` for round ``state.round + 1``."""
    r = state.round + 1
    received, rejected = _decode(recipe, replies, r)
    extras_ref = recipe.objective.extras_like(state.params, plan)
    kept: list[Accepted] = []
    for a in received:
        client = a.reply.client
        try:
            validate_update(
                a.update, a.reply.num_examples, reference=state.params, client=client, round=r
            )
            validate_update(a.extras, 1, reference=extras_ref, client=client, round=r)
        except UpdateRejected as exc:
            log.warning("rejected update: %s", exc)
            rejected.append((client, str(exc)))
            continue
        kept.append(a)
    return Collected(tuple(replies), tuple(kept), tuple(rejected))


def _decode(
    recipe: Recipe, replies: Sequence[Reply], r: int
) -> tuple[list[Accepted], list[tuple[str, str]]]:
    """Decode every reply's update and extras; a payload that does not decode is a rejection."""
    received: list[Accepted] = []
    rejected: list[tuple[str, str]] = []
    per_client = per_client_rank(recipe.policy)
    for rep in replies:
        if rep.error:
            rejected.append((rep.client, f"client {rep.client}, round {r}: {rep.error}"))
            continue
        try:
            update = recipe.uplink.decode(Payload.from_bytes(rep.uplink))
            if per_client is not None:  # heterogeneous ranks: back to global shapes
                update = per_client.pad(update, rep.client)
            extras = recipe.uplink.decode(Payload.from_bytes(rep.extras)) if rep.extras else {}
        except (FedTransferError, RuntimeError, TypeError, ValueError, OverflowError) as exc:
            # whatever a client sends, a bad payload is that client's rejection, not the round's end
            why = f"client {rep.client}, round {r}: payload does not decode: {exc}"
            log.warning("rejected update: %s", why)
            rejected.append((rep.client, why))
            continue
        received.append(Accepted(rep, update, extras))
    return received, rejected
