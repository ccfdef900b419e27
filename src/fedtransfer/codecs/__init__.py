"""Codecs and the wire format: what travels between clients and server, byte-exact."""

from fedtransfer.codecs.base import Codec
from fedtransfer.codecs.cast import Exact, Float32
from fedtransfer.codecs.payload import Entry, Payload

__all__ = ["Codec", "Entry", "Exact", "Float32", "Payload"]
