"""Runtimes: how client tasks are executed (serial, worker processes, Ray actors — they know
nothing of federated learning — and vectorised: ``VectorizedRuntime`` and ``AutoRuntime``,
client fast paths that live in :mod:`fedtransfer.client.fast.runtimes` and are exported
here). ``RayRuntime`` imports Ray only when one is made."""

from fedtransfer.client.fast.runtimes import AutoRuntime, VectorizedRuntime
from fedtransfer.runtime.pool import ProcessRuntime
from fedtransfer.runtime.ray import RayRuntime
from fedtransfer.runtime.serial import Runtime, SerialRuntime
from fedtransfer.runtime.transport import Traffic, WorkerLost

__all__ = [
    "AutoRuntime",
    "ProcessRuntime",
    "RayRuntime",
    "Runtime",
    "SerialRuntime",
    "Traffic",
    "VectorizedRuntime",
    "WorkerLost",
]
