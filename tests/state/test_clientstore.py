"""``ClientStore``: clients' states on disk give the same rounds, checkpoints and resumes as dicts,
checkpoints stay intact while later rounds write, and the in-memory cache stays bounded."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import make_tiny_data, make_tiny_model
from torch import Tensor

import fedtransfer.state.checkpoint as state_module
from fedtransfer import (
    CompatibilityError,
    ConfigError,
    LocalTraining,
    Recipe,
    ServerState,
    ditto,
    fedavg,
    run_round,
    scaffold,
    tree,
)
from fedtransfer.client.drift import Scaffold
from fedtransfer.rounds.buffered import FedBuff, run_buffered_step
from fedtransfer.rounds.schedule import Schedule, as_schedule
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import Uniform
from fedtransfer.state import ClientHoldings, load_state, save_state
from fedtransfer.state.clientstore import ClientStore, emptied, mapped, merged
from fedtransfer.transfer import Full, LocalBatchNorm, PersonalHead

pytestmark = pytest.mark.usefixtures("single_thread")

LOCAL = LocalTraining(lr=0.1, steps=2, batch_size=8)
DATA = make_tiny_data()

RECIPES: dict[str, Callable[[], Recipe]] = {
    "scaffold": lambda: scaffold(Full(), training=LOCAL, clients_per_round=3),
    "personal-head": lambda: fedavg(PersonalHead(), training=LOCAL, clients_per_round=3),
    "scaffold-fedbn": lambda: scaffold(LocalBatchNorm(), training=LOCAL, clients_per_round=2),
    "ditto": lambda: ditto(Full(), training=LOCAL, clients_per_round=3),
}


def _start(
    recipe: Recipe | Schedule, store: Path | None = None, *, cache_size: int | None = None
) -> ServerState:
    state = as_schedule(recipe).start(make_tiny_model(), seed=0)
    if store is None:
        return state
    return state.replace(
        holdings=ClientHoldings(
            ClientStore.open(store, cache_size=cache_size), ClientStore.open(store)
        )
    )


def _rounds(recipe: Recipe | Schedule, state: ServerState, rounds: int) -> ServerState:
    for _ in range(rounds):
        state, _ = run_round(recipe, state, DATA, SerialRuntime(), model_fn=make_tiny_model)
    return state


def _same_per_client(
    a: Mapping[str, Mapping[str, Tensor]], b: Mapping[str, Mapping[str, Tensor]]
) -> bool:
    """Same clients in the same order, same keys, dtypes and bits."""
    left, right = dict(a.items()), dict(b.items())
    return list(left) == list(right) and all(
        left[c].keys() == right[c].keys()
        and all(
            left[c][k].dtype == right[c][k].dtype and torch.equal(left[c][k], right[c][k])
            for k in left[c]
        )
        for c in left
    )


def _assert_same(a: ServerState, b: ServerState) -> None:
    assert (
        a.round == b.round
        and a.distribution.set_up == b.distribution.set_up
        and a.ledger == b.ledger
    )
    assert tree.equal(a.params, b.params) and tree.equal(a.server, b.server)
    assert _same_per_client(a.holdings.local, b.holdings.local), "clients differ"
    assert _same_per_client(a.holdings.memory, b.holdings.memory), "memory differs"


def _objects(root: Path) -> set[str]:
    return {p.name.split(".")[0] for p in (root / "objects").glob("*/*.safetensors")}


# --- the store itself -----------------------------------------------------------------------


def test_clientstore_roundtrip_is_exact_and_keeps_dtypes(tmp_path: Path) -> None:
    values = {
        "a": {"w": torch.randn(3, 4), "n": torch.tensor(7, dtype=torch.int64)},
        "b": {"h": torch.randn(2, dtype=torch.float64)},
        "c": {},
    }
    store = ClientStore.open(tmp_path, cache_size=0).updated(values)
    reopened = ClientStore.at(tmp_path, store.index)
    for s in (store, reopened):
        assert list(s) == ["a", "b", "c"] and len(s) == 3 and "a" in s and "z" not in s
        assert _same_per_client(s, values)
    assert store.disk_reads() >= 3  # cache_size=0: every read came from disk


def test_clientstore_updated_leaves_the_older_store_unchanged(tmp_path: Path) -> None:
    first = ClientStore.open(tmp_path).updated({"a": {"w": torch.zeros(2)}})
    second = first.updated({"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(1)}})
    assert torch.equal(first["a"]["w"], torch.zeros(2)) and "b" not in first
    assert torch.equal(second["a"]["w"], torch.ones(2)) and list(second) == ["a", "b"]
    assert first != second and first == ClientStore.at(tmp_path, first.index)


def test_clientstore_helpers_match_dicts(tmp_path: Path) -> None:
    values = {c: {"w": torch.full((2,), float(i)), "v": torch.ones(1)} for i, c in enumerate("abc")}
    store = ClientStore.open(tmp_path).updated(values)
    change = {"b": {"w": torch.zeros(2)}, "d": {}}
    assert _same_per_client(merged(store, change), merged(dict(values), change))
    keep_w: Callable[[dict[str, Tensor]], dict[str, Tensor]] = lambda held: {"w": held["w"]}  # noqa: E731
    assert _same_per_client(mapped(store, keep_w), mapped(dict(values), keep_w))
    assert len(emptied(store)) == 0 and isinstance(emptied(store), ClientStore)
    assert emptied(dict(values)) == {}
    assert merged(store, {}) is store


def test_clientstore_detects_a_corrupted_file(tmp_path: Path) -> None:
    store = ClientStore.open(tmp_path, cache_size=0).updated({"a": {"w": torch.zeros(4)}})
    path = next((tmp_path / "objects").glob("*/*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CompatibilityError, match="corrupted"):
        store["a"]


def test_clientstore_at_with_a_missing_file_raises(tmp_path: Path) -> None:
    index = ClientStore.open(tmp_path).updated({"a": {"w": torch.zeros(1)}}).index
    for path in (tmp_path / "objects").glob("*/*.safetensors"):
        path.unlink()
    with pytest.raises(CompatibilityError, match="missing"):
        ClientStore.at(tmp_path, index)


def test_clientstore_rejects_a_negative_cache_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cache_size"):
        ClientStore.open(tmp_path, cache_size=-1)


def test_clientstore_cache_never_holds_more_than_its_bound_of_clients(tmp_path: Path) -> None:
    store = ClientStore.open(tmp_path, cache_size=3)
    seen = []
    for step in range(20):
        store = store.updated({f"c{step % 7}": {"w": torch.full((8,), float(step))}})
        seen.append(store.cached())
        for c in list(store)[:5]:
            store[c]
            seen.append(store.cached())
    assert max(seen) == 3, seen
    assert len(store) == 7 and store.disk_reads() > 0


def test_clientstore_cache_respects_its_byte_bound(tmp_path: Path) -> None:
    # each client's file holds 1 KiB of tensor data plus a small header
    store = ClientStore.open(tmp_path, cache_size=100, cache_bytes=3000)
    counts = []
    for i in range(10):
        store = store.updated({f"c{i}": {"w": torch.zeros(256)}})
        counts.append(store.cached())
    assert 1 <= max(counts) <= 2, counts


def test_clientstore_rounds_keep_the_cache_within_its_bound(tmp_path: Path) -> None:
    recipe = RECIPES["scaffold-fedbn"]()
    state = _start(recipe, tmp_path, cache_size=2)
    for _ in range(4):
        state = _rounds(recipe, state, 1)
        assert isinstance(state.holdings.local, ClientStore)
        assert state.holdings.local.cached() <= 2
    assert len(state.holdings.local) > 2  # more clients stored than the cache holds


# --- rounds: store == dicts -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("cache_size", [None, 0])
def test_rounds_with_clientstore_equal_rounds_with_dicts(
    name: str, cache_size: int | None, tmp_path: Path
) -> None:
    recipe = RECIPES[name]()
    plain = _rounds(recipe, _start(recipe), 4)
    stored = _rounds(recipe, _start(recipe, tmp_path, cache_size=cache_size), 4)
    assert isinstance(stored.holdings.local, ClientStore) and isinstance(
        stored.holdings.memory, ClientStore
    )
    assert len(stored.holdings.local) > 0 and (
        name == "personal-head" or len(stored.holdings.memory) > 0
    )
    _assert_same(plain, stored)


def test_initial_with_client_store_uses_stores(tmp_path: Path) -> None:
    recipe = RECIPES["personal-head"]()
    state = ServerState.initial(recipe, make_tiny_model(), seed=0, client_store=tmp_path / "cs")
    assert isinstance(state.holdings.local, ClientStore) and isinstance(
        state.holdings.memory, ClientStore
    )
    assert (tmp_path / "cs" / "store.json").is_file()
    _assert_same(_rounds(recipe, state, 2), _rounds(recipe, _start(recipe), 2))


def test_staged_rounds_with_clientstore_equal_dicts(tmp_path: Path) -> None:
    base = Recipe(training=LOCAL, sampler=Uniform(3), objective=Scaffold())
    recipe = Schedule(((2, replace(base, policy=PersonalHead())), (None, base)))
    plain = _rounds(recipe, _start(recipe), 4)
    stored = _rounds(recipe, _start(recipe, tmp_path), 4)
    assert isinstance(stored.holdings.local, ClientStore) and stored.distribution.stage == 1
    _assert_same(plain, stored)


def test_fedbuff_with_clientstore_equals_dicts(tmp_path: Path) -> None:
    recipe = RECIPES["scaffold-fedbn"]()
    fedbuff = FedBuff(buffer_size=2, concurrency=4)

    def run(state: ServerState) -> ServerState:
        for _ in range(3):
            state, _ = run_buffered_step(
                recipe, state, DATA, SerialRuntime(), model_fn=make_tiny_model, fedbuff=fedbuff
            )
        return state

    _assert_same(run(_start(recipe)), run(_start(recipe, tmp_path)))


# --- checkpoints ----------------------------------------------------------------------------


def test_save_state_with_clientstore_references_files_and_roundtrips(tmp_path: Path) -> None:
    recipe = RECIPES["scaffold-fedbn"]()
    state = _rounds(recipe, _start(recipe, tmp_path / "store"), 2)
    folder = save_state(state, tmp_path / "ckpt")
    meta = json.loads((folder / "state.json").read_text())
    assert meta["format"] == state_module.FORMAT_STORES
    assert meta["stores"]["clients"]["path"] == "../store"
    flat = load_file(str(folder / "state.safetensors"))
    assert not any(k.startswith(("clients/", "memory/")) for k in flat)
    loaded = load_state(tmp_path / "ckpt")
    assert (
        isinstance(loaded.holdings.local, ClientStore)
        and loaded.holdings.local == state.holdings.local
    )
    _assert_same(loaded, state)


def test_resume_with_clientstore_is_bit_identical(tmp_path: Path) -> None:
    recipe = RECIPES["scaffold-fedbn"]()
    two = _rounds(recipe, _start(recipe, tmp_path / "store"), 2)
    save_state(two, tmp_path / "ckpt")
    straight = _rounds(recipe, two, 3)
    resumed = _rounds(recipe, load_state(tmp_path / "ckpt"), 3)
    _assert_same(resumed, straight)
    _assert_same(resumed, _rounds(recipe, _start(recipe), 5))


def test_earlier_checkpoint_stays_intact_after_later_rounds_and_collection(
    tmp_path: Path,
) -> None:
    recipe = RECIPES["scaffold"]()
    store = tmp_path / "store"
    two = _rounds(recipe, _start(recipe, store), 2)
    save_state(two, tmp_path / "early")
    expected = {c: tree.clone(two.holdings.local[c]) for c in two.holdings.local}
    expected_memory = {c: tree.clone(two.holdings.memory[c]) for c in two.holdings.memory}
    index = (two.holdings.local.index, two.holdings.memory.index)  # type: ignore[attr-defined]
    del two  # only the checkpoint's pin keeps round 2's files now
    state = load_state(tmp_path / "early")
    for _ in range(4):  # clients are rewritten; each save collects the unreferenced files
        state = _rounds(recipe, state, 1)
        save_state(state, tmp_path / "later", keep=1)
    del state
    early = load_state(tmp_path / "early")
    assert (early.holdings.local.index, early.holdings.memory.index) == index  # type: ignore[attr-defined]
    assert _same_per_client(early.holdings.local, expected)
    assert _same_per_client(early.holdings.memory, expected_memory)


def test_save_state_prunes_pins_and_collects_unreferenced_files(tmp_path: Path) -> None:
    recipe = RECIPES["scaffold"]()
    store, ckpt = tmp_path / "store", tmp_path / "ckpt"
    state = _start(recipe, store)
    kept: list[ServerState] = []
    for _ in range(5):
        state = _rounds(recipe, state, 1)
        kept = [*kept[-1:], state]  # the states alive at each save: the two checkpointed
        save_state(state, ckpt, keep=2)
    assert len(list((store / "pins").glob("*.bin"))) == 2
    referenced = {
        d
        for s in kept
        for group in (s.holdings.local, s.holdings.memory)
        for d in group.index.values()  # type: ignore[attr-defined]
    }
    assert _objects(store) == referenced  # rounds 1-3's own files were deleted
    assert load_state(ckpt).round == 5


def test_collect_keeps_the_files_of_live_unsaved_states(tmp_path: Path) -> None:
    recipe = RECIPES["scaffold"]()
    one = _rounds(recipe, _start(recipe, tmp_path / "store", cache_size=0), 1)  # reads: disk
    two = _rounds(recipe, one, 1)
    save_state(one, tmp_path / "ckpt", keep=1)  # collects: `two` is alive but not saved
    _assert_same(two, _rounds(recipe, _start(recipe), 2))
    before = _objects(tmp_path / "store")
    del one, two
    assert ClientStore.open(tmp_path / "store").collect() > 0  # `two`'s own files
    assert _objects(tmp_path / "store") < before
    assert load_state(tmp_path / "ckpt").round == 1


def test_save_state_crash_with_clientstore_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = RECIPES["scaffold"]()
    one = _rounds(recipe, _start(recipe, tmp_path / "store"), 1)
    save_state(one, tmp_path / "ckpt")
    two = _rounds(recipe, one, 1)
    real_pin = state_module.pin

    def crash(*args: object, **kwargs: object) -> None:
        real_pin(*args, **kwargs)  # type: ignore[arg-type]
        raise OSError("killed after pinning")

    monkeypatch.setattr(state_module, "pin", crash)
    with pytest.raises(OSError, match="killed"):
        save_state(two, tmp_path / "ckpt")
    monkeypatch.undo()
    del one, two
    _assert_same(load_state(tmp_path / "ckpt"), _rounds(recipe, _start(recipe), 1))
    three = _rounds(recipe, load_state(tmp_path / "ckpt"), 1)
    save_state(three, tmp_path / "ckpt", keep=1)  # cleans the stale folder and its pin
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".tmp")] == []
    assert len(list((tmp_path / "store" / "pins").glob("*.bin"))) == 1


def test_dict_checkpoints_keep_format_one(tmp_path: Path) -> None:
    recipe = RECIPES["scaffold"]()
    state = _rounds(recipe, _start(recipe), 1)
    folder = save_state(state, tmp_path)
    meta = json.loads((folder / "state.json").read_text())
    assert meta["format"] == state_module.FORMAT and "stores" not in meta
    assert sorted(meta["clients"]) == sorted(state.holdings.local)
