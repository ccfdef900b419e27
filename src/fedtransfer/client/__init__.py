"""One client's work: the local training loop, objectives, evaluation and the round's update."""

from fedtransfer.client.drift import Dyn, Nova, Scaffold
from fedtransfer.client.evaluate import evaluate
from fedtransfer.client.job import ClientUpdate
from fedtransfer.client.ncm import NearestClassMean
from fedtransfer.client.objectives import ClientContext, ClientOut, Objective, Plain, Prox
from fedtransfer.client.personalization import Ditto, Personalization, Rep, personalize
from fedtransfer.client.train import LocalTraining, local_train
from fedtransfer.client.transforms import ErrorFeedback
from fedtransfer.client.update import (
    ClientTask,
    client_update,
    verify_start,
)

__all__ = [
    "ClientContext",
    "ClientOut",
    "ClientTask",
    "ClientUpdate",
    "Ditto",
    "Dyn",
    "ErrorFeedback",
    "LocalTraining",
    "NearestClassMean",
    "Nova",
    "Objective",
    "Personalization",
    "Plain",
    "Prox",
    "Rep",
    "Scaffold",
    "client_update",
    "evaluate",
    "local_train",
    "personalize",
    "verify_start",
]
