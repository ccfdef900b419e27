"""Recipe factories for named algorithms: compositions of components, never subclasses."""

from __future__ import annotations

from fedtransfer.client.drift import Dyn, Nova, Scaffold
from fedtransfer.client.objectives import Objective, Plain, Prox
from fedtransfer.client.personalization import Ditto, Rep
from fedtransfer.client.train import LocalTraining
from fedtransfer.recipe import Recipe
from fedtransfer.server.optimizers import (
    ServerAdagrad,
    ServerAdam,
    ServerSGD,
    ServerYogi,
    UpdateTransform,
)
from fedtransfer.server.pipeline import ServerPipeline
from fedtransfer.server.sample import Uniform
from fedtransfer.transfer.plan import TransferPolicy
from fedtransfer.transfer.policies import FrozenHead, Full, GlobalHead, PersonalHead


def fedavg(
    policy: TransferPolicy | None = None,
    *,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAvg (McMahan et al., arXiv 1602.05629): weighted mean of updates, server lr 1.

    >>> fedavg().pipeline.post
    (ServerSGD(lr=1.0, momentum=0.0),)
    """
    return _recipe(policy, local, clients_per_round, ServerSGD())


def fedavgm(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 1.0,
    momentum: float = 0.9,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAvgM (Hsu et al., arXiv 1909.06335): FedAvg with server momentum."""
    return _recipe(policy, local, clients_per_round, ServerSGD(lr=lr, momentum=momentum))


def fedadam(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 0.01,
    tau: float = 1e-3,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAdam (Reddi et al., arXiv 2003.00295)."""
    return _recipe(policy, local, clients_per_round, ServerAdam(lr=lr, tau=tau))


def fedyogi(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 0.01,
    tau: float = 1e-3,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedYogi (Reddi et al., arXiv 2003.00295)."""
    return _recipe(policy, local, clients_per_round, ServerYogi(lr=lr, tau=tau))


def fedadagrad(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 0.01,
    tau: float = 1e-3,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAdagrad (Reddi et al., arXiv 2003.00295)."""
    return _recipe(policy, local, clients_per_round, ServerAdagrad(lr=lr, tau=tau))


def fedprox(
    policy: TransferPolicy | None = None,
    *,
    mu: float = 0.01,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedProx (Li et al., arXiv 1812.06127): FedAvg with a proximal term in the client objective.

    >>> fedprox(mu=0.1).objective
    Prox(mu=0.1)
    """
    return _recipe(policy, local, clients_per_round, ServerSGD(), Prox(mu=mu))


def scaffold(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 1.0,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """SCAFFOLD (Karimireddy et al., arXiv 1910.06378): control variates against client drift;
    ``lr`` is the server learning rate η_g."""
    return _recipe(policy, local, clients_per_round, ServerSGD(lr=lr), Scaffold())


def feddyn(
    policy: TransferPolicy | None = None,
    *,
    alpha: float = 0.01,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedDyn (Acar et al., arXiv 2111.04263): dynamic regularisation of the client objective."""
    return _recipe(policy, local, clients_per_round, ServerSGD(), Dyn(alpha=alpha))


def fednova(
    policy: TransferPolicy | None = None,
    *,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedNova (Wang et al., arXiv 2007.07481): normalised averaging of unequal local work."""
    return _recipe(policy, local, clients_per_round, ServerSGD(), Nova())


def ditto(
    policy: TransferPolicy | None = None,
    *,
    lam: float = 0.1,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """Ditto (Li et al., arXiv 2012.04221): FedAvg plus a personal model per client,
    regularised towards the global one by ``lam``."""
    return _recipe(policy, local, clients_per_round, ServerSGD(), Ditto(lam=lam))


def fedrep(
    *,
    head: str = "head",
    head_epochs: int = 5,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedRep (Collins et al., arXiv 2102.07078): shared body, local head, trained in turn.

    >>> fedrep().policy
    PersonalHead(head='head')
    """
    return _recipe(
        PersonalHead(head), local, clients_per_round, ServerSGD(), Rep(head_epochs=head_epochs)
    )


def fedbabu(
    *,
    head: str = "head",
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedBABU (Oh et al., arXiv 2106.06042): federate the body under a frozen head; fine-tune
    at evaluation (``Personalization``)."""
    return _recipe(FrozenHead(head), local, clients_per_round, ServerSGD(), Plain())


def lg_fedavg(
    *,
    head: str = "head",
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """LG-FedAvg (Liang et al., arXiv 2001.01523): local representation, global head."""
    return _recipe(GlobalHead(head), local, clients_per_round, ServerSGD(), Plain())


def _recipe(
    policy: TransferPolicy | None,
    local: LocalTraining | None,
    clients_per_round: int,
    server_step: UpdateTransform,
    objective: Objective | None = None,
) -> Recipe:
    return Recipe(
        policy=policy or Full(),
        local=local or LocalTraining(),
        objective=objective or Plain(),
        pipeline=ServerPipeline(post=(server_step,)),
        sampler=Uniform(clients_per_round),
    )
