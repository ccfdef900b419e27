"""The deployed server trusts only the authenticated sender: a reply is filed under the
client its node holds, never the client its content names, and every field is parsed
defensively — a malformed reply is that client's rejection, never the end of the round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("flwr", reason="needs the flower extra: pip install 'fedtransfer[flower]'")

from fedtransfer.deploy import flower_server
from fedtransfer.deploy.flower_wire import content, reply_of
from fedtransfer.rounds.messages import Request

pytestmark = pytest.mark.flower

GOOD = {"client": "c1", "uplink": b"\x01\x02", "num_examples": 12, "metrics": '{"loss": 0.5}'}


@dataclass
class _Meta:
    src_node_id: int


@dataclass
class _Answer:
    """What the grid hands back: a sender, content, maybe an error."""

    node: int
    fields: dict[str, Any]

    @property
    def metadata(self) -> _Meta:
        return _Meta(self.node)

    @property
    def content(self) -> Any:
        return content(self.fields)

    def has_error(self) -> bool:
        return False


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_examples": "abc"}, "is not a count"),
        ({"num_examples": "9" * 400}, "is not a count"),
        ({"num_examples": 1.5}, "is not a count"),
        ({"metrics": "{oops"}, "Expecting"),
        ({"metrics": '{"loss": "high"}'}, "metrics must be a JSON object of numbers"),
        ({"client": None}, "names client"),
        ({"client": "c0"}, "names client 'c0', but its node holds 'c1'"),
    ],
    ids=[
        "count-abc",
        "count-400-digits",
        "count-float",
        "metrics-json",
        "metrics-str",
        "no-client",
        "other-client",
    ],
)
def test_a_malformed_reply_is_an_error_reply_of_its_own_client(
    change: dict[str, Any], match: str
) -> None:
    fields = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    rep = reply_of(_Answer(2, fields), client="c1")  # type: ignore[arg-type]
    assert rep.client == "c1" and rep.uplink == b"" and rep.error.startswith("malformed reply")
    assert match in rep.error


def test_a_well_formed_reply_is_read_as_sent() -> None:
    rep = reply_of(_Answer(2, GOOD), client="c1")  # type: ignore[arg-type]
    assert (rep.client, rep.uplink, rep.num_examples, rep.metrics, rep.error) == (
        "c1",
        b"\x01\x02",
        12,
        {"loss": 0.5},
        "",
    )


class _Grid:
    def __init__(self, answers: list[_Answer]) -> None:
        self.answers = answers

    def send_and_receive(self, msgs: Any, timeout: float) -> list[_Answer]:
        return self.answers


def test_the_transport_files_each_reply_under_its_senders_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flower_server, "wire_nbytes", lambda msg: 1)
    monkeypatch.setattr(flower_server, "request_message", lambda req, node: (req, node))
    nodes = {"c0": (10, 0, 12), "c1": (11, 1, 12)}
    answers = [
        _Answer(11, {**GOOD, "client": "c0"}),  # c1's node answers as c0
        _Answer(10, {**GOOD, "client": "c0"}),  # c0 answers as itself
        _Answer(10, {**GOOD, "client": "c0", "uplink": b"\x09"}),  # … and again
        _Answer(99, {**GOOD, "client": "c0"}),  # a node that was not asked
    ]
    transport = flower_server._Transport(_Grid(answers), nodes, 1.0)  # type: ignore[arg-type]
    requests = [_request("c0"), _request("c1")]
    replies = transport(requests)
    assert set(replies) == {"c0", "c1"}
    assert replies["c0"].uplink == b"\x01\x02" and not replies["c0"].error  # the first one
    assert "names client 'c0', but its node holds 'c1'" in replies["c1"].error


def _request(client: str) -> Request:
    return Request(client=client, round=1, seed=0, stage=0, start_sha256="0" * 64, downlink=b"")


# --- recovery: clients that come back, a client that keeps reconnecting ----------------------


class _QueryGrid:
    """Answers a query from each node with the client it holds and whether it holds the
    starting weights."""

    def __init__(self, ids: list[int], holds: dict[int, str], trained: set[int]) -> None:
        self.ids, self.holds, self.trained = ids, holds, trained

    def get_node_ids(self) -> list[int]:
        return self.ids

    def send_and_receive(self, msgs: Any, timeout: float) -> list[_Answer]:
        return [
            _Answer(
                m,
                {
                    "client": self.holds[m],
                    "partition": int(self.holds[m][1:]),
                    "num_examples": 12,
                    "holds_start": int(m in self.trained),
                },
            )
            for m in msgs
            if m in self.holds  # a dead node does not answer
        ]


def test_the_server_rediscovers_a_restarted_client_each_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        flower_server, "Message", lambda content, dst_node_id, message_type: dst_node_id
    )
    nodes = {"c0": (10, 0, 12), "c1": (11, 1, 12), "c2": (13, 2, 12)}
    # c1's node 11 died and c1 came back as node 12; c2 restarted on its own node 13;
    # node 14 is listed but dead
    grid = _QueryGrid([10, 12, 13, 14], {10: "c0", 12: "c1", 13: "c2"}, trained={10})
    live, reset = flower_server._rediscover(grid, nodes, 1.0)  # type: ignore[arg-type]
    assert live == {10, 12, 13} and reset == {"c1", "c2"} and nodes["c1"] == (12, 1, 12)
    grid.trained |= {12, 13}  # set up again and trained
    live, reset = flower_server._rediscover(grid, nodes, 1.0)  # type: ignore[arg-type]
    assert reset == set()


class _Node:
    def __init__(self, code: int) -> None:
        self.code = code

    def wait(self) -> int:
        return self.code


def test_a_client_node_is_restarted_with_backoff_until_it_exits_cleanly() -> None:
    from fedtransfer.deploy.commands import reconnecting

    codes, slept, said = iter([1, 1, 1, 0]), [], []
    code = reconnecting(
        lambda: _Node(next(codes)),
        budget=100.0,
        say=said.append,
        sleep=slept.append,
        clock=lambda: 0.0,
    )
    assert code == 0 and slept == [1.0, 2.0, 4.0] and len(said) == 3
    assert "reconnecting in 1 s" in said[0] and "attempt 3" in said[2]


def test_a_client_node_gives_up_when_its_time_is_spent() -> None:
    from fedtransfer.deploy.commands import reconnecting

    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    said: list[str] = []
    code = reconnecting(
        lambda: _Node(3), budget=40.0, say=said.append, sleep=sleep, clock=lambda: now[0]
    )
    assert code == 3 and "giving up" in said[-1]
    assert now[0] <= 40.0 and len(said) == 6  # 1 + 2 + 4 + 8 + 16 s of waits, then no more
