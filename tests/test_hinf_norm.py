"""The H∞ norm of one LRU layer (``hinf.hinf_norm``) against SLICOT, and the report's plot
of each cut's error.

Reference: python-control's ``control.norm(sys, p="inf")``, i.e. SLICOT ab13dd through
slycot, on the real form ``real_realization`` (2n states; it reads the layer's timing
without the factor z, which leaves the norm unchanged on |z| = 1). ab13dd returns a
σ_max it attained, at most its ``tol`` (relative) below the true norm (its iteration
stops once no peak above ``(1 + tol) gpeak`` is left): python-control passes its own
``tol=1e-6``; 1e-10 is asked for here. No mocks.
"""

from __future__ import annotations

import json

import control
import numpy as np
import pytest
from lti_responses import frequency_response
from test_reduction import decaying_layer, random_layer
from threadpoolctl import threadpool_limits

from compressm_rl.compression import ReductionEvent, hinf_norm
from compressm_rl.compression import gramians as gram
from compressm_rl.compression import lti as red
from compressm_rl.runs.config import save_config
from compressm_rl.runs.events import EVENTS
from compressm_rl.runs.metrics import MetricsLog
from compressm_rl.runs.report import plot_event_errors, write_report

SLICOT_TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """One BLAS thread, as the CLI runs: on two busy cores a threaded OpenBLAS made
    SLICOT's norm at n = 64 fifteen times slower."""
    with threadpool_limits(1, user_api="blas"):
        yield


def slicot_norm(lam, B, C) -> float:
    """‖G‖_∞ of the layer's strictly proper part by SLICOT ab13dd (python-control)."""
    return float(
        control.norm(gram.real_realization(lam, B, C), p="inf", tol=SLICOT_TOL, method="slycot")
    )


def layer_at_max_radius(n: int, H: int, seed: int):
    """Modes near the LRU's largest radius, |λ| = 0.9999: resonances 1e-4 wide."""
    lam, B, C, D = random_layer(n, H, seed, r_min=0.99, r_max=0.9999)
    lam[: n // 3] *= 0.9999 / np.abs(lam[: n // 3])
    return lam, B, C, D


LAYERS = [
    pytest.param(random_layer(1, 1, 0), id="n1_H1"),
    pytest.param(random_layer(1, 4, 1, n_real=1), id="n1_H4_real"),
    pytest.param(random_layer(3, 2, 2), id="n3_H2"),
    pytest.param(random_layer(8, 5, 3, r_max=0.9), id="n8_H5_broad"),
    pytest.param(random_layer(16, 4, 4, n_real=6), id="n16_H4_real"),
    pytest.param(random_layer(4, 24, 5), id="n4_H24_wide"),  # H > 2n
    pytest.param(layer_at_max_radius(24, 3, 6), id="n24_H3_r9999"),
    pytest.param(random_layer(32, 8, 7, r_min=0.0, r_max=0.7), id="n32_H8_fast"),
    pytest.param(layer_at_max_radius(64, 6, 8), id="n64_H6_r9999"),
    pytest.param(random_layer(64, 16, 9, r_min=0.5, r_max=0.999, n_real=8), id="n64_H16"),
]


def assert_close_to_slicot(value: float, reference: float) -> None:
    # Both are σ_max at some frequency, so neither exceeds the true norm; SLICOT's is
    # within its tol of it, ours is asked to be as close (it is ≤ 1e-11 on these).
    assert abs(value / reference - 1.0) <= 2 * SLICOT_TOL, (value, reference)


@pytest.mark.parametrize("layer", LAYERS)
def test_hinf_norm_agrees_with_slicot(layer):
    lam, B, C, _ = layer
    assert_close_to_slicot(hinf_norm(lam, B, C), slicot_norm(lam, B, C))


@pytest.mark.parametrize("rank", [None, 2], ids=["full_rank", "rank2"])
@pytest.mark.parametrize("layer", LAYERS[2:9:3])
def test_weighted_hinf_norm_is_that_of_B_times_a_covariance_factor(layer, rank):
    lam, B, C, _ = layer
    H = B.shape[1]
    rng = np.random.default_rng(11)
    G = rng.standard_normal((H, rank or H))
    cov = G @ G.T / H
    if rank is None:
        L = np.linalg.cholesky(cov)
    else:  # singular Σ_u (inputs confined to a plane): an eigen-square-root factor
        w, U = np.linalg.eigh(cov)
        L = U * np.sqrt(w.clip(0.0))
    assert_close_to_slicot(hinf_norm(lam, B, C, input_covariance=cov), slicot_norm(lam, B @ L, C))


def test_hinf_norm_is_the_peak_of_the_frequency_response():
    """The maximum over a dense grid (``lti_responses``, the layer's own timing) is at
    most the norm and close to it; the peak of a |λ| = 0.9999 mode is 1e-4 wide."""
    lam, B, C, D = layer_at_max_radius(6, 2, 12)
    around = np.abs(np.angle(lam))[:, None] + (1 - np.abs(lam))[:, None] * np.linspace(-5, 5, 201)
    omegas = np.concatenate([np.linspace(0, np.pi, 2001), around.ravel()])
    G = frequency_response(lam, B, C, np.zeros_like(D), omegas)
    peak = np.linalg.svd(G, compute_uv=False)[:, 0].max()
    norm = hinf_norm(lam, B, C)
    assert peak <= norm * (1 + 1e-12)
    assert peak >= norm * (1 - 1e-3)


def test_hinf_norm_edge_cases():
    lam, B, C, _ = random_layer(5, 3, 13)
    assert hinf_norm(lam, B, np.zeros_like(C)) == 0.0
    assert hinf_norm(lam, np.zeros_like(B), C) == 0.0
    # Each mode either unreachable or unobservable: G ≡ 0 with B, C nonzero.
    B0, C0 = B.copy(), C.copy()
    B0[:2], C0[:, 2:] = 0, 0
    assert hinf_norm(lam, B0, C0) == 0.0
    # Scaling C by s scales the norm by |s|; a unitary-like mix of outputs leaves it.
    norm = hinf_norm(lam, B, C)
    np.testing.assert_allclose(hinf_norm(lam, B, -3.0 * C), 3.0 * norm, rtol=1e-10)
    Q = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))[0]
    np.testing.assert_allclose(hinf_norm(lam, B, Q @ C), norm, rtol=1e-10)
    with pytest.raises(ValueError, match="stable"):
        hinf_norm(np.array([1.0 + 0j]), B[:1], C[:, :1])
    with pytest.raises(ValueError, match="finite"):
        hinf_norm(lam, np.full_like(B, np.nan), C)
    with pytest.raises(ValueError, match="positive semi-definite"):
        hinf_norm(lam, B, C, input_covariance=-np.eye(3))


def error_system(lam, B, C, result: red.ReductionResult):
    """Full minus reduced layer as one diagonal layer: states ``[h; h_r]`` are driven by the
    same input, ``Re(C h) − Re(C_r h_r) = Re([C, −C_r] [h; h_r])`` (Re is real-linear)."""
    return (
        np.concatenate([lam, result.lam]),
        np.concatenate([B, result.B], axis=0),
        np.concatenate([C, -result.C], axis=1),
    )


def test_error_system_is_the_difference_of_the_responses():
    lam, B, C, D = decaying_layer(1)
    result = red.balanced_truncation(lam, B, C, D, rank=6)
    omegas = np.linspace(-np.pi, np.pi, 257)
    Ge = frequency_response(*error_system(lam, B, C, result), np.zeros_like(D), omegas)
    full = frequency_response(lam, B, C, D, omegas)
    reduced = frequency_response(result.lam, result.B, result.C, result.D, omegas)
    np.testing.assert_allclose(Ge, full - reduced, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True], ids=["white", "data"])
@pytest.mark.parametrize(
    "layer, rank",
    [
        pytest.param(decaying_layer(0), 4, id="decaying_r4"),
        pytest.param(random_layer(12, 3, 14, r_max=0.99), 10, id="n12_r10"),
        pytest.param(random_layer(16, 4, 15, n_real=4), 16, id="n16_real_r16"),
        pytest.param(layer_at_max_radius(10, 2, 16), 12, id="n10_r9999_r12"),
    ],
)
def test_balanced_truncation_bound_holds_for_the_measured_error(layer, rank, weighted):
    """σ_{r+1} ≤ ‖(G − G_r) Σ_u^{1/2}‖_∞ ≤ bound: the bound holds, the Hankel lower bound
    of any order-r approximation is met, and hinf_norm checks both."""
    lam, B, C, D = layer
    H = B.shape[1]
    cov = None
    if weighted:
        G = np.random.default_rng(17).standard_normal((H, H))
        cov = G @ G.T / H + 0.2
    result = red.balanced_truncation(lam, B, C, D, rank=rank, input_covariance=cov)
    error = hinf_norm(*error_system(lam, B, C, result), input_covariance=cov)
    assert result.hsv[result.rank] * (1 - 1e-8) <= error <= result.bound


# ------------------------------------------------------------------------- report plot


def test_plot_event_errors_writes_a_png(tmp_path):
    def event(layer, step, status, bound, norm, error):
        return ReductionEvent.from_dict(
            {
                "layer": layer,
                "n_before": 32,
                "n_after": 16 if status.startswith("applied") else 32,
                "status": status,
                "hsv": [1.0, 0.5, 0.1],
                "bound": bound,
                "hinf_norm": norm,
                "output_error": error,
                "step": step,
            }
        )

    events = [
        event("actor.0", 10_000, "applied", 0.2, 4.0, 0.01),
        event("actor.1", 10_000, "rolled back: output error 0.9 > 0.5", 3.0, 2.0, 0.9),
        event("critic.0", 10_000, "applied", 0.05, 1.0, None),  # no guard ran
        event("actor.0", 20_000, "applied", 0.1, None, 0.02),  # an older log: no norm
        event("actor.1", 20_000, "skipped: nothing to cut", 0.0, None, None),
    ]
    assert events[0].relative_bound == pytest.approx(0.05)
    assert events[3].relative_bound is None
    path = tmp_path / "compression_errors.png"
    plot_event_errors(path, events)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    # Nothing plottable still gives a figure.
    plot_event_errors(tmp_path / "empty.png", events[4:])
    assert (tmp_path / "empty.png").stat().st_size > 1_000


def test_report_has_the_relative_bound_column_and_the_plot(tmp_path, tiny_config):
    """``write_report`` on a run whose event log mixes an older record (no ``hinf_norm``:
    the column shows "-") with a current one."""
    save_config(tmp_path, tiny_config())
    for step in (64, 128):
        row = {"global_step": step, "wall_time": step / 100, "episode_return": 5.0}
        MetricsLog(tmp_path).append({**row, "state_dims": "12 12"})
    old = {"layer": "actor.0", "n_before": 12, "n_after": 8, "status": "applied", "hsv": [1.0]}
    old |= {"bound": 0.25, "output_error": 0.01, "step": 64}
    new = {**old, "layer": "actor.1", "hinf_norm": 5.0}
    (tmp_path / EVENTS).write_text(json.dumps([old, new]))
    text = write_report(tmp_path).read_text()
    assert "| H∞ bound | bound / ‖G‖∞ | output error |" in text
    assert "| 0.25 | - | 0.010 |" in text and "| 0.25 | 0.05 | 0.010 |" in text
    assert "![cut errors per event](compression_errors.png)" in text
    assert (tmp_path / "compression_errors.png").stat().st_size > 10_000
