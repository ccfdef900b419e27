"""Runtimes: how client tasks are executed (serial today); they know nothing of federated learning."""

from fedtransfer.runtime.serial import Runtime, SerialRuntime

__all__ = ["Runtime", "SerialRuntime"]
