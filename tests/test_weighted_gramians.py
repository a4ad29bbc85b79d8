"""Data-weighted (Enns) Gramians of one LRU layer against independent references.

References: ``scipy.linalg.solve_discrete_lyapunov`` on the real form with the input
covariance, ``control.gram`` on ``(A, B_x L, C_x)`` with ``Σ_u = L Lᵀ``, and direct
simulation of the layer recursion (``lti_responses``). No mocks.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from lti_responses import frequency_response, simulate
from test_reduction import LAYERS, random_layer

from compressm_rl.compression import CompressionConfig, lru_layers
from compressm_rl.compression import gramians as gram
from compressm_rl.compression import lti as red
from compressm_rl.compression.plan import plan_reductions
from compressm_rl.runs import TrainConfig
from policies.lti import real_form


def random_covariance(H: int, seed: int, rank: int | None = None) -> np.ndarray:
    """A PSD ``[H, H]`` second moment of ``rank`` (default H) random input directions."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((H, rank or H))
    return G @ G.T / H + 0.3 * np.ones((H, H)) / H  # a mean component as well


@pytest.mark.parametrize("layer", LAYERS)
def test_weighted_gramian_solves_the_lyapunov_equation_with_the_input_covariance(layer):
    lam, B, C, _ = layer
    cov = random_covariance(B.shape[1], seed=7)
    P, Q = gram.gramians(lam, B, C, input_covariance=cov)
    A, Bx, Cx, _ = real_form(lam, B, C)
    P_ref = sla.solve_discrete_lyapunov(A, Bx @ cov @ Bx.T)
    np.testing.assert_allclose(P, P_ref, rtol=0, atol=1e-10 * np.abs(P_ref).max())
    # The observability side is the standard one.
    np.testing.assert_allclose(Q, gram.gramians(lam, B, C)[1], rtol=0, atol=0)
    # python-control (SLICOT sb03md) on (A, B_x L, C_x) agrees too.
    Pk, _ = gram.gramians(lam, B, C, "control", input_covariance=cov)
    np.testing.assert_allclose(P, Pk, rtol=0, atol=1e-10 * np.abs(Pk).max())


@pytest.mark.parametrize("layer", LAYERS)
def test_identity_covariance_gives_the_white_noise_hsvs(layer):
    lam, B, C, _ = layer
    H = B.shape[1]
    white = gram.hankel_singular_values(lam, B, C)
    weighted = gram.hankel_singular_values(lam, B, C, input_covariance=np.eye(H))
    np.testing.assert_allclose(weighted, white, rtol=0, atol=1e-12 * white[0])
    # Scaling Σ_u by s scales every HSV by √s: the rank rule is scale-free.
    scaled = gram.hankel_singular_values(lam, B, C, input_covariance=4.0 * np.eye(H))
    np.testing.assert_allclose(scaled, 2.0 * white, rtol=0, atol=1e-12 * white[0])


def test_input_covariance_is_the_second_moment_of_the_recorded_inputs():
    rng = np.random.default_rng(0)
    u = rng.standard_normal((5, 30, 3)).astype(np.float32) + 0.5
    flat = u.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(gram.input_covariance(u), flat.T @ flat / flat.shape[0])
    with pytest.raises(ValueError, match="finite"):
        gram.input_covariance(np.full((4, 3), np.nan))
    lam, B, C, _ = random_layer(4, 3, 0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        gram.gramians(lam, B, C, input_covariance=-np.eye(3))
    with pytest.raises(ValueError, match=r"\[H, H\]"):
        gram.gramians(lam, B, C, input_covariance=np.eye(2))


def layer_with_unexcited_modes(seed: int = 0, rotate: bool = True):
    """n = 10 modes, H = 4 inputs; the data only ever uses a 2-dimensional input subspace.

    Modes 0–5 are driven only through that subspace, modes 6–9 only through its
    orthogonal complement (which the inputs never visit). Returns the layer, an input
    basis ``E [4, 2]`` of the used subspace and Σ_u.
    """
    lam, B, C, D = random_layer(10, 4, seed, r_min=0.3, r_max=0.95)
    rng = np.random.default_rng(seed + 100)
    basis = np.linalg.qr(rng.standard_normal((4, 4)))[0] if rotate else np.eye(4)
    used, unused = basis[:, :2], basis[:, 2:]
    coeff = rng.standard_normal((10, 2)) + 1j * rng.standard_normal((10, 2))
    B = np.concatenate([coeff[:6] @ used.T, coeff[6:] @ unused.T]) * np.abs(B).mean()
    S = rng.standard_normal((2, 2))
    cov = used @ (S @ S.T + 0.5 * np.eye(2)) @ used.T
    return (lam, B, C, D), used, cov


@pytest.mark.parametrize("rotate", [False, True], ids=["axis_aligned", "rotated"])
def test_modes_the_inputs_never_excite_are_cut_exactly(rotate):
    (lam, B, C, D), used, cov = layer_with_unexcited_modes(rotate=rotate)
    white = gram.hankel_singular_values(lam, B, C)
    hsv = gram.hankel_singular_values(lam, B, C, input_covariance=cov)
    # 6 excited complex modes = 12 real states; the other 8 weighted HSVs vanish.
    assert white[19] > 1e-5 * white[0]  # white noise excites every mode
    assert hsv[11] > 1e-5 * hsv[0]
    # Zero to rounding (≈3e-17 σ_1 measured): _psd_factor drops the rounding-level
    # eigenvalues of P, whose square roots would otherwise read as σ ≈ 1e-9 σ_1.
    assert hsv[12:].max() <= 1e-14 * hsv[0], hsv[12:] / hsv[0]

    # Truncating to the excited rank keeps exactly the excited modes...
    result = red.balanced_truncation(lam, B, C, D, rank=12, input_covariance=cov)
    assert result.rank == 12 and result.state_dim == 6
    np.testing.assert_allclose(np.sort_complex(result.lam), np.sort_complex(lam[:6]), atol=1e-9)
    # ...and reproduces the layer's response to any input in the used subspace.
    rng = np.random.default_rng(3)
    u = rng.standard_normal((300, 2)) @ used.T
    y_full, _ = simulate(lam, B, C, D, u)
    y_red, _ = simulate(*result.system, u)
    assert np.abs(y_red - y_full).max() <= 1e-10 * np.abs(y_full).max()
    # The white-noise cut at that rank cannot know which modes matter: it errs on this data.
    white_cut = red.balanced_truncation(lam, B, C, D, rank=12)
    y_white, _ = simulate(*white_cut.system, u)
    assert np.abs(y_white - y_full).max() > 1e-4 * np.abs(y_full).max()
    # With the rank rule, hsv_rtol drops the exactly-zero directions by itself.
    by_tol = red.balanced_truncation(lam, B, C, D, tol=1e-9, input_covariance=cov)
    assert by_tol.rank == 12


@pytest.mark.parametrize("layer", LAYERS[:3])
@pytest.mark.parametrize("rank", [4, 10])
def test_weighted_bound_holds_for_the_weighted_error(layer, rank):
    lam, B, C, D = layer
    H = B.shape[1]
    cov = random_covariance(H, seed=11, rank=max(1, H - 1))
    result = red.balanced_truncation(lam, B, C, D, rank=rank, input_covariance=cov)
    omegas = np.concatenate(
        [np.linspace(0.0, np.pi, 2001), np.angle(lam[np.abs(lam) > 0.9]) % np.pi]
    )
    err = frequency_response(lam, B, C, D, omegas) - frequency_response(*result.system, omegas)
    L = gram._psd_factor(cov)
    weighted = max(np.linalg.norm(e @ L, 2) for e in err)
    assert weighted <= result.bound * (1 + 1e-9) + 1e-12
    assert np.abs(np.abs(result.lam)).max() < 1.0


def test_pipeline_plans_on_data_gramians_and_records_the_method():
    with pytest.raises(ValueError, match="gramian"):
        CompressionConfig(tol=0.1, gramian="pink")
    config = TrainConfig.from_dict(
        {"env_id": "Hopper-v5", "compression": {"tol": 0.1, "gramian": "data"}}
    )
    assert config.compression.gramian == "data"
    assert CompressionConfig().gramian == "white"

    from policies.actor_critic import ActorCritic

    torch.manual_seed(0)
    policy = ActorCritic(5, 2, -np.ones(2), np.ones(2), width=8, state_dims=[16, 16])
    obs = torch.randn(3, 20, 5)
    reset = torch.zeros(3, 20, dtype=torch.bool)
    base = dict(tol=0.3, min_state=1, max_output_error=1e9)
    white = plan_reductions(policy, CompressionConfig(**base), obs, reset)
    data = plan_reductions(policy, CompressionConfig(**base, gramian="data"), obs, reset)
    assert not white.input_covariances
    assert set(data.input_covariances) == set(lru_layers(policy))
    assert all(e.gramian == "white" for e in white.events)
    assert all(e.gramian == "data" for e in data.events)
    for ref in lru_layers(policy):
        u = data.recorded[ref][0].double().numpy()
        cov = gram.input_covariance(u)
        np.testing.assert_array_equal(data.input_covariances[ref], cov)
        expected = gram.hankel_singular_values(*data.systems[ref][:3], input_covariance=cov)
        event = next(e for e in data.events if e.layer == ref)
        np.testing.assert_allclose(event.hsv, expected, rtol=1e-12)
        assert type(event).from_dict(event.to_dict()) == event
    # No rollout: nothing to weight by, so the white-noise HSVs (and the event says so).
    blind = plan_reductions(policy, CompressionConfig(**base, gramian="data"), None, None)
    assert all(e.gramian == "white" for e in blind.events)
