"""Runtimes: how client tasks are executed (serial, vectorised, worker processes, Ray actors);
they know nothing of federated learning. ``RayRuntime`` imports Ray only when one is made."""

from fedtransfer.runtime.pool import ProcessRuntime
from fedtransfer.runtime.ray import RayRuntime
from fedtransfer.runtime.serial import Runtime, SerialRuntime
from fedtransfer.runtime.transport import Traffic, WorkerLost
from fedtransfer.runtime.vectorized import AutoRuntime, VectorizedRuntime

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
