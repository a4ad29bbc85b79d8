"""Balanced truncation of one diagonal LTI layer (docs/design.md §6), numpy float64 arrays.

The layer's conventions (its real form ``(A, B_x, C_x)`` and the timing that relates it
to a ``control.StateSpace``) are those of ``compression.gramians``, which also computes
the Gramians and Hankel singular values (HSVs) that the truncation balances.

The truncation is that of ``(A, B_x, C_x)``. Because ``|z| = 1`` on the unit circle, the
H∞ error of the reduced layer (read with the layer's timing) equals that of the truncated
state-space system, so ``‖G − G_r‖_∞ ≤ 2 Σ_{j>r} σ_j`` holds for the layer as well. With
``input_covariance`` (data-weighted Gramians, Enns), P is that of ``(A, B_x Σ_u^{1/2})``
and the bound is for ``‖(G − G_r) Σ_u^{1/2}‖_∞`` instead. ``hinf_norm``
(``compression.hinf``) measures ``‖G‖_∞`` (``‖G Σ_u^{1/2}‖_∞`` when weighted) on the
diagonal form: the scale that turns the bound into a relative error, and, applied to the
error system, a check of the bound.

Pitfalls (python-control 0.10.2), so this package never uses them:
``control.balred`` hard-codes continuous time (it keeps "unstable" modes of a stable
discrete system and returns a dt=0 system with only a warning), ``control.hsvd`` raises
NotImplementedError in discrete time, and ``control.ss`` silently drops imaginary parts.
Only real matrices reach python-control; the reduction itself is the square-root method
written here. ``slycot.ab09ad('D', ...)`` is the independent reference used in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import scipy.linalg as sla

from compressm_rl.compression.gramians import GramianMethod, _balance, gramians
from compressm_rl.compression.mode_fitting import clamp_radius, pair_real_modes
from policies.lti import DiagonalSystem, check_system, real_form

DEFAULT_MAX_COND = 1e3


class UnreducibleLayer(RuntimeError):
    """This layer cannot be reduced; the caller should skip it (the message says why)."""


class ZeroMap(UnreducibleLayer):
    """The layer's input-output map is zero (every Hankel singular value vanishes)."""


class IllConditionedReduction(UnreducibleLayer):
    """The reduced system's eigenvector matrix V is too ill-conditioned to re-diagonalise.

    The caller should skip (not reduce) this layer. ``cond`` holds cond₂(V).
    """

    def __init__(self, cond: float, max_cond: float) -> None:
        super().__init__(
            f"re-diagonalising the reduced layer needs cond(V) = {cond:.3g} > max_cond = "
            f"{max_cond:.3g}; skip this layer (or raise max_cond)"
        )
        self.cond = cond
        self.max_cond = max_cond


# --------------------------------------------------------------------------------------
# Balanced truncation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReductionResult:
    """A reduced layer and how it was obtained.

    Attributes:
        lam: complex ``[m]``, |lam| < 1; real modes have Im lam = 0 exactly.
        B: complex ``[m, H_in]``.
        C: complex ``[H_out, m]``.
        D: real ``[H_out]``, unchanged.
        hsv: Hankel singular values of the full layer's real form, descending ``[2n]``
            (input-weighted where ``balanced_truncation`` had an ``input_covariance``).
        rank: real states kept, r (= 2 · complex pairs + real modes, so ``r ≤ 2m``).
        bound: the H∞ error bound on the unit circle of the returned system: ``2 Σ_{j>r}
            σ_j``, plus the clamp's own error bound where ``max_radius`` moved a mode.
        W: complex ``[m, 2n]`` state map: ``z = W [Re h; Im h]`` (``map_state``).
        cond_V: cond₂ of the reduced system's eigenvector matrix.
        A_r, B_r, C_r: the truncated balanced real system ``[r, r]``, ``[r, H_in]``,
            ``[H_out, r]`` (same timing as the layer).
        T, T_inv: balancing projections ``[2n, r]`` and ``[r, 2n]`` (``T_inv T = I_r``).
        n_clamped: modes whose radius ``max_radius`` clamped (``mode_fitting.clamp_radius``).
        n_paired: slots that hold two real modes (``mode_fitting.pair_real_modes``).
    """

    lam: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray
    hsv: np.ndarray
    rank: int
    bound: float
    W: np.ndarray
    cond_V: float
    A_r: np.ndarray
    B_r: np.ndarray
    C_r: np.ndarray
    T: np.ndarray
    T_inv: np.ndarray
    n_clamped: int = 0
    n_paired: int = 0

    @property
    def state_dim(self) -> int:
        """m, complex states of the reduced layer."""
        return int(self.lam.shape[0])

    @property
    def system(self) -> DiagonalSystem:
        """The reduced layer ``(lam, B, C, D)``."""
        return DiagonalSystem(self.lam, self.B, self.C, self.D)

    def map_state(self, h: np.ndarray) -> np.ndarray:
        """Carried full-layer state ``h`` complex ``[..., n]`` -> reduced ``z`` ``[..., m]``."""
        h = np.asarray(h)
        x = np.concatenate([h.real, h.imag], axis=-1)
        return x @ self.W.T


def scale_modes(result: ReductionResult, scale: np.ndarray) -> ReductionResult:
    """The same reduced layer with each state rescaled, ``z_i -> s_i z_i`` (exact).

    ``scale`` real ``[m]``, > 0. B rows and W rows are multiplied by ``s_i``, C columns
    divided by it, so the input-output map, every bound and the mapped states' outputs are
    unchanged; only how each mode's gain ``|b_i||c_i|`` is split between B and C moves. A
    real scale keeps real modes real and paired modes paired.
    """
    scale = np.asarray(scale, dtype=np.float64)
    if scale.shape != (result.state_dim,) or not np.all(np.isfinite(scale) & (scale > 0)):
        raise ValueError(f"scale must be finite and > 0, shape ({result.state_dim},)")
    return replace(
        result,
        B=result.B * scale[:, None],
        C=result.C / scale[None, :],
        W=result.W * scale[:, None],
    )


def select_rank(hsv: np.ndarray, tol: float, min_rank: int = 1) -> int:
    """Smallest r with ``Σ_{j≤r} σ_j ≥ (1 − tol) Σ_j σ_j``, at least ``min_rank``.

    ``hsv`` descending ``[N]``; ``0 ≤ tol < 1``. The result is clipped to ``[min_rank, N]``.
    """
    if not 0.0 <= tol < 1.0:
        raise ValueError(f"tol must be in [0, 1), got {tol}")
    csum = np.cumsum(hsv)
    # csum[-1] (not a separate sum) so that tol=0 finds r = N despite rounding.
    r = int(np.searchsorted(csum, (1.0 - tol) * csum[-1], side="left")) + 1
    return int(min(max(r, min_rank), hsv.shape[0]))


def balanced_truncation(
    lam: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    D: np.ndarray,
    *,
    rank: int | None = None,
    tol: float | None = None,
    min_rank: int = 1,
    method: GramianMethod = "closed_form",
    max_cond: float = DEFAULT_MAX_COND,
    hsv_rtol: float = 1e-12,
    max_radius: float | None = None,
    pair_real: float = 0.0,
    input_covariance: np.ndarray | None = None,
) -> ReductionResult:
    """Balanced truncation of one layer, returned in diagonal form.

    Args:
        lam, B, C, D: the layer (module docstring; ``B`` is B̃).
        rank: real states to keep, ``1 ≤ rank ≤ 2n``.
        tol: τ of the rank rule (``select_rank``). Exactly one of ``rank``/``tol``.
        min_rank: floor on r for the ``tol`` rule.
        method: Gramian method (``gramians``).
        max_cond: raise ``IllConditionedReduction`` when cond₂(V) exceeds it.
        hsv_rtol: states with ``σ_j ≤ hsv_rtol · σ_1`` are never kept (a non-minimal layer,
            e.g. one reduced before, has σ ≈ 0 directions that Σ^{-1/2} cannot invert);
            r may therefore come out below ``rank``.
        max_radius: largest eigenvalue radius the caller can represent (an LRU's
            ``MAX_RADIUS``); modes beyond it are clamped with their peak gain kept, and the
            clamp's error is added to ``bound`` (``mode_fitting.clamp_radius``). None: no
            clamp.
        pair_real: budget for holding two real modes in one state
            (``mode_fitting.pair_real_modes``), as a fraction of the truncation's bound
            ``2 Σ_{j>r} σ_j``; 0: never (the result is then exactly the truncated balanced
            system).
        input_covariance: ``Σ_u [H_in, H_in]`` of the layer's inputs (``gramians``): balance
            the input-weighted Gramian against the standard Q (Enns). ``hsv`` are then the
            weighted HSVs, directions the inputs never excite have σ = 0 and are cut, and
            ``bound`` bounds the weighted error ``‖(G − G_r) Σ_u^{1/2}‖_∞`` (the pairing's
            and clamp's shares scaled by ``‖Σ_u^{1/2}‖₂``), not the unweighted one.

    Returns:
        ReductionResult. A conjugate eigenvalue pair (μ, μ̄) of A_r becomes one complex
        state (λ = μ with Im μ > 0, B̃ row (V⁻¹B_r)_j, C column 2 (C_r V)_j); a real μ
        becomes one state with real λ, real B̃ row and C column (C_r V)_j. r may split a
        near-equal HSV pair; the reduced real system is diagonalised whatever r is.

    Raises:
        ValueError: bad arguments. IllConditionedReduction: cond(V) > max_cond.
        ZeroMap: nothing to reduce (B̃ or C is zero).
    """
    lam, B, C, D = _checked_layer(lam, B, C, D, rank, tol, min_rank)
    hsv, Lc, U, Vt, Lo = _balance(*gramians(lam, B, C, method, input_covariance))
    if hsv[0] <= 0.0:
        raise ZeroMap("the layer's input-output map is zero (all HSVs vanish)")
    r = rank if rank is not None else select_rank(hsv, tol, min_rank)
    r = min(r, max(1, int(np.count_nonzero(hsv > hsv_rtol * hsv[0]))))
    T, T_inv = _balancing_projections(hsv, Lc, U, Vt, Lo, r)
    A, Bx, Cx, _ = real_form(lam, B, C)
    A_r, B_r, C_r = T_inv @ A @ T, T_inv @ Bx, Cx @ T
    modes = _diagonal_modes(
        A_r,
        B_r,
        C_r,
        T_inv,
        truncation_bound=float(2.0 * hsv[r:].sum()),
        weight=_input_weight(input_covariance),
        max_cond=max_cond,
        pair_real=pair_real,
        max_radius=max_radius,
    )
    return ReductionResult(
        D=D.copy(), hsv=hsv, rank=r, A_r=A_r, B_r=B_r, C_r=C_r, T=T, T_inv=T_inv, **modes._asdict()
    )


def _checked_layer(
    lam: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    D: np.ndarray,
    rank: int | None,
    tol: float | None,
    min_rank: int,
) -> DiagonalSystem:
    """``balanced_truncation``'s layer as ``check_system`` returns it, once the layer, the
    rank rule (``rank`` or ``tol``) and ``min_rank`` are checked (ValueError)."""
    if (rank is None) == (tol is None):
        raise ValueError("give exactly one of rank= (real states kept) or tol= (HSV mass)")
    lam, B, C, D = check_system(lam, B, C, D)
    if D is None:
        raise ValueError("D is required")
    n2 = 2 * lam.shape[0]
    if rank is not None and not 1 <= rank <= n2:
        raise ValueError(f"rank must be in [1, 2n = {n2}], got {rank}")
    if not 1 <= min_rank <= n2:
        raise ValueError(f"min_rank must be in [1, 2n = {n2}], got {min_rank}")
    return lam, B, C, D


def _input_weight(input_covariance: np.ndarray | None) -> float:
    """``‖Σ_u‖₂^{1/2}`` (1 without ``input_covariance``): the weighted bound's share of an
    unweighted error e, ``‖e Σ_u^{1/2}‖ ≤ ‖e‖ ‖Σ_u‖₂^{1/2}``."""
    if input_covariance is None:
        return 1.0
    return float(np.sqrt(max(np.linalg.eigvalsh(input_covariance)[-1], 0.0)))


def _balancing_projections(
    hsv: np.ndarray, Lc: np.ndarray, U: np.ndarray, Vt: np.ndarray, Lo: np.ndarray, r: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(T [2n, r], T_inv [r, 2n])``, ``T_inv T = I_r``: the square-root method's
    projections onto the r leading balanced states, from ``_balance``'s factors."""
    s_isqrt = 1.0 / np.sqrt(hsv[:r])
    T = (Lc @ Vt[:r].T) * s_isqrt  # [2n, r]
    T_inv = (U[:, :r].T @ Lo.T) * s_isqrt[:, None]  # [r, 2n]
    return T, T_inv


class _DiagonalModes(NamedTuple):
    """The reduced layer's modes and bound (``ReductionResult``'s fields of these names)."""

    lam: np.ndarray
    B: np.ndarray
    C: np.ndarray
    W: np.ndarray
    cond_V: float
    bound: float
    n_clamped: int
    n_paired: int


def _diagonal_modes(
    A_r: np.ndarray,
    B_r: np.ndarray,
    C_r: np.ndarray,
    T_inv: np.ndarray,
    *,
    truncation_bound: float,
    weight: float,
    max_cond: float,
    pair_real: float,
    max_radius: float | None,
) -> _DiagonalModes:
    """The truncated real system ``(A_r, B_r, C_r)`` in diagonal form: re-diagonalised
    (``_diagonalise``), real modes paired within ``pair_real · truncation_bound``
    (``pair_real_modes``), radii clamped to ``max_radius`` (``clamp_radius``; None: no
    clamp). ``bound`` is ``truncation_bound`` plus the pairing's and the clamp's errors,
    each scaled by the input ``weight`` (``_input_weight``)."""
    lam_r, B_red, C_red, Vinv, cond_V = _diagonalise(A_r, B_r, C_r, max_cond)
    lam_r, B_red, C_red, W, n_paired, pair_bound = pair_real_modes(
        lam_r, B_red, C_red, Vinv @ T_inv, pair_real * truncation_bound / max(weight, 1e-300)
    )
    n_clamped, clamp_bound = 0, 0.0
    if max_radius is not None:
        lam_r, B_red, n_clamped, clamp_bound = clamp_radius(lam_r, B_red, C_red, max_radius)
    pair_bound, clamp_bound = weight * pair_bound, weight * clamp_bound
    bound = truncation_bound + pair_bound + clamp_bound
    return _DiagonalModes(lam_r, B_red, C_red, W, cond_V, bound, n_clamped, n_paired)


def _diagonalise(
    A_r: np.ndarray, B_r: np.ndarray, C_r: np.ndarray, max_cond: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Real ``(A_r [r, r], B_r [r, H_in], C_r [H_out, r])`` -> diagonal form ``(lam [m],
    B [m, H_in], C [H_out, m], V⁻¹ rows kept [m, r], cond V)``, all complex128."""
    mu, V = sla.eig(A_r)
    cond_V = float(np.linalg.cond(V))
    if not np.isfinite(cond_V) or cond_V > max_cond:
        raise IllConditionedReduction(cond_V, max_cond)
    # Complex whatever the spectrum: with only real eigenvalues eig's V is float64, and a
    # float B, C or W would later drop the imaginary half of a paired slot on assignment.
    V = V.astype(np.complex128)
    Vinv = np.linalg.inv(V)
    # LAPACK's real eig returns real eigenvalues with Im exactly 0 and conjugate pairs
    # with conjugate eigenvectors, so exact comparisons classify the modes.
    pos, real = mu.imag > 0, mu.imag == 0
    if np.count_nonzero(pos) != np.count_nonzero(mu.imag < 0):
        raise IllConditionedReduction(np.inf, max_cond)  # unpaired complex eigenvalues
    keep = pos | real
    Bz = Vinv[keep] @ B_r
    Cz = (C_r @ V[:, keep]) * np.where(pos[keep], 2.0, 1.0)
    Wz = Vinv[keep]
    lam = mu[keep].astype(np.complex128)
    # Real modes: drop the rounding-level imaginary parts so that θ ∈ {0, π} exactly.
    is_real = real[keep]
    lam[is_real] = lam[is_real].real
    Bz[is_real] = Bz[is_real].real
    Cz[:, is_real] = Cz[:, is_real].real
    Wz[is_real] = Wz[is_real].real
    return lam, Bz, Cz, Wz, cond_V
