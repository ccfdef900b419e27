"""``server_round`` over a ``Send``: the in-process clients, a hand-written transport, the
replies it may or may not get back, and what the spine makes of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from fedtransfer import tree
from fedtransfer.data.federated import FederatedDataset
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.collect import answered, heard
from fedtransfer.rounds.messages import NO_REPLY, Reply, Request, Send
from fedtransfer.rounds.simulate import InProcess
from fedtransfer.rounds.spine import open_round, run_round, server_round
from fedtransfer.runtime.serial import SerialRuntime
from fedtransfer.state import ServerState


@dataclass(frozen=True)
class Opened:
    """Round 1 of the tiny recipe, opened: its recipe, state and cohort, and the in-process
    clients (``send``)."""

    recipe: Recipe
    state: ServerState
    cohort: list[str]
    send: InProcess
    model_fn: Callable[[], nn.Module]

    def round(self, send: Send, cohort: Sequence[str] | None = None):  # type: ignore[no-untyped-def]
        return server_round(
            self.recipe,
            self.state,
            self.cohort if cohort is None else cohort,
            send,
            model_fn=self.model_fn,
            population_size=5,
        )


@pytest.fixture
def opened(
    tiny_recipe: Recipe,
    tiny_state: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> Opened:
    recipe, state, cohort = open_round(
        tiny_recipe, tiny_state, tiny_data.clients, model_fn=tiny_model_fn
    )
    send = InProcess(recipe, state, tiny_data.train.__getitem__, SerialRuntime(), tiny_model_fn)
    return Opened(recipe, state, cohort, send, tiny_model_fn)


def test_server_round_over_the_in_process_send_is_run_round(
    opened: Opened,
    tiny_recipe: Recipe,
    tiny_state: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> None:
    cohort = opened.cohort
    by_hand, report = opened.round(opened.send)
    simulated, _ = run_round(
        tiny_recipe, tiny_state, tiny_data, SerialRuntime(), model_fn=tiny_model_fn
    )
    assert tree.sha256(by_hand.params) != tree.sha256(tiny_state.params)  # it trained
    assert tree.sha256(by_hand.params) == tree.sha256(simulated.params)
    assert by_hand.ledger == simulated.ledger
    assert report.cohort == tuple(cohort) and report.accepted == tuple(cohort)


def test_server_round_rejects_silent_clients_and_sets_them_up_again(opened: Opened) -> None:
    cohort, silent = opened.cohort, opened.cohort[0]

    def lossy(requests: Sequence[Request]) -> Mapping[str, Reply]:
        return opened.send([q for q in requests if q.client != silent])

    new, report = opened.round(lossy)
    assert report.rejected == ((silent, f"client {silent}, round 1: {NO_REPLY}"),)
    assert silent not in report.accepted and len(report.accepted) == len(cohort) - 1
    assert silent not in new.distribution.set_up and set(report.accepted) <= set(
        new.distribution.set_up
    )
    assert report.cohort == tuple(cohort)


def test_server_round_drops_replies_from_outside_the_cohort(
    opened: Opened, tiny_data: FederatedDataset
) -> None:
    clients = opened.send
    cohort = list(tiny_data.clients[:3])
    stranger = tiny_data.clients[4]

    def with_stranger(requests: Sequence[Request]) -> Mapping[str, Reply]:
        replies = dict(clients(requests))
        forged = clients([replace(requests[0], client=stranger)])[stranger]
        return {**replies, stranger: forged}

    honest, _ = opened.round(clients, cohort)
    new, report = opened.round(with_stranger, cohort)
    assert stranger not in report.accepted and stranger not in report.cohort
    assert tree.sha256(new.params) == tree.sha256(honest.params)
    assert stranger not in new.distribution.set_up


def test_answered_orders_by_cohort_and_keeps_a_reply_that_covers_it() -> None:
    a, b = Reply("a", b"x", 1), Reply("b", b"y", 2)
    got = answered(["b", "a", "c"], {"a": a, "b": b})
    assert [r.client for r in got] == ["b", "a", "c"] and got[2].error == NO_REPLY
    total = Reply("sum", b"z", 3, covers=("a", "b", "c"))
    assert answered(["a", "b", "c"], {"sum": total}) == [total]
    assert heard([total]) == {"a", "b", "c"}
    partial = Reply("sum", b"z", 3, covers=("a", "b"))
    got = answered(["a", "b", "c"], {"sum": partial})
    assert [r.client for r in got] == ["c", "sum"] and got[0].error == NO_REPLY
    assert heard(got) == {"a", "b"}
    outside = Reply("sum", b"z", 3, covers=("a", "zz"))
    assert [r.client for r in answered(["a"], {"sum": outside})] == ["a"]


def test_reply_nbytes_is_its_payloads_unless_the_wire_says_otherwise() -> None:
    assert Reply("a", b"abc", 1, extras=b"de").nbytes == 5
    assert Reply("a", b"abc", 1, wire_bytes=1234).nbytes == 1234


def test_a_secure_sum_is_one_reply_that_stands_for_the_cohort(opened: Opened) -> None:
    from fedtransfer.deploy.secure import secure_sum

    state, cohort = opened.state, opened.cohort
    step = {k: torch.full_like(v, 0.01) for k, v in state.params.items()}

    def protocol(requests: Sequence[Request]) -> tuple[dict[str, torch.Tensor], float, int]:
        return {k: v.double() for k, v in step.items()}, 40.0, 999

    send = secure_sum(protocol, uplink=opened.recipe.uplink, params=state.params)
    new, report = opened.round(send)
    assert report.accepted == ("secure-sum",) and report.rejected == ()
    assert report.cohort == tuple(cohort) and report.bytes_up == 999
    assert set(new.distribution.set_up) == set(cohort)
    for k in state.params:
        assert torch.equal(new.params[k], state.params[k] + step[k])
