"""Our robust aggregators against Flower's own implementations (flwr 1.42).

Flower side. Main reference (200 random cases per rule): the pure functions of
``flwr.server.strategy.aggregate`` (``aggregate_median``, ``aggregate_trimmed_avg``,
``aggregate_krum`` with ``to_keep`` 0 for Krum and ``m`` for MultiKrum, ``aggregate_bulyan``
over ``aggregate_krum``). They take ``(ndarrays, num_examples)`` pairs and compute in the
inputs' dtype; we give them float64 copies of our inputs. A smaller sample runs the current
Message-API strategies ``flwr.serverapp.strategy.{FedMedian, FedTrimmedAvg, Krum, MultiKrum,
Bulyan}`` through ``aggregate_train`` on hand-built reply messages.

==============================================================  ======================
Flower                                                          ours
==============================================================  ======================
``aggregate_median`` / ``FedMedian``                            ``Median()``
``aggregate_trimmed_avg(r, beta)`` / ``FedTrimmedAvg(beta)``    ``TrimmedMean(beta)``
``aggregate_krum(r, f, 0)`` / ``Krum(f)``                       ``Krum(f)``
``aggregate_krum(r, f, m)`` / ``MultiKrum(f, m)``               ``MultiKrum(f, m)``
``aggregate_bulyan(r, f, aggregate_krum, to_keep=0)``           ``Bulyan(f)``
==============================================================  ======================

Same semantics: numpy's median (mean of the two middle values), Flower's ``int(beta * n)`` cut,
Krum's ``max(1, n - f - 2)`` neighbours, MultiKrum's example-weighted mean of the kept updates,
Krum and Bulyan ignoring weights, Bulyan's iterative Krum selection and mean of the ``β``
values nearest the median. Differences, each pinned by a test below:

* Exact ties between Krum scores (certain whenever a score counts one neighbour: a nearest pair
  shares its distance) go to Flower's first client, to our lexicographically smaller update.
  So Flower's Krum and Bulyan can depend on the order of the replies and ours cannot; the
  cross-checks feed Flower the clients in lexicographic order and ours in a random order.
  Likewise, of two values equally near Bulyan's median at the ``β``-th place, Flower's
  ``np.argpartition`` keeps an unspecified one, ours the smaller (random cases have no such tie).
* Clients with weight 0 take no part in ours; Flower scores them and takes their medians.
* Ours rejects cohorts the rule is not defined for (Krum: ``n < 2f + 3``, MultiKrum:
  ``m > n - f``) with ``CompatibilityError``; Flower clamps the neighbour count and runs.
* The Message-API ``Bulyan`` strategy selects the ``θ`` updates with the lowest Krum scores in
  one shot (``select_multikrum``); the legacy function and the paper (and ours) re-score after
  each choice. With the iterative rule plugged in as its ``selection_rule`` it equals ours.
* Flower computes in the inputs' dtype, ours in float64 then rounds once to it: float32 inputs
  are compared at 1e-6 with values bounded so that one float32 rounding stays below it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import (
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)
from flwr.serverapp import strategy as flower
from flwr.serverapp.strategy.multikrum import select_multikrum
from torch import Tensor

from fedtransfer.errors import CompatibilityError
from fedtransfer.server import Aggregator, Bulyan, Krum, Median, MultiKrum, TrimmedMean

pytestmark = pytest.mark.usefixtures("single_thread", "quiet_flower")

CASES = 200
SERVERAPP_CASES = 25
TOL = 1e-6

Layers = list[np.ndarray]
Client = tuple[Layers, int]


@pytest.fixture
def quiet_flower() -> Iterator[None]:
    """Flower logs every aggregation at INFO; the strategies' logs are noise here."""
    logger = logging.getLogger("flwr")
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


@pytest.fixture
def no_forced_gc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's ``Bulyan`` strategy reads records with ``to_numpy_ndarrays(keep_input=False)``,
    which calls ``gc.collect()`` per record: ~0.1 s each in a process holding torch, and it
    frees nothing these tests need. Skipped for the duration of a test.
    """
    from flwr.app.message import arrayrecord

    monkeypatch.setattr(arrayrecord.gc, "collect", lambda *args: 0)


def _clients(rng: np.random.Generator, n: int, attackers: int, dtype: type) -> list[Client]:
    """``n`` clients of 1-3 tensors (shapes from ``()`` to 2-d); ``attackers`` of them shifted.

    float32 cases stay within |x| < 8, where one float32 rounding is below ``TOL``.
    """
    shapes = [tuple(rng.integers(1, 4, size=rng.integers(0, 3))) for _ in range(rng.integers(1, 4))]
    shift = rng.uniform(5.0, 50.0) if dtype is np.float64 else rng.uniform(1.0, 2.0)
    out = []
    for i in range(n):
        layers = [rng.normal(size=s) for s in shapes]
        if dtype is np.float32:
            layers = [np.clip(a, -3.0, 3.0) for a in layers]
        if i < attackers:
            layers = [a + shift for a in layers]
        out.append(([np.asarray(a, dtype=dtype) for a in layers], int(rng.integers(1, 100))))
    return out


def _lexicographic(clients: Sequence[Client]) -> list[Client]:
    """Clients sorted by their flattened update: Flower's "first" is then our tie-break."""
    return sorted(clients, key=lambda c: tuple(np.concatenate([a.ravel() for a in c[0]])))


def _ours(agg: Aggregator, clients: Sequence[Client], rng: np.random.Generator) -> Layers:
    """Our aggregate of ``clients`` given in a random order, as float64 arrays."""
    perm = rng.permutation(len(clients))
    updates = [{f"l{j}": torch.from_numpy(a) for j, a in enumerate(clients[i][0])} for i in perm]
    weights = [float(clients[i][1]) for i in perm]
    value = agg.aggregate(updates, weights, agg.init(updates[0])).value
    assert all(value[k].dtype == updates[0][k].dtype for k in value)
    return [value[f"l{j}"].double().numpy() for j in range(len(value))]


def _flower_input(clients: Sequence[Client]) -> list[tuple[Layers, int]]:
    return [([a.astype(np.float64) for a in layers], n) for layers, n in _lexicographic(clients)]


def _assert_close(ours: Layers, theirs: Sequence[Any], seed: int, what: str) -> None:
    assert len(ours) == len(theirs), f"seed {seed}: {what}: {len(ours)} vs {len(theirs)} layers"
    for j, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        b = np.asarray(b, dtype=np.float64)
        assert a.shape == b.shape, f"seed {seed}: {what}: layer {j} shape {a.shape} vs {b.shape}"
        diff = float(np.max(np.abs(a - b), initial=0.0))
        assert diff <= TOL, f"seed {seed}: {what}: layer {j} differs from Flower by {diff:.3g}"


def _dtype(seed: int) -> type:
    return np.float32 if seed % 2 else np.float64


# --- the pure functions of flwr.server.strategy.aggregate, 200 cases per rule --------------------


@pytest.mark.parametrize("seed", range(CASES))
def test_median_matches_flower(seed: int) -> None:
    rng = np.random.default_rng([1, seed])
    n = int(rng.integers(1, 13))
    clients = _clients(rng, n, int(rng.integers(0, (n + 1) // 2)), _dtype(seed))
    theirs = aggregate_median(_flower_input(clients))
    _assert_close(_ours(Median(), clients, rng), theirs, seed, "Median")


@pytest.mark.parametrize("seed", range(CASES))
def test_trimmed_mean_matches_flower(seed: int) -> None:
    rng = np.random.default_rng([2, seed])
    n = int(rng.integers(1, 16))
    # Half the cases use fractions at which beta * n lands exactly on an integer.
    beta = float(rng.choice([0.1, 0.2, 0.25, 0.3, 0.4])) if seed % 4 < 2 else rng.uniform(0, 0.5)
    clients = _clients(rng, n, int(beta * n), _dtype(seed))
    theirs = aggregate_trimmed_avg(_flower_input(clients), beta)
    _assert_close(_ours(TrimmedMean(beta), clients, rng), theirs, seed, f"TrimmedMean({beta})")


@pytest.mark.parametrize("seed", range(CASES))
def test_krum_matches_flower(seed: int) -> None:
    rng = np.random.default_rng([3, seed])
    f = int(rng.integers(0, 4))
    n = int(rng.integers(2 * f + 3, 2 * f + 9))
    clients = _clients(rng, n, int(rng.integers(0, f + 1)), _dtype(seed))
    theirs = aggregate_krum(_flower_input(clients), num_malicious=f, to_keep=0)
    _assert_close(_ours(Krum(f), clients, rng), theirs, seed, f"Krum({f}), n={n}")


@pytest.mark.parametrize("seed", range(CASES))
def test_multikrum_matches_flower(seed: int) -> None:
    rng = np.random.default_rng([4, seed])
    f = int(rng.integers(0, 4))
    # n >= 4: with f = 0 and n = 3 a score counts one neighbour, and which of a tied nearest
    # pair numpy's argsort keeps at the m-th place is unspecified.
    n = int(rng.integers(max(2 * f + 3, 4), 2 * f + 9))
    m = int(rng.integers(1, n - f + 1))
    clients = _clients(rng, n, int(rng.integers(0, f + 1)), _dtype(seed))
    theirs = aggregate_krum(_flower_input(clients), num_malicious=f, to_keep=m)
    _assert_close(_ours(MultiKrum(f, m), clients, rng), theirs, seed, f"MultiKrum({f}, {m})")


@pytest.mark.parametrize("seed", range(CASES))
def test_bulyan_matches_flower(seed: int) -> None:
    rng = np.random.default_rng([5, seed])
    f = int(rng.integers(0, 3))
    n = int(rng.integers(4 * f + 3, 4 * f + 8))
    clients = _clients(rng, n, int(rng.integers(0, f + 1)), _dtype(seed))
    theirs = aggregate_bulyan(_flower_input(clients), f, aggregate_krum, to_keep=0)
    _assert_close(_ours(Bulyan(f), clients, rng), theirs, seed, f"Bulyan({f}), n={n}")


# --- the Message-API strategies of flwr.serverapp.strategy ---------------------------------------


def _replies(clients: Sequence[Client]) -> list[Message]:
    """Reply messages as a ServerApp receives them: one ArrayRecord and ``num-examples``."""
    out = []
    for i, (layers, n) in enumerate(clients):
        arrays = ArrayRecord({f"l{j}": Array(a.astype(np.float64)) for j, a in enumerate(layers)})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
        meta = Metadata(
            run_id=1,
            message_id=f"reply-{i}",
            src_node_id=i + 1,
            dst_node_id=0,
            reply_to_message_id=f"train-{i}",
            group_id="1",
            created_at=0.0,
            ttl=1e9,
            message_type="train",
        )
        out.append(Message(content, metadata=meta))
    return out


def _serverapp(strategy: Any, clients: Sequence[Client]) -> Layers:
    arrays, _ = strategy.aggregate_train(1, _replies(_lexicographic(clients)))
    return [arrays[f"l{j}"].numpy() for j in range(len(clients[0][0]))]


def _iterative_krum(contents: list[RecordDict], f: int, theta: int) -> list[RecordDict]:
    """The paper's (and legacy Flower's) Bulyan selection, from Flower's own Krum step."""
    rest, chosen = list(contents), []
    for _ in range(theta):
        (best,) = select_multikrum(rest, num_malicious_nodes=f, num_nodes_to_select=1)
        chosen.append(best)
        rest = [c for c in rest if c is not best]
    return chosen


@pytest.mark.parametrize("seed", range(SERVERAPP_CASES))
def test_serverapp_median_and_trimmed_mean_match_ours(seed: int) -> None:
    rng = np.random.default_rng([7, seed])
    n = int(rng.integers(1, 13))
    beta = float(rng.uniform(0, 0.5))
    clients = _clients(rng, n, int(beta * n), _dtype(seed))
    _assert_close(
        _ours(Median(), clients, rng), _serverapp(flower.FedMedian(), clients), seed, "FedMedian"
    )
    theirs = _serverapp(flower.FedTrimmedAvg(beta=beta), clients)
    _assert_close(_ours(TrimmedMean(beta), clients, rng), theirs, seed, "FedTrimmedAvg")


@pytest.mark.parametrize("seed", range(SERVERAPP_CASES))
def test_serverapp_krum_and_multikrum_match_ours(seed: int) -> None:
    # f >= 1 and n >= f + 4 give every score >= 2 neighbours: Flower's serverapp distances
    # (|x|² + |y|² − 2x·y) are not exactly symmetric, so nearest-pair ties would be a coin toss.
    rng = np.random.default_rng([8, seed])
    f = int(rng.integers(1, 4))
    n = int(rng.integers(2 * f + 3, 2 * f + 9))
    m = int(rng.integers(1, n - f + 1))
    clients = _clients(rng, n, int(rng.integers(0, f + 1)), _dtype(seed))
    theirs = _serverapp(flower.Krum(num_malicious_nodes=f), clients)
    _assert_close(_ours(Krum(f), clients, rng), theirs, seed, f"Krum({f})")
    theirs = _serverapp(flower.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m), clients)
    _assert_close(_ours(MultiKrum(f, m), clients, rng), theirs, seed, f"MultiKrum({f}, {m})")


@pytest.mark.usefixtures("no_forced_gc")
@pytest.mark.parametrize("seed", range(SERVERAPP_CASES))
def test_serverapp_bulyan_with_iterative_selection_matches_ours(seed: int) -> None:
    # f = 0 or f = 3: with f in {1, 2} the last Krum steps count one neighbour (see above).
    rng = np.random.default_rng([9, seed])
    f = int(rng.choice([0, 3]))
    n = int(rng.integers(4 * f + 3, 4 * f + 6))
    clients = _clients(rng, n, int(rng.integers(0, f + 1)), _dtype(seed))
    strategy = flower.Bulyan(num_malicious_nodes=f, selection_rule=_iterative_krum)
    _assert_close(_ours(Bulyan(f), clients, rng), _serverapp(strategy, clients), seed, "Bulyan")


# --- documented differences ---------------------------------------------------------------------


def _one_layer(*values: float, weights: Sequence[int] | None = None) -> list[Client]:
    ws = weights or [1] * len(values)
    return [([np.array([v])], w) for v, w in zip(values, ws, strict=True)]


@pytest.mark.usefixtures("no_forced_gc")
def test_serverapp_bulyan_selects_in_one_shot_unlike_the_paper() -> None:
    # Krum scores (f = 1) on the full set rank 0.3 below the other honest values, so the one-shot
    # rule keeps {1.0, 2.9, 6.1, 6.5, 7.4}, median 6.1, mean of the 3 nearest 6.67. Re-scoring
    # after each choice picks 2.9, 6.1, 1.0, 6.5, 0.3: median 2.9, mean of {2.9, 1.0, 0.3} 1.4.
    clients = _one_layer(0.3, 1.0, 2.9, 6.1, 6.5, 7.4, 30.0)
    ours = _ours(Bulyan(1), clients, np.random.default_rng(0))
    legacy = aggregate_bulyan(_flower_input(clients), 1, aggregate_krum, to_keep=0)
    iterative = flower.Bulyan(num_malicious_nodes=1, selection_rule=_iterative_krum)
    one_shot = _serverapp(flower.Bulyan(num_malicious_nodes=1), clients)
    _assert_close(ours, legacy, 0, "Bulyan vs legacy")
    _assert_close(ours, _serverapp(iterative, clients), 0, "Bulyan vs iterative serverapp")
    assert ours[0][0] == pytest.approx(1.4)
    assert one_shot[0][0] == pytest.approx((6.1 + 6.5 + 7.4) / 3)


def test_flower_krum_depends_on_reply_order_and_ours_does_not() -> None:
    # f = 0, n = 3: a score is the distance to the single nearest other update, so the nearest
    # pair (0, 1) ties; Flower returns whichever comes first, we return the smaller (0.0).
    clients = _one_layer(0.0, 1.0, 5.0)
    for order in ([0, 1, 2], [1, 0, 2]):
        given = [clients[i] for i in order]
        flower_value = aggregate_krum([([a[0].copy()], w) for a, w in given], 0, 0)[0][0]
        assert flower_value == given[0][0][0][0]
        ours = _ours(Krum(0), given, np.random.default_rng(order[0]))
        assert ours[0][0] == 0.0


def test_zero_weight_clients_take_no_part_in_ours_but_do_in_flower() -> None:
    values = [0.0, 1.0, 2.0, 3.0, 100.0, 100.0, 100.0]
    weights = [1, 1, 1, 1, 0, 0, 0]
    clients = _one_layer(*values, weights=weights)
    participants = [c for c in clients if c[1] > 0]
    rng = np.random.default_rng(0)
    for ours_agg, flower_fn in [
        (Median(), aggregate_median),
        (TrimmedMean(0.2), lambda r: aggregate_trimmed_avg(r, 0.2)),
        (Krum(0), lambda r: aggregate_krum(r, 0, 0)),
    ]:
        ours = _ours(ours_agg, clients, rng)
        _assert_close(ours, flower_fn(_flower_input(participants)), 0, repr(ours_agg))
        with_zeros = flower_fn(_flower_input(clients))
        assert abs(float(ours[0][0]) - float(with_zeros[0][0])) > 0.4, repr(ours_agg)


@pytest.mark.parametrize(
    ("ours", "flower_fn", "n"),
    [
        (Krum(2), lambda r: aggregate_krum(r, 2, 0), 6),
        (MultiKrum(1, 5), lambda r: aggregate_krum(r, 1, 5), 5),
    ],
    ids=["krum-n-below-2f+3", "multikrum-m-above-n-f"],
)
def test_cohorts_flower_accepts_and_ours_rejects(
    ours: Aggregator, flower_fn: Callable[[Any], Any], n: int
) -> None:
    clients = _one_layer(*[float(i) for i in range(n)])
    assert len(flower_fn(_flower_input(clients))) == 1
    updates: list[dict[str, Tensor]] = [{"l0": torch.from_numpy(c[0][0])} for c in clients]
    with pytest.raises(CompatibilityError, match="sample more clients"):
        ours.aggregate(updates, [1.0] * n, {})
