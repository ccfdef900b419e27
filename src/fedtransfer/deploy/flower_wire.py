"""Our requests and replies as Flower messages: scalars in a config record, payload bytes as
raw byte arrays (Flower chunks them), and the size each message has on the wire."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedtransfer.rounds.messages import Reply, Request

KEY = "fedtransfer"


def content(fields: Mapping[str, Any]) -> RecordDict:
    """Scalars in a config record, byte strings as raw uint8 arrays (chunked by Flower)."""
    blobs = {
        k: Array(np.frombuffer(v, dtype=np.uint8))
        for k, v in fields.items()
        if isinstance(v, bytes) and v
    }
    scalars = {k: v for k, v in fields.items() if not isinstance(v, bytes | type(None))}
    return RecordDict({KEY: ConfigRecord(scalars), f"{KEY}.bytes": ArrayRecord(blobs)})


def fields_of(msg: Message) -> dict[str, Any]:
    """The fields :func:`content` put in ``msg`` (absent byte strings were empty or ``None``)."""
    records = msg.content
    out: dict[str, Any] = dict(records.config_records[KEY])
    blobs = records.array_records.get(f"{KEY}.bytes")
    if blobs is not None:
        out.update({k: blobs[k].numpy().tobytes() for k in blobs})
    return out


def request_message(req: Request, node_id: int, *, kind: str = "train") -> Message:
    """A Flower message carrying ``req`` to ``node_id``."""
    fields = {k: getattr(req, k) for k in Request.__dataclass_fields__}
    return Message(content(fields), dst_node_id=node_id, message_type=kind, group_id=str(req.round))


def request_of(msg: Message) -> Request:
    """The request a train or evaluate message carries."""
    return request_from(fields_of(msg))


def request_from(f: Mapping[str, Any]) -> Request:
    """A :class:`Request` from its fields as a record holds them (absent bytes: ``None``)."""
    return Request(
        client=str(f["client"]),
        round=int(f["round"]),
        seed=int(f["seed"]),
        stage=int(f["stage"]),
        start_sha256=str(f["start_sha256"]),
        downlink=bytes(f.get("downlink", b"")),
        broadcast=f.get("broadcast"),
        setup=f.get("setup"),
        handover=f.get("handover"),
    )


def reply_of(msg: Message, *, client: str) -> Reply:
    """The reply ``msg`` carries from the node that holds ``client`` (the identity comes from
    the authenticated sender, never from the content). Parsed defensively: a malformed field,
    or content that claims another client, is an error reply — that client's rejection."""
    try:
        f = fields_of(msg)
        return _reply_from(f, client)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return Reply(client, b"", 0, error=f"malformed reply: {exc!r}"[:300])


def _reply_from(f: Mapping[str, Any], client: str) -> Reply:
    claimed = f.get("client")
    if claimed != client:
        raise ValueError(
            f"its content names client {str(claimed)[:40]!r}, but its node holds {client!r}"
        )
    uplink, extras = f.get("uplink", b""), f.get("extras", b"")
    if not isinstance(uplink, bytes) or not isinstance(extras, bytes):
        raise ValueError("uplink and extras must be byte arrays")
    metrics = json.loads(str(f.get("metrics", "{}")))
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in metrics.items()
    ):
        raise ValueError("metrics must be a JSON object of numbers")
    return Reply(
        client=client,
        uplink=uplink,
        num_examples=_count(f.get("num_examples")),
        extras=extras,
        metrics={k: float(v) for k, v in metrics.items()},
        error=str(f.get("error", ""))[:2000],
    )


def _count(value: Any) -> int:
    """An example count as a record holds it: an int (or a short string of digits)."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 18:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"num_examples {str(value)[:40]!r} is not a count")


def wire_nbytes(msg: Message) -> int:
    """The bytes Flower pushes for ``msg``: the serialised size of every object it is made of
    (message, records, arrays, chunks), before HTTP and TLS framing."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
