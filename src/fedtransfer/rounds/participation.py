"""Who takes part in a simulated synchronous round: seeded per-client availability
(``dropout``), per-client speeds (``delays``, stragglers) and a round ``deadline``, as a
wrapper of the round's :data:`~fedtransfer.rounds.messages.Send` — a client that drops out or
would answer after the deadline gets no reply in, named in the round's rejections.

A round with fewer accepted updates than ``Recipe.limits.min_responses`` leaves the model
unchanged (:func:`~fedtransfer.rounds.finalize.aggregate`), in simulation and deployment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedtransfer.errors import ConfigError
from fedtransfer.rounds.messages import NO_REPLY, Reply, Request, Send
from fedtransfer.seeding import generator

__all__ = ["ClientDelays", "Participation"]


@dataclass(frozen=True)
class ClientDelays:
    """Simulated training times: client ``c``'s job takes ``speed_c · Exp(mean)``, with a
    per-client speed ``exp(spread · z_c)``, ``z_c ~ N(0, 1)`` drawn once per run (stragglers).

    >>> d = ClientDelays(mean=2.0, spread=0.0)
    >>> d.duration("c1", seed=0, job=3) == d.duration("c1", seed=0, job=3)
    True
    """

    mean: float = 1.0
    spread: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.mean < math.inf:
            raise ConfigError(f"ClientDelays: mean must be finite and > 0, got {self.mean}")
        if not 0 <= self.spread < math.inf:
            raise ConfigError(f"ClientDelays: spread must be finite and >= 0, got {self.spread}")

    def duration(self, client: str, *, seed: int, job: int) -> float:
        speed = math.exp(
            self.spread * float(torch.randn((), generator=generator(seed, "speed", client)))
        )
        u = float(torch.rand((), generator=generator(seed, "delay", client, job)))
        return speed * self.mean * -math.log1p(-u)


@dataclass(frozen=True)
class Participation:
    """Client ``c`` drops out of round ``r`` with probability ``dropout`` (drawn from ``(run
    seed, "dropout", r, c)``: the same in every rerun and on every runtime); with ``delays``
    and a ``deadline``, a client whose simulated training time in round ``r``
    (``delays.duration(c, job=r)``) exceeds the deadline answers too late. Neither's update
    is waited for; both are named in the round's rejections and counted in its metrics
    (``participation/dropped``, ``participation/late``).

    >>> p = Participation(dropout=0.5)
    >>> p.absent(["a", "b", "c", "d"], seed=0, round=1) == p.absent(["a", "b", "c", "d"], seed=0, round=1)
    True
    """

    dropout: float = 0.0
    delays: ClientDelays | None = None
    deadline: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Participation: dropout must be in [0, 1), got {self.dropout!r}")
        if self.deadline is not None and not 0 < self.deadline < math.inf:
            raise ConfigError(
                f"Participation: deadline must be finite and > 0 (simulated seconds), got "
                f"{self.deadline!r}"
            )
        if (self.deadline is None) != (self.delays is None):
            raise ConfigError(
                "Participation: a deadline needs client delays and delays need a deadline; "
                "hint: participation={delays: {mean: 1.0, spread: 1.0}, deadline: 2.0}"
            )

    def absent(self, clients: Sequence[str], *, seed: int, round: int) -> dict[str, str]:
        """The clients of ``clients`` that give no update in ``round``, with why."""
        out: dict[str, str] = {}
        for c in clients:
            if (
                self.dropout
                and float(torch.rand((), generator=generator(seed, "dropout", round, c)))
                < self.dropout
            ):
                out[c] = f"dropped out (participation.dropout = {self.dropout:g})"
                continue
            if self.delays is not None and self.deadline is not None:
                took = self.delays.duration(c, seed=seed, job=round)
                if took > self.deadline:
                    out[c] = (
                        f"late: {took:.3g} s of simulated training, past the {self.deadline:g} s "
                        "deadline"
                    )
        return out

    def around(self, send: Send, *, seed: int, round: int) -> Send:
        """``send`` to the clients that take part; the others answer with their reason."""

        def participating(requests: Sequence[Request]) -> Mapping[str, Reply]:
            absent = self.absent([q.client for q in requests], seed=seed, round=round)
            replies = dict(send([q for q in requests if q.client not in absent]))
            replies.update(
                {c: Reply(c, b"", 0, error=f"{NO_REPLY}: {why}") for c, why in absent.items()}
            )
            return replies

        return participating
