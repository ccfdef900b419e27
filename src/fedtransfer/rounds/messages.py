"""``Request`` / ``Reply`` / ``Send``: the one seam between a round and its clients.

The simulator (:mod:`fedtransfer.rounds.simulate`), a Flower deployment
(:mod:`fedtransfer.deploy`) and the wrappers around either are all a :data:`Send`; the round
itself (:func:`fedtransfer.rounds.spine.server_round`) is the same function over each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from fedtransfer.types import Metrics

NO_REPLY = "no reply (the client failed or timed out)"
"""The rejection reason of a cohort client the :data:`Send` returned no reply for."""

NEEDS_SETUP = "needs set-up: "
"""How the ``error`` of a client that holds no starting weights begins (a deployed client
restarted on a new machine, with the same key): the server sets it up again next time."""

FAILED = "failed: "
"""How the ``error`` of a client whose round raised begins (its training, a bad batch …):
that client's rejection, never the end of the round."""


@dataclass(frozen=True, eq=False)
class Request:
    """What the server sends one client for one round: the encoded global shared keys
    (``downlink``) and objective ``broadcast``, the starting weights on the client's first
    round (``setup``, checked against ``start_sha256``), a stage ``handover``, and the numbers
    that seed its work."""

    client: str
    round: int
    seed: int
    stage: int
    start_sha256: str
    downlink: bytes
    broadcast: bytes | None = None
    setup: bytes | None = None
    handover: bytes | None = None

    @property
    def nbytes(self) -> int:
        """Payload bytes (what the ledger counts for this client, set-up included)."""
        return sum(
            len(b or b"") for b in (self.downlink, self.broadcast, self.setup, self.handover)
        )


@dataclass(frozen=True, eq=False)
class Reply:
    """What a client sends back: its encoded update and the objective's encoded extras, its
    weight (``num_examples``) and metrics, or the ``error`` that kept it from sending an
    update (the server rejects the reply with that reason).

    ``local`` and ``memory`` are what the client keeps (its local keys, its objective and
    transform memory). They never travel: only the in-process :data:`Send` fills them, because
    in simulation the server state stands in for the clients' storage; a deployed client keeps
    them itself and replies without them.
    """

    client: str
    uplink: bytes
    num_examples: int
    local: dict[str, Tensor] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=dict)
    extras: bytes = b""
    memory: dict[str, Tensor] = field(default_factory=dict)
    error: str = ""
    wire_bytes: int | None = None
    """What the reply cost on the wire, where that is not its payloads' bytes (a secure sum
    stands for every client's protocol messages)."""
    covers: tuple[str, ...] = ()
    """The cohort clients whose updates this one reply aggregates (a secure sum); empty for a
    client's own reply."""

    @property
    def senders(self) -> tuple[str, ...]:
        """The clients heard from through this reply."""
        return self.covers or (self.client,)

    @property
    def nbytes(self) -> int:
        """Bytes sent up (what the ledger counts): the payloads', unless ``wire_bytes``."""
        if self.wire_bytes is not None:
            return self.wire_bytes
        return len(self.uplink) + len(self.extras)


Send = Callable[[Sequence[Request]], Mapping[str, Reply]]
"""The transport: deliver the requests, return the replies that came back, by client (a
client that does not answer is missing from the mapping)."""
