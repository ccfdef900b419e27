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


def reply_of(msg: Message) -> Reply:
    f = fields_of(msg)
    return Reply(
        client=str(f["client"]),
        uplink=f.get("uplink", b""),
        num_examples=int(f["num_examples"]),
        extras=f.get("extras", b""),
        metrics=json.loads(str(f.get("metrics", "{}"))),
        error=str(f.get("error", "")),
    )


def wire_nbytes(msg: Message) -> int:
    """The bytes Flower pushes for ``msg``: the serialised size of every object it is made of
    (message, records, arrays, chunks), before HTTP and TLS framing."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
