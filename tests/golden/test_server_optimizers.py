"""Golden one- and two-round server steps against closed forms (Reddi et al., arXiv 2003.00295).

Client ``i`` has the quadratic loss ``f_i(w) = ½‖w − c_i‖²``; one local SGD step of rate ``η``
from ``w`` gives the update ``Δ_i = −η (w − c_i)``, so the sample-weighted mean update is
``Δ = −η (w − c̄)`` with ``c̄ = Σ n_i c_i / Σ n_i``. Expected steps are computed in float64 numpy.

The end-to-end tests run :func:`fedtransfer.run_round` on a model whose logits are a single
parameter vector ``w`` (input ignored). With cross-entropy and one full-batch SGD step, client
``i``'s update is ``Δ_i = −η (softmax(w) − p_i)``, ``p_i`` its empirical label distribution.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from fedtransfer import ConfigError, LocalTraining, Recipe, ServerState, run_round, tree
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import (
    AllClients,
    ServerAdagrad,
    ServerAdam,
    ServerPipeline,
    ServerSGD,
    ServerYogi,
)
from fedtransfer.transfer import Full
from fedtransfer.types import UpdateContext

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-6
ETA = 0.1
COUNTS = np.array([10.0, 20.0, 30.0, 5.0])
W0 = np.array([0.5, -1.0, 2.0, 0.0, 0.25])
CENTRES = np.array(
    [
        [1.0, 0.0, -1.0, 2.0, 0.5],
        [-0.5, 1.5, 0.0, 1.0, -2.0],
        [2.0, -1.0, 1.0, -0.5, 0.0],
        [0.0, 0.5, 3.0, 1.0, 1.0],
    ]
)


def _client_updates(w: np.ndarray) -> list[np.ndarray]:
    return [-ETA * (w - c) for c in CENTRES]


def _mean_update(w: np.ndarray) -> np.ndarray:
    centre = (COUNTS[:, None] * CENTRES).sum(axis=0) / COUNTS.sum()
    return -ETA * (w - centre)


def _step(pipe: ServerPipeline, w: np.ndarray, state: dict[str, Tensor]) -> tuple[np.ndarray, dict]:
    """One server step on the quadratic clients' updates at ``w``, in float64."""
    updates = [{"w": torch.from_numpy(d)} for d in _client_updates(w)]
    params = {"w": torch.from_numpy(w)}
    out = pipe.apply(updates, COUNTS.tolist(), params=params, state=state)
    return out.value["w"].numpy(), out.state


def _rounds(pipe: ServerPipeline, num_rounds: int) -> list[np.ndarray]:
    """Steps of ``num_rounds`` rounds, each at the parameters the previous step reached."""
    w, steps = W0.copy(), []
    state = pipe.init({"w": torch.from_numpy(w)})
    for _ in range(num_rounds):
        step, state = _step(pipe, w, state)
        steps.append(step)
        w = w + step
    return steps


def _adaptive(m: np.ndarray, v: np.ndarray, lr: float, tau: float) -> np.ndarray:
    return lr * m / (np.sqrt(v) + tau)


def test_quadratic_client_updates_average_to_the_closed_form() -> None:
    mean = (COUNTS[:, None] * np.stack(_client_updates(W0))).sum(axis=0) / COUNTS.sum()
    np.testing.assert_allclose(mean, _mean_update(W0), rtol=0, atol=1e-12)


def test_fedavg_step_is_the_weighted_mean_update() -> None:
    (step,) = _rounds(ServerPipeline(post=(ServerSGD(),)), 1)
    np.testing.assert_allclose(step, _mean_update(W0), rtol=0, atol=TOL)


def test_fedavg_server_lr_scales_the_step() -> None:
    (step,) = _rounds(ServerPipeline(post=(ServerSGD(lr=0.3),)), 1)
    np.testing.assert_allclose(step, 0.3 * _mean_update(W0), rtol=0, atol=TOL)


def test_fedavgm_two_rounds_accumulate_momentum() -> None:
    lr, beta = 0.7, 0.9
    steps = _rounds(ServerPipeline(post=(ServerSGD(lr=lr, momentum=beta),)), 2)
    v1 = _mean_update(W0)
    w1 = W0 + lr * v1
    v2 = beta * v1 + _mean_update(w1)
    np.testing.assert_allclose(steps[0], lr * v1, rtol=0, atol=TOL)
    np.testing.assert_allclose(steps[1], lr * v2, rtol=0, atol=TOL)


def test_fedadam_first_round_has_no_bias_correction() -> None:
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    (step,) = _rounds(ServerPipeline(post=(ServerAdam(lr=lr, beta1=b1, beta2=b2, tau=tau),)), 1)
    d = _mean_update(W0)
    m, v = (1 - b1) * d, (1 - b2) * d**2
    np.testing.assert_allclose(step, _adaptive(m, v, lr, tau), rtol=0, atol=TOL)


def test_fedadam_second_round_uses_moving_averages() -> None:
    lr, b1, b2, tau = 0.05, 0.8, 0.95, 1e-2
    steps = _rounds(ServerPipeline(post=(ServerAdam(lr=lr, beta1=b1, beta2=b2, tau=tau),)), 2)
    d1 = _mean_update(W0)
    m1, v1 = (1 - b1) * d1, (1 - b2) * d1**2
    d2 = _mean_update(W0 + _adaptive(m1, v1, lr, tau))
    m2, v2 = b1 * m1 + (1 - b1) * d2, b2 * v1 + (1 - b2) * d2**2
    np.testing.assert_allclose(steps[1], _adaptive(m2, v2, lr, tau), rtol=0, atol=TOL)


def test_fedyogi_first_round_second_moment_is_scaled_square() -> None:
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    (step,) = _rounds(ServerPipeline(post=(ServerYogi(lr=lr, beta1=b1, beta2=b2, tau=tau),)), 1)
    d = _mean_update(W0)
    v = 0.0 - (1 - b2) * d**2 * np.sign(0.0 - d**2)
    np.testing.assert_allclose(v, (1 - b2) * d**2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(step, _adaptive((1 - b1) * d, v, lr, tau), rtol=0, atol=TOL)


def test_fedyogi_second_round_uses_sign_rule() -> None:
    lr, b1, b2, tau = 0.05, 0.8, 0.9, 1e-2
    steps = _rounds(ServerPipeline(post=(ServerYogi(lr=lr, beta1=b1, beta2=b2, tau=tau),)), 2)
    d1 = _mean_update(W0)
    m1, v1 = (1 - b1) * d1, (1 - b2) * d1**2
    d2 = _mean_update(W0 + _adaptive(m1, v1, lr, tau))
    m2 = b1 * m1 + (1 - b1) * d2
    v2 = v1 - (1 - b2) * d2**2 * np.sign(v1 - d2**2)
    np.testing.assert_allclose(steps[1], _adaptive(m2, v2, lr, tau), rtol=0, atol=TOL)


def test_fedadagrad_first_round_second_moment_is_square() -> None:
    lr, b1, tau = 0.05, 0.9, 1e-3
    (step,) = _rounds(ServerPipeline(post=(ServerAdagrad(lr=lr, beta1=b1, tau=tau),)), 1)
    d = _mean_update(W0)
    np.testing.assert_allclose(step, _adaptive((1 - b1) * d, d**2, lr, tau), rtol=0, atol=TOL)


def test_fedadagrad_second_round_sums_squares() -> None:
    lr, b1, tau = 0.05, 0.5, 1e-2
    steps = _rounds(ServerPipeline(post=(ServerAdagrad(lr=lr, beta1=b1, tau=tau),)), 2)
    d1 = _mean_update(W0)
    m1, v1 = (1 - b1) * d1, d1**2
    d2 = _mean_update(W0 + _adaptive(m1, v1, lr, tau))
    m2, v2 = b1 * m1 + (1 - b1) * d2, v1 + d2**2
    np.testing.assert_allclose(steps[1], _adaptive(m2, v2, lr, tau), rtol=0, atol=TOL)


# --- opt-in Adam bias correction (Kingma & Ba, arXiv 1412.6980) -------------------------------


def _corrected_lr(lr: float, b1: float, b2: float, k: int) -> float:
    return lr * np.sqrt(1 - b2**k) / (1 - b1**k)


@pytest.mark.parametrize(("correction", "offset"), [("adam", 0), ("flower", 1)])
def test_fedadam_bias_correction_two_rounds_scale_lr(correction: str, offset: int) -> None:
    """Round t uses lr·√(1−β₂ᵏ)/(1−β₁ᵏ) with k = t ("adam") or k = t + 1 ("flower")."""
    lr, b1, b2, tau = 0.05, 0.8, 0.95, 1e-2
    adam = ServerAdam(lr=lr, beta1=b1, beta2=b2, tau=tau, bias_correction=correction)
    steps = _rounds(ServerPipeline(post=(adam,)), 2)
    d1 = _mean_update(W0)
    m1, v1 = (1 - b1) * d1, (1 - b2) * d1**2
    step1 = _adaptive(m1, v1, _corrected_lr(lr, b1, b2, 1 + offset), tau)
    d2 = _mean_update(W0 + step1)
    m2, v2 = b1 * m1 + (1 - b1) * d2, b2 * v1 + (1 - b2) * d2**2
    np.testing.assert_allclose(steps[0], step1, rtol=0, atol=TOL)
    expected = _adaptive(m2, v2, _corrected_lr(lr, b1, b2, 2 + offset), tau)
    np.testing.assert_allclose(steps[1], expected, rtol=0, atol=TOL)


def test_fedadam_adam_bias_correction_first_step_is_lr_times_sign() -> None:
    """With k = 1 the corrected m / √v is Δ / |Δ|, so a tiny τ gives a step of ±lr."""
    adam = ServerAdam(lr=0.1, beta1=0.9, beta2=0.999, tau=1e-12, bias_correction="adam")
    (step,) = _rounds(ServerPipeline(post=(adam,)), 1)
    np.testing.assert_allclose(step, 0.1 * np.sign(_mean_update(W0)), rtol=0, atol=TOL)


def test_fedadam_default_is_uncorrected_without_step_counter() -> None:
    assert ServerAdam().bias_correction == "none"
    assert ServerAdam().init({"w": torch.zeros(2)}).keys() == {"m/w", "v/w"}


@pytest.mark.parametrize("correction", ["adam", "flower"])
def test_fedadam_bias_correction_state_counts_steps_and_roundtrips(correction: str) -> None:
    adam = ServerAdam(bias_correction=correction)
    params = {"w": torch.zeros(2), "n": torch.tensor(3)}
    state = adam.init(params)
    assert state["t"].dtype == torch.int64 and int(state["t"]) == 0
    for t in (1, 2, 3):
        state = adam.apply(
            {"w": torch.ones(2), "n": torch.tensor(1)}, state, UpdateContext(params)
        ).state
        assert int(state["t"]) == t
    assert tree.equal(load(save(dict(state))), state)


def test_fedadam_bias_correction_resumes_from_saved_state() -> None:
    adam = ServerAdam(lr=0.1, bias_correction="flower")
    params, update = {"w": torch.zeros(3)}, {"w": torch.tensor([1.0, -2.0, 0.5])}
    state = adam.apply(update, adam.init(params), UpdateContext(params)).state
    direct = adam.apply(update, state, UpdateContext(params))
    resumed = adam.apply(update, load(save(dict(state))), UpdateContext(params))
    assert tree.equal(direct.value, resumed.value)
    assert tree.equal(direct.state, resumed.state)


@pytest.mark.parametrize("value", [True, "kingma", "None", None])
def test_fedadam_unknown_bias_correction_raises_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match="bias_correction must be one of"):
        ServerAdam(bias_correction=value)  # type: ignore[arg-type]


# --- end to end through run_round -------------------------------------------------------------

LABELS = [[0, 0, 0, 1], [0, 1, 1, 1, 1, 1], [1, 0]]  # p_i = share of class 1: 1/4, 5/6, 1/2
LOGITS0 = np.array([0.3, -0.2])


class ConstantLogits(nn.Module):
    """Logits are the parameter ``w`` for every input, so the loss gradient is softmax(w) − p."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(LOGITS0, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return self.w.expand(x.shape[0], -1)


def _label_data() -> FederatedDataset:
    train = {
        f"c{i}": TensorData(torch.zeros(len(y), 1), torch.tensor(y)) for i, y in enumerate(LABELS)
    }
    test = {c: TensorData(torch.zeros(1, 1), torch.tensor([0])) for c in train}
    return FederatedDataset(train, test, num_classes=2)


def _expected_mean_update() -> np.ndarray:
    w = LOGITS0.astype(np.float32).astype(np.float64)
    softmax = np.exp(w) / np.exp(w).sum()
    deltas, counts = [], []
    for y in LABELS:
        p = np.bincount(y, minlength=2) / len(y)
        deltas.append(-ETA * (softmax - p))
        counts.append(len(y))
    return (np.array(counts)[:, None] * np.stack(deltas)).sum(axis=0) / sum(counts)


def _one_round(post: tuple) -> np.ndarray:
    recipe = Recipe(
        policy=Full(),
        training=LocalTraining(lr=ETA, steps=1, batch_size=64),
        pipeline=ServerPipeline(post=post),
        sampler=AllClients(),
    )
    state = ServerState.initial(recipe, ConstantLogits(), seed=0)
    new, report = run_round(recipe, state, _label_data(), SerialRuntime(), model_fn=ConstantLogits)
    assert report.accepted == ("c0", "c1", "c2")
    return new.params["w"].double().numpy() - state.params["w"].double().numpy()


def test_run_round_fedavg_step_matches_closed_form() -> None:
    step = _one_round((ServerSGD(),))
    np.testing.assert_allclose(step, _expected_mean_update(), rtol=0, atol=TOL)


@pytest.mark.parametrize(
    ("transform", "second_moment"),
    [
        (ServerAdam(lr=0.05), lambda d: 0.01 * d**2),
        (ServerYogi(lr=0.05), lambda d: 0.01 * d**2),
        (ServerAdagrad(lr=0.05), lambda d: d**2),
    ],
    ids=["adam", "yogi", "adagrad"],
)
def test_run_round_adaptive_step_matches_closed_form(transform, second_moment) -> None:
    step = _one_round((transform,))
    d = _expected_mean_update()
    expected = _adaptive(0.1 * d, second_moment(d), 0.05, 1e-3)
    np.testing.assert_allclose(step, expected, rtol=0, atol=TOL)
