"""RayRuntime: bit-identical rounds to the serial runtime on a local Ray instance, clear errors."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.conftest import make_tiny_data, make_tiny_model

from fedtransfer import (
    LocalTraining,
    Recipe,
    Runtime,
    ServerState,
    fedavg,
    run_round,
    scaffold,
    tree,
)
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.runtime import RayRuntime, SerialRuntime, WorkerLost
from fedtransfer.transfer import Full, LocalBatchNorm

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 5
LOCAL = LocalTraining(lr=0.1, steps=2, batch_size=8)
RECIPES = {
    "fedavg-full": fedavg(Full(), training=LOCAL, clients_per_round=3),
    "scaffold-localbn": scaffold(LocalBatchNorm(), training=LOCAL, clients_per_round=3),
}

pytestmark = pytest.mark.usefixtures("single_thread")


def die_on_three(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.fixture(scope="module")
def runtime() -> Iterator[RayRuntime]:
    """One local Ray instance with 2 CPUs (started by the runtime, on loopback), two actors.

    Ray workers put the driver's working directory on their ``sys.path``; from the repository
    root they import ``tests.conftest`` (the model factory) by name."""
    import ray

    assert not ray.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.syspath_prepend(str(ROOT))
        with RayRuntime(num_actors=2, threads=1) as rt:
            yield rt
    assert not ray.is_initialized()  # shutdown() stopped the instance it started


def run_rounds(recipe: Recipe, runtime: Runtime, data: FederatedDataset) -> ServerState:
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    for _ in range(ROUNDS):
        state, _ = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    return state


def test_repr_is_the_config() -> None:
    rt = RayRuntime(num_actors=2, threads=1)
    assert repr(rt) == "RayRuntime(address=None, num_actors=2, num_cpus_per_actor=1, threads=1)"
    assert pickle.loads(pickle.dumps(rt)) == rt
    assert isinstance(rt, Runtime)


def test_missing_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "fedtransfer\[ray\]"'):
        RayRuntime()


def test_import_fedtransfer_does_not_import_ray() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import fedtransfer\n"
        "from fedtransfer.runtime import RayRuntime\n"
        "try:\n"
        "    RayRuntime()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert 'pip install "fedtransfer[ray]"' in out.stdout


def test_local_instance_is_on_loopback_and_maps_in_order(runtime: RayRuntime) -> None:
    import ray

    tasks = [5, 3, 9, 1, 7, 2, 11, 4, 8, 6, 0, 10]
    assert runtime.map(lambda t: (t, t * t), tasks) == [(t, t * t) for t in tasks]
    assert runtime.map(lambda t: t, []) == []
    assert set(runtime.map(lambda _: torch.get_num_threads(), range(6))) == {1}
    assert ray.cluster_resources()["CPU"] == 2
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


@pytest.mark.parametrize("name", RECIPES)
def test_five_rounds_are_bit_identical_to_serial(
    runtime: RayRuntime, tiny_data: FederatedDataset, name: str
) -> None:
    recipe = RECIPES[name]
    reference = run_rounds(recipe, SerialRuntime(), tiny_data)
    result = run_rounds(recipe, runtime, tiny_data)
    start = ServerState.initial(recipe, make_tiny_model(), seed=0)
    assert not tree.equal(reference.params, start.params)
    assert result.round == reference.round == ROUNDS
    assert result.params.keys() == reference.params.keys()
    assert all(torch.equal(result.params[k], reference.params[k]) for k in reference.params)
    assert result.ledger == reference.ledger
    assert tree.equal(result.server, reference.server)
    assert result.holdings.local.keys() == reference.holdings.local.keys()
    assert all(
        tree.equal(result.holdings.local[c], reference.holdings.local[c])
        for c in reference.holdings.local
    )
    assert result.holdings.memory.keys() == reference.holdings.memory.keys()
    assert all(
        tree.equal(result.holdings.memory[c], reference.holdings.memory[c])
        for c in reference.holdings.memory
    )
    if name == "scaffold-localbn":
        assert (
            reference.holdings.local and reference.holdings.memory
        )  # local keys and memory round-tripped


def test_a_failing_client_is_rejected_alike(
    runtime: RayRuntime, tiny_data: FederatedDataset
) -> None:
    bad = dict(tiny_data.train)
    bad["c3"] = TensorData(torch.randn(24, 1, 7, 7), bad["c3"].y)  # wrong input size
    data = FederatedDataset(bad, tiny_data.test, tiny_data.num_classes)
    recipe = fedavg(Full(), training=LOCAL, clients_per_round=5)
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    serial, serial_report = run_round(
        recipe, state, data, SerialRuntime(), model_fn=make_tiny_model
    )
    remote, report = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    assert [c for c, _ in report.rejected] == ["c3"] and "failed: RuntimeError" in report.rejected[
        0
    ][1]
    assert report.rejected == serial_report.rejected
    assert tree.equal(remote.params, serial.params)
    assert runtime.map(lambda t: t + 1, [1]) == [2]  # the actors survive a task's error


def test_killed_actor_is_a_clear_error_and_the_next_map_starts_afresh(
    runtime: RayRuntime,
) -> None:
    with pytest.raises(
        WorkerLost, match=r"Ray actor \d died while it held the tasks at indices (.*, )?2\b"
    ):
        runtime.map(die_on_three, [1, 2, 3, 4, 5, 6])
    assert runtime.map(lambda t: -t, [1, 2]) == [-1, -2]


def test_a_fresh_population_runs_after_a_lost_actor(runtime: RayRuntime) -> None:
    data = make_tiny_data(seed=1)
    recipe = RECIPES["fedavg-full"]
    assert tree.equal(
        run_rounds(recipe, runtime, data).params, run_rounds(recipe, SerialRuntime(), data).params
    )
