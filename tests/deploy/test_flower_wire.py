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
