"""ProcessRuntime: bit-identical rounds to the serial runtime, task order, clear errors."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.conftest import make_tiny_model
from torch import nn

from fedtransfer import (
    ConfigError,
    LocalTraining,
    Recipe,
    Runtime,
    ServerState,
    fedavg,
    run_round,
    scaffold,
    tree,
)
from fedtransfer.cli import main
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.experiment.run import final_weights
from fedtransfer.runtime import ProcessRuntime, SerialRuntime, WorkerLost, transport
from fedtransfer.transfer import Full, LocalBatchNorm

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 5
LOCAL = LocalTraining(lr=0.1, steps=2, batch_size=8)

pytestmark = pytest.mark.usefixtures("single_thread")


# --- functions the workers run (module level: they pickle by name) ---------------------------


def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"task {x} is not welcome")
    return x


def die_on_three(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def tensor_identity(t: torch.Tensor) -> tuple[int, float]:
    """Which object the worker holds for ``t`` (identity is kept while the caller keeps ``t``)."""
    return id(t), float(t.sum())


def worker_threads(_: object) -> int:
    return torch.get_num_threads()


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def importable() -> Iterator[None]:
    """Spawned workers import this module and ``tests.conftest`` by name, as a user's workers
    import the user's package: the repository root must be on the ``sys.path`` they copy."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        yield


@pytest.fixture(scope="module")
def runtime(importable: None) -> Iterator[ProcessRuntime]:
    with ProcessRuntime(workers=2, threads=1) as rt:
        yield rt


def run_rounds(recipe: Recipe, runtime: Runtime, data: FederatedDataset) -> ServerState:
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    for _ in range(ROUNDS):
        state, _ = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    return state


def assert_identical(a: ServerState, b: ServerState) -> None:
    """Bit-identical states: global weights, ledger bytes, server state, clients' keys and
    memory."""
    assert a.round == b.round == ROUNDS
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    assert a.ledger == b.ledger
    assert tree.equal(a.server, b.server)
    assert (
        a.holdings.local.keys() == b.holdings.local.keys()
        and a.holdings.memory.keys() == b.holdings.memory.keys()
    )
    assert all(tree.equal(a.holdings.local[c], b.holdings.local[c]) for c in a.holdings.local)
    assert all(tree.equal(a.holdings.memory[c], b.holdings.memory[c]) for c in a.holdings.memory)


RECIPES = {
    # three of five clients a round: clients join (and get set up) in different rounds
    "fedavg-full": fedavg(Full(), training=LOCAL, clients_per_round=3),
    # BatchNorm keys stay with each client and SCAFFOLD keeps control variates per client
    "scaffold-localbn": scaffold(LocalBatchNorm(), training=LOCAL, clients_per_round=3),
}


# --- tests ------------------------------------------------------------------------------------


def test_repr_is_the_config_and_threads_default_to_the_callers() -> None:
    assert repr(ProcessRuntime(workers=3, threads=2)) == (
        "ProcessRuntime(workers=3, threads=2, start_method='spawn')"
    )
    assert ProcessRuntime(workers=1).threads == torch.get_num_threads() == 1
    rt = ProcessRuntime(workers=2, threads=1)
    assert pickle.loads(pickle.dumps(rt)) == rt
    assert isinstance(rt, Runtime)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        ProcessRuntime(workers=0)
    with pytest.raises(ConfigError, match="start_method 'nope'"):
        ProcessRuntime(start_method="nope")  # type: ignore[arg-type]


def test_map_preserves_task_order_and_sets_worker_threads(runtime: ProcessRuntime) -> None:
    tasks = [5, 3, 9, 1, 7, 2, 11, 4, 8, 6, 0, 10]
    assert runtime.map(square, tasks) == [t * t for t in tasks]
    assert runtime.map(square, []) == []
    assert set(runtime.map(worker_threads, range(8))) == {1}


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("shared_min_bytes", [transport.SHARED_MIN_BYTES, 256])
def test_five_rounds_are_bit_identical_to_serial(
    runtime: ProcessRuntime,
    tiny_data: FederatedDataset,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    shared_min_bytes: int,
) -> None:
    # 256 bytes: the data, weights and broadcast model all travel once and by token
    monkeypatch.setattr(transport, "SHARED_MIN_BYTES", shared_min_bytes)
    recipe = RECIPES[name]
    reference = run_rounds(recipe, SerialRuntime(), tiny_data)
    result = run_rounds(recipe, runtime, tiny_data)
    assert not tree.equal(
        reference.params, ServerState.initial(recipe, make_tiny_model(), seed=0).params
    )
    assert_identical(result, reference)
    if name == "scaffold-localbn":
        assert (
            reference.holdings.local and reference.holdings.memory
        )  # local keys and memory round-tripped


def test_big_inputs_travel_once_and_keep_their_identity_and_close_stops_workers(
    importable: None,
) -> None:
    tasks = [torch.randn(64, 64) for _ in range(4)]  # 16 KiB each
    with ProcessRuntime(workers=1, threads=1) as rt:
        assert rt._state.pool is None  # started by the first map
        first = rt.map(tensor_identity, tasks)
        sent = rt.traffic().bytes_to_workers
        assert 4 * 64 * 64 * 4 <= sent < 5 * 64 * 64 * 4
        again = rt.map(tensor_identity, tasks)
        assert again == first  # same objects in the worker, nothing re-sent
        assert rt.traffic().bytes_to_workers - sent < 4096
        tasks[2].mul_(2)  # modified in place by the caller: sent again
        third = rt.map(tensor_identity, tasks)
        assert third[2][1] == pytest.approx(2 * first[2][1], rel=1e-5)
        assert third[2][0] != first[2][0] and third[:2] == first[:2]
        pool = rt._state.pool
        assert pool is not None and pool.alive()
        procs = list(pool.procs)
    assert not any(p.is_alive() for p in procs)  # leaving the block closed the pool
    assert rt._state.pool is None


def test_a_failing_client_is_rejected_alike_and_the_pool_survives(
    runtime: ProcessRuntime, tiny_data: FederatedDataset
) -> None:
    bad = dict(tiny_data.train)
    bad["c3"] = TensorData(torch.randn(24, 1, 7, 7), bad["c3"].y)  # wrong input size
    data = FederatedDataset(bad, tiny_data.test, tiny_data.num_classes)
    recipe = fedavg(Full(), training=LOCAL, clients_per_round=5)
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    # a client whose training raises is that client's rejection, the same on every runtime
    serial, serial_report = run_round(
        recipe, state, data, SerialRuntime(), model_fn=make_tiny_model
    )
    assert runtime.map(square, [2]) == [4]
    pool = runtime._state.pool
    parallel, report = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    assert [c for c, _ in report.rejected] == ["c3"] and "failed: RuntimeError" in report.rejected[
        0
    ][1]
    assert report.rejected == serial_report.rejected
    assert tree.equal(parallel.params, serial.params)
    with pytest.raises(ValueError, match="task 3 is not welcome"):
        runtime.map(fail_on_three, [1, 2, 3, 4, 5, 6])
    assert runtime.map(square, [1, 2, 3]) == [1, 4, 9]
    assert runtime._state.pool is pool  # a task's error does not cost the workers


def test_unpicklable_model_fn_is_a_clear_config_error(
    runtime: ProcessRuntime, tiny_data: FederatedDataset
) -> None:
    recipe = fedavg(Full(), training=LOCAL, clients_per_round=2)
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)

    def model_fn() -> nn.Module:
        return make_tiny_model()

    with pytest.raises(ConfigError, match="module-level function"):
        run_round(recipe, state, tiny_data, runtime, model_fn=model_fn)
    with pytest.raises(ConfigError, match="not a lambda"):
        runtime.map(lambda t: t, [1])


def test_function_workers_cannot_import_is_a_clear_config_error(
    runtime: ProcessRuntime,
) -> None:
    phantom = types.ModuleType("fedtransfer_phantom_module")  # exists in this process only
    exec("def double(x):\n    return 2 * x\n", phantom.__dict__)
    sys.modules[phantom.__name__] = phantom
    try:
        with pytest.raises(ConfigError, match=r"could not load .*fedtransfer_phantom_module"):
            runtime.map(phantom.double, [1, 2])
    finally:
        del sys.modules[phantom.__name__]
    assert runtime.map(square, [4]) == [16]  # a fresh pool


def test_killed_worker_is_a_clear_error_and_the_next_map_starts_afresh(
    runtime: ProcessRuntime,
) -> None:
    with pytest.raises(WorkerLost, match=r"killed by SIGKILL.* indices (.*, )?2\b"):
        runtime.map(die_on_three, [1, 2, 3, 4, 5, 6])
    assert runtime._state.pool is None
    assert runtime.map(square, [1, 2, 3]) == [1, 4, 9]


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(24.0).reshape(2, 3, 4),
        torch.arange(24.0).reshape(2, 3, 4).transpose(0, 2),  # dense, permuted
        torch.arange(48.0).reshape(4, 12)[:, ::3],  # strided with gaps
        torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last),
        torch.randn(6, dtype=torch.bfloat16),
        torch.tensor([True, False, True]),
        torch.tensor(3, dtype=torch.int64),
        torch.empty(0, 5),
        torch.randn(3, requires_grad=True),
        nn.Parameter(torch.randn(2, 2)),
    ],
    ids=repr,
)
def test_tensors_pickle_exactly(tensor: torch.Tensor) -> None:
    back = pickle.loads(transport.dumps(tensor))
    assert type(back) is type(tensor) and back.dtype == tensor.dtype
    assert torch.equal(back.detach(), tensor.detach())
    assert back.requires_grad == tensor.requires_grad
    if tensor.is_contiguous() or transport._dense(tensor):
        assert back.stride() == tensor.stride()


def test_a_view_pickles_only_its_own_elements() -> None:
    big = torch.randn(100, 1000)
    assert len(transport.dumps(big[3])) < 2 * 1000 * 4


def test_cli_runs_on_worker_processes_with_the_serial_results(tmp_path: Path) -> None:
    small = [
        "rounds=2",
        "data.num_clients=6",
        "sampler.clients_per_round=3",
        "personalization=null",
        "arms=[{name: scratch, init: scratch}]",
    ]
    sets = [x for item in small for x in ("--set", item)]
    common = ["run", *sets, "--runs-dir", str(tmp_path), "--threads", "1"]
    assert main([*common, "--name", "serial"]) == 0
    assert main([*common, "--name", "process", "--runtime", "process", "--workers", "2"]) == 0
    serial = final_weights(tmp_path / "serial", "scratch")
    assert tree.equal(final_weights(tmp_path / "process", "scratch"), serial)
    assert main([*common, "--name", "bad", "--workers", "2"]) == 2  # --workers needs a pool


def test_workers_stop_when_the_interpreter_exits() -> None:
    code = (
        "import os\n"
        "from fedtransfer.runtime import ProcessRuntime\n"
        "rt = ProcessRuntime(workers=2, threads=1)\n"
        "rt.map(abs, [1, 2])\n"
        "print(*(p.pid for p in rt._state.pool.procs))\n"  # exits without close()
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # joined by the exiting interpreter: not even a zombie left
