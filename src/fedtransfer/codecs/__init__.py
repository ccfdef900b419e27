"""Codecs and the wire format: what travels between clients and server, byte-exact."""

from fedtransfer.codecs.base import Codec
from fedtransfer.codecs.cast import BFloat16, Exact, Float16, Float32
from fedtransfer.codecs.payload import Entry, Payload
from fedtransfer.codecs.quantize import Int8
from fedtransfer.codecs.sparse import TopK

__all__ = [
    "BFloat16",
    "Codec",
    "Entry",
    "Exact",
    "Float16",
    "Float32",
    "Int8",
    "Payload",
    "TopK",
]
