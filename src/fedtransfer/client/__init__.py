"""One client's work: the local training loop, evaluation and the round's update."""

from fedtransfer.client.evaluate import evaluate
from fedtransfer.client.train import LocalTraining, local_train
from fedtransfer.client.update import ClientResult, ClientTask, client_update, verify_start

__all__ = [
    "ClientResult",
    "ClientTask",
    "LocalTraining",
    "client_update",
    "evaluate",
    "local_train",
    "verify_start",
]
