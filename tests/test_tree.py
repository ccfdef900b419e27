"""Unit tests for :mod:`fedtransfer.tree`: pure operations on parameter mappings."""

from __future__ import annotations

import pytest
import torch

from fedtransfer import tree


def _ab() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3, dtype=torch.int64)}
    b = {"w": torch.tensor([0.5, -1.0]), "n": torch.tensor(2, dtype=torch.int64)}
    return a, b


def test_add_adds_key_by_key() -> None:
    a, b = _ab()
    out = tree.add(a, b)
    assert tree.equal(out, {"w": torch.tensor([1.5, 1.0]), "n": torch.tensor(5)})


def test_add_does_not_mutate_inputs() -> None:
    a, b = _ab()
    before = (tree.clone(a), tree.clone(b))
    tree.add(a, b)
    assert tree.equal(a, before[0]) and tree.equal(b, before[1])


def test_add_keeps_dtype_of_first_argument() -> None:
    out = tree.add({"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.float64)})
    assert out["w"].dtype == torch.float32


def test_add_with_different_keys_raises_value_error() -> None:
    with pytest.raises(ValueError, match="key sets differ"):
        tree.add({"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_sub_subtracts_key_by_key() -> None:
    a, b = _ab()
    assert tree.equal(tree.sub(a, b), {"w": torch.tensor([0.5, 3.0]), "n": torch.tensor(1)})


def test_sub_with_different_keys_raises_value_error() -> None:
    with pytest.raises(ValueError, match="key sets differ"):
        tree.sub({"a": torch.ones(1)}, {"a": torch.ones(1), "b": torch.ones(1)})


def test_scale_multiplies_floating_tensors() -> None:
    out = tree.scale({"w": torch.tensor([1.0, -2.0])}, 0.5)
    assert tree.equal(out, {"w": torch.tensor([0.5, -1.0])})


def test_scale_rounds_integer_tensors_back_to_their_dtype() -> None:
    out = tree.scale({"n": torch.tensor([3, 4], dtype=torch.int64)}, 0.7)
    assert tree.equal(out, {"n": torch.tensor([2, 3], dtype=torch.int64)})


def test_zeros_like_keeps_shapes_and_dtypes() -> None:
    a, _ = _ab()
    out = tree.zeros_like(a)
    assert tree.equal(out, {"w": torch.zeros(2), "n": torch.tensor(0)})


def test_clone_shares_no_storage() -> None:
    a, _ = _ab()
    copy = tree.clone(a)
    copy["w"].add_(1.0)
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0]))


def test_clone_makes_tensors_contiguous() -> None:
    out = tree.clone({"w": torch.ones(3, 2).t()})
    assert out["w"].is_contiguous()


def test_weighted_mean_weights_trees() -> None:
    out = tree.weighted_mean([{"w": torch.tensor([0.0])}, {"w": torch.tensor([3.0])}], [1.0, 2.0])
    assert tree.equal(out, {"w": torch.tensor([2.0])})


def test_weighted_mean_accumulates_in_float64() -> None:
    trees = [{"w": torch.tensor([1e8])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([-1e8])}]
    out = tree.weighted_mean(trees, [1.0, 1.0, 1.0])
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], torch.tensor([1.0 / 3.0]))


def test_weighted_mean_rounds_integer_tensors() -> None:
    trees = [{"n": torch.tensor(1)}, {"n": torch.tensor(4)}]
    out = tree.weighted_mean(trees, [1.0, 1.0])
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 2


def test_weighted_mean_of_no_trees_raises_value_error() -> None:
    with pytest.raises(ValueError, match="no trees"):
        tree.weighted_mean([], [])


def test_weighted_mean_with_mismatched_weights_raises_value_error() -> None:
    with pytest.raises(ValueError, match="1 trees but 2 weights"):
        tree.weighted_mean([{"w": torch.ones(1)}], [1.0, 2.0])


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [float("nan"), 1.0]])
def test_weighted_mean_with_nonpositive_total_raises_value_error(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="sum to > 0"):
        tree.weighted_mean([{"w": torch.ones(1)}, {"w": torch.ones(1)}], weights)


def test_weighted_mean_with_different_keys_raises_value_error() -> None:
    with pytest.raises(ValueError, match="key sets differ"):
        tree.weighted_mean([{"a": torch.ones(1)}, {"b": torch.ones(1)}], [1.0, 1.0])


def test_global_norm_is_l2_norm_of_floating_tensors() -> None:
    a = {"x": torch.tensor([3.0]), "y": torch.tensor([[4.0]]), "n": torch.tensor(100)}
    assert tree.global_norm(a) == pytest.approx(5.0, abs=1e-12)


def test_select_returns_keys_in_the_order_given() -> None:
    a, _ = _ab()
    assert list(tree.select(a, ["n", "w"])) == ["n", "w"]


def test_select_missing_key_raises_key_error() -> None:
    a, _ = _ab()
    with pytest.raises(KeyError, match="missing"):
        tree.select(a, ["w", "missing"])


def test_cast_changes_only_floating_tensors() -> None:
    a, _ = _ab()
    out = tree.cast(a, torch.float16)
    assert out["w"].dtype == torch.float16 and out["n"].dtype == torch.int64


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_detects_non_finite_values(bad: float) -> None:
    assert not tree.all_finite({"ok": torch.ones(2), "w": torch.tensor([1.0, bad])})


def test_all_finite_ignores_integer_tensors() -> None:
    assert tree.all_finite({"w": torch.ones(2), "n": torch.tensor(-1)})


def test_equal_requires_same_dtype() -> None:
    assert not tree.equal({"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.float64)})


def test_equal_requires_same_shape() -> None:
    assert not tree.equal({"w": torch.ones(2)}, {"w": torch.ones(1, 2)})


def test_equal_requires_same_keys() -> None:
    assert not tree.equal({"w": torch.ones(2)}, {"v": torch.ones(2)})


def test_equal_detects_a_one_ulp_difference() -> None:
    assert not tree.equal({"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0 + 2**-23])})


def test_sha256_is_independent_of_key_order() -> None:
    a, _ = _ab()
    reordered = {"n": a["n"], "w": a["w"]}
    assert tree.sha256(a) == tree.sha256(reordered)


def test_sha256_is_independent_of_memory_layout() -> None:
    t = torch.arange(6.0).reshape(2, 3)
    assert tree.sha256({"w": t.t()}) == tree.sha256({"w": t.t().contiguous()})


def test_sha256_changes_with_one_bit() -> None:
    t = torch.arange(6.0)
    flipped = t.clone()
    flipped.view(torch.int32)[3] ^= 1
    assert tree.sha256({"w": t}) != tree.sha256({"w": flipped})


def test_sha256_changes_with_dtype() -> None:
    assert tree.sha256({"w": torch.zeros(2)}) != tree.sha256(
        {"w": torch.zeros(2, dtype=torch.int32)}
    )


def test_sha256_changes_with_shape() -> None:
    assert tree.sha256({"w": torch.zeros(2, 3)}) != tree.sha256({"w": torch.zeros(3, 2)})


def test_sha256_changes_with_key_name() -> None:
    assert tree.sha256({"a": torch.zeros(2)}) != tree.sha256({"b": torch.zeros(2)})
