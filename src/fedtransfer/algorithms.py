"""Recipe and schedule factories for named algorithms: compositions of components, never
subclasses. A schedule factory (``lp_ft``, ``fedncm``, ``babu_then_head``, ``progressive``)
takes the recipe its stages start from and changes what each stage changes."""

from __future__ import annotations

from dataclasses import replace

from fedtransfer.client.drift import Dyn, Nova, Scaffold
from fedtransfer.client.ncm import NearestClassMean
from fedtransfer.client.objectives import Objective, Plain, Prox
from fedtransfer.client.personalization import Ditto, Rep
from fedtransfer.client.train import LocalTraining
from fedtransfer.codecs import Float32
from fedtransfer.errors import ConfigError
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.schedule import Schedule
from fedtransfer.server.optimizers import (
    ServerAdagrad,
    ServerAdam,
    ServerSGD,
    ServerYogi,
    UpdateTransform,
)
from fedtransfer.server.pipeline import ServerPipeline
from fedtransfer.server.sample import Uniform
from fedtransfer.transfer.lora import Lora
from fedtransfer.transfer.plan import TransferPolicy
from fedtransfer.transfer.policies import (
    FrozenHead,
    Full,
    GlobalHead,
    HeadOnly,
    LastK,
    PersonalHead,
)
from fedtransfer.transfer.ranks import RankNarrow, RankPad, RankTrim


def fedavg(
    policy: TransferPolicy | None = None,
    *,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAvg (McMahan et al., arXiv 1602.05629): weighted mean of updates, server lr 1.

    >>> fedavg().pipeline.post
    (ServerSGD(lr=1.0, momentum=0.0),)
    """
    return _recipe(policy, training, clients_per_round, ServerSGD())


def fedavgm(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 1.0,
    momentum: float = 0.9,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAvgM (Hsu et al., arXiv 1909.06335): FedAvg with server momentum."""
    return _recipe(policy, training, clients_per_round, ServerSGD(lr=lr, momentum=momentum))


def fedadam(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 0.01,
    tau: float = 1e-3,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAdam (Reddi et al., arXiv 2003.00295)."""
    return _recipe(policy, training, clients_per_round, ServerAdam(lr=lr, tau=tau))


def fedyogi(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 0.01,
    tau: float = 1e-3,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedYogi (Reddi et al., arXiv 2003.00295)."""
    return _recipe(policy, training, clients_per_round, ServerYogi(lr=lr, tau=tau))


def fedadagrad(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 0.01,
    tau: float = 1e-3,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAdagrad (Reddi et al., arXiv 2003.00295)."""
    return _recipe(policy, training, clients_per_round, ServerAdagrad(lr=lr, tau=tau))


def fedprox(
    policy: TransferPolicy | None = None,
    *,
    mu: float = 0.01,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedProx (Li et al., arXiv 1812.06127): FedAvg with a proximal term in the client objective.

    >>> fedprox(mu=0.1).objective
    Prox(mu=0.1)
    """
    return _recipe(policy, training, clients_per_round, ServerSGD(), Prox(mu=mu))


def scaffold(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 1.0,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """SCAFFOLD (Karimireddy et al., arXiv 1910.06378): control variates against client drift;
    ``lr`` is the server learning rate η_g."""
    return _recipe(policy, training, clients_per_round, ServerSGD(lr=lr), Scaffold())


def feddyn(
    policy: TransferPolicy | None = None,
    *,
    alpha: float = 0.01,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedDyn (Acar et al., arXiv 2111.04263): dynamic regularisation of the client objective."""
    return _recipe(policy, training, clients_per_round, ServerSGD(), Dyn(alpha=alpha))


def fednova(
    policy: TransferPolicy | None = None,
    *,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedNova (Wang et al., arXiv 2007.07481): normalised averaging of unequal local work."""
    return _recipe(policy, training, clients_per_round, ServerSGD(), Nova())


def ditto(
    policy: TransferPolicy | None = None,
    *,
    lam: float = 0.1,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """Ditto (Li et al., arXiv 2012.04221): FedAvg plus a personal model per client,
    regularised towards the global one by ``lam``."""
    return _recipe(policy, training, clients_per_round, ServerSGD(), Ditto(lam=lam))


def fedrep(
    *,
    head: str = "head",
    head_epochs: int = 5,
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedRep (Collins et al., arXiv 2102.07078): shared body, local head, trained in turn.

    >>> fedrep().policy
    PersonalHead(head='head')
    """
    return _recipe(
        PersonalHead(head), training, clients_per_round, ServerSGD(), Rep(head_epochs=head_epochs)
    )


def fedbabu(
    *,
    head: str = "head",
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedBABU (Oh et al., arXiv 2106.06042): federate the body under a frozen head; fine-tune
    at evaluation (``Personalization``)."""
    return _recipe(FrozenHead(head), training, clients_per_round, ServerSGD(), Plain())


def lg_fedavg(
    *,
    head: str = "head",
    training: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """LG-FedAvg (Liang et al., arXiv 2001.01523): local representation, global head."""
    return _recipe(GlobalHead(head), training, clients_per_round, ServerSGD(), Plain())


def hetlora(recipe: Recipe, *, ranks: tuple[int, ...]) -> Recipe:
    """HetLoRA (Cho et al., arXiv 2401.06432): ``recipe``'s clients hold LoRA adapters of
    different ranks, ``ranks[sha256(client) mod len(ranks)]``; ``recipe.policy`` is a
    :class:`~fedtransfer.transfer.lora.Lora` of rank ``max(ranks)``.

    Three wrappers of the recipe do it (:mod:`fedtransfer.transfer.ranks`), so the round never
    asks about ranks: each client narrows the weights it trains from to its rank
    (``client_start``), trims its update before the uplink (the first client transform), and
    the server zero-pads each update back before validating it (the first per-client step).

    >>> from fedtransfer.transfer.lora import Lora
    >>> r = hetlora(Recipe(policy=Lora(rank=4)), ranks=(1, 2, 4))
    >>> r.client_start, r.pipeline.per_client
    ((RankNarrow(rank=4, ranks=(1, 2, 4)),), (RankPad(rank=4, ranks=(1, 2, 4)),))
    """
    rank = getattr(recipe.policy, "rank", None)
    if not isinstance(recipe.policy, Lora) or not isinstance(rank, int):
        raise ConfigError(
            f"hetlora: the recipe's policy must be a Lora adapter, got {recipe.policy!r}; "
            f"hint: Recipe(policy=Lora(rank={max(ranks, default=4)}))"
        )
    ranks = tuple(ranks)
    return replace(
        recipe,
        client_start=(RankNarrow(rank, ranks), *recipe.client_start),
        client_transforms=(RankTrim(rank, ranks), *recipe.client_transforms),
        pipeline=replace(
            recipe.pipeline, per_client=(RankPad(rank, ranks), *recipe.pipeline.per_client)
        ),
    )


def _recipe(
    policy: TransferPolicy | None,
    training: LocalTraining | None,
    clients_per_round: int,
    server_step: UpdateTransform,
    objective: Objective | None = None,
) -> Recipe:
    return Recipe(
        policy=Full() if policy is None else policy,
        training=LocalTraining() if training is None else training,
        objective=Plain() if objective is None else objective,
        pipeline=ServerPipeline(post=(server_step,)),
        sampler=Uniform(clients_per_round),
    )


def lp_ft(
    head_rounds: int,
    recipe: Recipe | None = None,
    *,
    then: TransferPolicy | None = None,
    head: str = "head",
) -> Schedule:
    """Linear probing, then fine-tuning (LP-FT, Kumar et al., arXiv 2202.10054): ``recipe``
    (default ``Recipe()``) on the head alone for ``head_rounds`` rounds, then under ``then``
    (default: the whole model; ``Lora(...)`` for LoRA).

    >>> lp_ft(3).recipe_at(4).policy
    Full()
    """
    base = Recipe() if recipe is None else recipe
    return Schedule(
        (
            (head_rounds, replace(base, policy=HeadOnly(head))),
            (None, replace(base, policy=Full() if then is None else then)),
        )
    )


def fedncm(
    recipe: Recipe | None = None, *, then: TransferPolicy | None = None, head: str = "head"
) -> Schedule:
    """FedNCM then fine-tuning (Legate et al., arXiv 2306.03937): one round sets the head to the
    nearest-class-mean classifier of the frozen features, then ``recipe`` under ``then``
    (default: whole model). The FedNCM round sends its class sums and counts losslessly
    (``Float32``), whatever the recipe's codecs."""
    base = Recipe() if recipe is None else recipe
    ncm = replace(base, policy=HeadOnly(head), objective=NearestClassMean(), uplink=Float32())
    return Schedule(((1, ncm), (None, replace(base, policy=Full() if then is None else then))))


def babu_then_head(
    body_rounds: int, recipe: Recipe | None = None, *, head: str = "head"
) -> Schedule:
    """FedBABU as a schedule (Oh et al., arXiv 2106.06042): the body is federated under the
    frozen head for ``body_rounds`` rounds, then the head alone is federated on the learnt
    body (the body reaches clients that missed its last rounds as a hand-over)."""
    base = Recipe() if recipe is None else recipe
    return Schedule(
        (
            (body_rounds, replace(base, policy=FrozenHead(head))),
            (None, replace(base, policy=HeadOnly(head))),
        )
    )


def progressive(blocks: int, every: int, recipe: Recipe | None = None) -> Schedule:
    """Progressive unfreezing (Howard & Ruder, arXiv 1801.06146): the last block (the head)
    first, one more block every ``every`` rounds, until the last ``blocks`` blocks train.

    >>> [r.policy.k for _, r in progressive(3, every=2).stages]
    [1, 2, 3]
    """
    if blocks < 1 or every < 1:
        raise ConfigError(f"progressive: blocks and every must be >= 1, got {blocks}, {every}")
    base = Recipe() if recipe is None else recipe
    return Schedule(
        tuple(
            (every if k < blocks else None, replace(base, policy=LastK(k)))
            for k in range(1, blocks + 1)
        )
    )
