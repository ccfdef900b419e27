"""Server state checkpoints: exact round trips, corruption detected, atomic ``latest.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from torch import nn

import fedtransfer.state.checkpoint as state_module
from fedtransfer import CompatibilityError, Recipe, ServerState, run_round, tree
from fedtransfer.data import FederatedDataset
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import ServerAdam, ServerPipeline
from fedtransfer.state import load_history, load_state, save_state
from fedtransfer.transfer import LocalBatchNorm

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def trained(
    tiny_recipe: Recipe, tiny_data: FederatedDataset, tiny_model_fn: Callable[[], nn.Module]
) -> ServerState:
    """State after one round of FedBN + FedAdam: params, server state and client states set."""
    recipe = dataclasses.replace(
        tiny_recipe,
        policy=LocalBatchNorm(),
        pipeline=ServerPipeline(post=(ServerAdam(lr=0.01),)),
    )
    state = ServerState.initial(recipe, tiny_model_fn(), seed=3)
    state, _ = run_round(recipe, state, tiny_data, SerialRuntime(), model_fn=tiny_model_fn)
    return state


def _assert_same_state(a: ServerState, b: ServerState) -> None:
    assert (a.round, a.seed, a.distribution.start_sha256) == (
        b.round,
        b.seed,
        b.distribution.start_sha256,
    )
    assert tree.equal(a.params, b.params)
    assert tree.equal(a.distribution.start, b.distribution.start)
    assert tree.equal(a.server, b.server)
    assert a.holdings.local.keys() == b.holdings.local.keys()
    assert all(tree.equal(a.holdings.local[c], b.holdings.local[c]) for c in a.holdings.local)
    assert a.distribution.set_up == b.distribution.set_up
    assert a.ledger == b.ledger


def _pointer(root: Path) -> Path:
    return root / json.loads((root / "latest.json").read_text())["checkpoint"]


def test_save_state_load_state_roundtrip_is_exact(trained: ServerState, tmp_path: Path) -> None:
    save_state(trained, tmp_path)
    loaded = load_state(tmp_path)
    assert (
        trained.server and trained.holdings.local and trained.ledger["up"] > 0
    )  # non-trivial state
    _assert_same_state(loaded, trained)


def test_save_state_keeps_the_callers_history_with_the_state(
    trained: ServerState, tmp_path: Path
) -> None:
    history = [{"round": 0, "accuracy": 0.5}, {"round": 1, "accepted": 5, "client/steps": 10.0}]
    save_state(trained, tmp_path, history=history)
    assert load_history(tmp_path) == tuple(history)
    save_state(trained.replace(round=2), tmp_path, history=[*history, {"round": 2}])
    assert load_history(tmp_path)[-1] == {"round": 2}
    save_state(trained.replace(round=3), tmp_path)
    assert load_history(tmp_path) == ()


def test_save_state_roundtrip_of_initial_state_is_exact(
    tiny_state: ServerState, tmp_path: Path
) -> None:
    save_state(tiny_state, tmp_path)
    _assert_same_state(load_state(tmp_path), tiny_state)


def _round_name(path: Path) -> str:
    """``round-00001-<unique id>`` → ``round-00001``; other names unchanged."""
    return path.name.rsplit("-", 1)[0] if path.name.startswith("round-") else path.name


def test_save_state_writes_round_folder(trained: ServerState, tmp_path: Path) -> None:
    folder = save_state(trained, tmp_path)
    assert folder.parent == tmp_path and _round_name(folder) == "round-00001"
    assert {p.name for p in folder.iterdir()} == {"state.json", "state.safetensors", "digests.json"}


def test_load_state_detects_modified_start_tensor(trained: ServerState, tmp_path: Path) -> None:
    folder = save_state(trained, tmp_path)
    flat = load_file(str(folder / "state.safetensors"))
    key = next(k for k in flat if k.startswith("start/") and flat[k].dtype.is_floating_point)
    flat[key] = flat[key].clone()
    flat[key].view(-1)[0] += 1.0
    save_file(flat, str(folder / "state.safetensors"))
    with pytest.raises(CompatibilityError, match="does not match"):
        load_state(tmp_path)


def test_load_state_detects_missing_start_tensor(trained: ServerState, tmp_path: Path) -> None:
    folder = save_state(trained, tmp_path)
    flat = load_file(str(folder / "state.safetensors"))
    del flat[next(k for k in flat if k.startswith("start/"))]
    save_file(flat, str(folder / "state.safetensors"))
    with pytest.raises(CompatibilityError, match="does not match"):
        load_state(tmp_path)


def test_load_state_without_checkpoint_raises_compatibility_error(tmp_path: Path) -> None:
    with pytest.raises(CompatibilityError, match=r"latest\.json"):
        load_state(tmp_path)


def test_load_state_wrong_format_raises_compatibility_error(
    trained: ServerState, tmp_path: Path
) -> None:
    folder = save_state(trained, tmp_path)
    meta = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(CompatibilityError, match="format"):
        load_state(tmp_path)


def test_save_state_latest_points_at_complete_folder_after_each_save(
    trained: ServerState, tmp_path: Path
) -> None:
    for r in range(1, 5):
        save_state(trained.replace(round=r), tmp_path)
        folder = _pointer(tmp_path)
        assert _round_name(folder) == f"round-{r:05d}"
        assert (folder / "state.json").is_file() and (folder / "state.safetensors").is_file()
        assert load_state(tmp_path).round == r


def test_save_state_crash_while_writing_keeps_previous_latest(
    trained: ServerState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_state(trained, tmp_path)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(state_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_state(trained.replace(round=2), tmp_path)
    monkeypatch.undo()
    assert _round_name(_pointer(tmp_path)) == "round-00001"
    _assert_same_state(load_state(tmp_path), trained)


def test_save_state_crash_while_resaving_latest_round_keeps_latest_complete(
    trained: ServerState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saving the round ``latest.json`` already names (e.g. re-saving after a resume) must not
    leave ``latest.json`` naming a folder that a crash has removed."""
    save_state(trained, tmp_path)
    real_replace = os.replace

    def crash_on_folder(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        if Path(src).is_dir():
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_folder)
    with pytest.raises(OSError, match="killed"):
        save_state(trained, tmp_path)
    monkeypatch.undo()
    folder = _pointer(tmp_path)
    assert (folder / "state.json").is_file() and (folder / "state.safetensors").is_file()


def test_save_state_keep_two_prunes_older_rounds(trained: ServerState, tmp_path: Path) -> None:
    for r in range(1, 5):
        save_state(trained.replace(round=r), tmp_path, keep=2)
    rounds = sorted(_round_name(p) for p in tmp_path.iterdir() if p.is_dir())
    assert rounds == ["round-00003", "round-00004"]


def test_save_state_keep_one_leaves_only_latest(trained: ServerState, tmp_path: Path) -> None:
    for r in range(1, 4):
        save_state(trained.replace(round=r), tmp_path, keep=1)
    assert sorted(_round_name(p) for p in tmp_path.iterdir() if p.is_dir()) == ["round-00003"]
    assert _round_name(_pointer(tmp_path)) == "round-00003"


def test_save_state_leaves_no_temporary_files(trained: ServerState, tmp_path: Path) -> None:
    save_state(trained, tmp_path)
    save_state(trained.replace(round=2), tmp_path)
    assert sorted(_round_name(p) for p in tmp_path.iterdir()) == [
        "latest.json",
        "round-00001",
        "round-00002",
    ]


def test_load_state_resumes_identically(
    tiny_recipe: Recipe,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
    tiny_state: ServerState,
    tmp_path: Path,
) -> None:
    one, _ = run_round(tiny_recipe, tiny_state, tiny_data, SerialRuntime(), model_fn=tiny_model_fn)
    straight, _ = run_round(tiny_recipe, one, tiny_data, SerialRuntime(), model_fn=tiny_model_fn)
    save_state(one, tmp_path)
    resumed, _ = run_round(
        tiny_recipe, load_state(tmp_path), tiny_data, SerialRuntime(), model_fn=tiny_model_fn
    )
    assert tree.equal(resumed.params, straight.params)
    assert resumed.ledger == straight.ledger
