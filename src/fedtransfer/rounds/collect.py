"""What comes back in a round: every reply decoded and validated, into the accepted updates
and the rejections (a reply that does not decode or validate is its client's rejection, never
the end of the round)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from fedtransfer.codecs import Payload
from fedtransfer.errors import FedTransferError, UpdateRejected
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import NEEDS_SETUP, NO_REPLY, Reply
from fedtransfer.server.validate import validate_update
from fedtransfer.state import ServerState
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.types import Metrics, Params, State, UpdateContext

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
    the rejections as ``(client, reason)``, and the server pipeline's state and metrics after
    its per-client steps saw the accepted updates (``server``, ``metrics``)."""

    replies: tuple[Reply, ...]
    accepted: tuple[Accepted, ...]
    rejected: tuple[tuple[str, str], ...]
    server: State = field(default_factory=dict)
    metrics: Metrics = field(default_factory=dict)

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
    answered; not one that begins with ``NO_REPLY``: it never got the request)."""
    return {c for rep in replies if not rep.error.startswith(NO_REPLY) for c in rep.senders}


def lost(replies: Sequence[Reply]) -> set[str]:
    """The clients that say they hold no starting weights (``NEEDS_SETUP``)."""
    return {rep.client for rep in replies if rep.error.startswith(NEEDS_SETUP)}


def collect(
    recipe: Recipe,
    state: ServerState,
    replies: Sequence[Reply],
    *,
    plan: ParamPlan,
    example_counts: Callable[[str], float | None] | None = None,
) -> Collected:
    """Decode ▸ admit (the pipeline's per-client steps) ▸ validate ``replies`` for round
    ``state.round + 1``, within the recipe's :class:`~fedtransfer.server.validate.UpdateLimits`
    (``example_counts``: a client's example count as the server knows it, the bound of its
    weight). A reply that fails any of them is its client's rejection, and the per-client
    steps' state is kept only for the updates accepted."""
    r = state.round + 1
    extras_ref = recipe.objective.extras_like(state.params, plan)
    pipeline = recipe.pipeline
    server = state.server
    summed: Metrics = {}
    kept: list[Accepted] = []
    rejected: list[tuple[str, str]] = []
    for rep in replies:
        client = rep.client
        if rep.error:
            rejected.append((client, f"client {client}, round {r}: {rep.error}"))
            continue
        try:
            update, extras = _decoded(recipe, rep, state.params, extras_ref)
        except (FedTransferError, RuntimeError, TypeError, ValueError, OverflowError) as exc:
            # whatever a client sends, a bad payload is that client's rejection, not the round's end
            why = f"client {client}, round {r}: payload does not decode: {exc}"
            log.warning("rejected update: %s", why)
            rejected.append((client, why))
            continue
        try:
            admitted = pipeline.admit(update, server, UpdateContext(state.params, client=client))
            validate_update(
                admitted.value,
                rep.num_examples,
                reference=state.params,
                client=client,
                round=r,
                limits=recipe.limits,
                known_weight=None if example_counts is None else example_counts(client),
            )
            validate_update(extras, 1, reference=extras_ref, client=client, round=r)
        except UpdateRejected as exc:
            log.warning("rejected update: %s", exc)
            rejected.append((client, str(exc)))
            continue
        except (FedTransferError, RuntimeError, TypeError, ValueError, OverflowError) as exc:
            why = f"client {client}, round {r}: a per-client server step refused it: {exc}"
            log.warning("rejected update: %s", why)
            rejected.append((client, why))
            continue
        kept.append(Accepted(rep, admitted.value, extras))
        server = admitted.state
        for k, v in admitted.metrics.items():
            summed[k] = summed.get(k, 0.0) + v
    return Collected(tuple(replies), tuple(kept), tuple(rejected), server, summed)


def _decoded(
    recipe: Recipe, rep: Reply, expected: Params, extras_expected: Params
) -> tuple[dict[str, Tensor], State]:
    """A reply's update and objective extras, as the uplink codec decodes them: only the keys,
    dtypes and sizes the plan expects (refused before anything is allocated for them)."""
    update = recipe.uplink.decode(Payload.from_bytes(rep.uplink), expected)
    extras = (
        recipe.uplink.decode(Payload.from_bytes(rep.extras), extras_expected) if rep.extras else {}
    )
    return update, extras
