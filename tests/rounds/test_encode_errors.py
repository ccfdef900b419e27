"""A client whose update its codec cannot hold (a diverged update under Int8, TopK, Float16) is
that client's rejection, named with client and round; the round and the global model go on."""

from __future__ import annotations

import pytest
from tests.conftest import make_tiny_data, make_tiny_model

from fedtransfer import LocalTraining, Recipe, ServerState, run_round, tree
from fedtransfer.client.update import Reply
from fedtransfer.codecs import Codec, Float16, Int8, TopK
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients
from fedtransfer.state import Pending

pytestmark = pytest.mark.usefixtures("single_thread")

DIVERGE = LocalTraining(lr=1e30, steps=2, batch_size=8)
LOSSY: list[Codec] = [Int8(), TopK(0.1), Float16()]


@pytest.mark.parametrize("uplink", LOSSY, ids=repr)
def test_round_update_that_does_not_encode_is_a_named_rejection(uplink: Codec) -> None:
    recipe = Recipe(training=DIVERGE, uplink=uplink, sampler=AllClients())
    data = make_tiny_data()
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    new, report = run_round(recipe, state, data, SerialRuntime(), model_fn=make_tiny_model)
    assert report.accepted == ()
    assert [c for c, _ in report.rejected] == list(data.clients)
    client, why = report.rejected[0]
    assert why.startswith(f"client {client}, round 1: its update does not encode with")
    assert tree.equal(new.params, state.params) and new.round == 1


def test_round_only_the_diverging_client_is_rejected() -> None:
    """c0's data is scaled up so far that its update overflows float16; the others go through."""
    data = make_tiny_data()
    x = data.train["c0"].x
    data.train["c0"] = type(data.train["c0"])(x * 1e12, data.train["c0"].y)
    recipe = Recipe(
        training=LocalTraining(lr=0.1, steps=2, batch_size=8),
        uplink=Float16(),
        sampler=AllClients(),
    )
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    _, report = run_round(recipe, state, data, SerialRuntime(), model_fn=make_tiny_model)
    assert [c for c, _ in report.rejected] == ["c0"]
    assert set(report.accepted) == set(data.clients) - {"c0"}


def test_pending_keeps_an_error_result_through_a_checkpoint() -> None:
    res = Reply("c3", b"", 12, metrics={"loss": 1.0}, error="does not encode")
    item = Pending(res, version=4, arrival=2.5)
    back = Pending.load(item.meta(), item.tensors(""))
    assert (back.result.error, back.result.uplink, back.result.num_examples) == (
        "does not encode",
        b"",
        12,
    )
