"""Balanced truncation of one diagonal LTI layer (docs/design.md §6), numpy float64 arrays.

Conventions are those of ``policies.lti`` (one realisation for the whole project)::

    h_t = diag(lam) h_{t-1} + B u_t,      y_t = Re(C h_t) + D ⊙ u_t

with the real form ``x = [Re h; Im h]``, ``(A, B_x, C_x, D_x) = real_form(lam, B, C, D)``.
Note the timing: the layer reads its output from the *updated* state (``y_t = C x_t +
D u_t`` with ``x_t = A x_{t-1} + B u_t``), whereas a ``control.StateSpace`` means
``x_{t+1} = A x_t + B u_t, y_t = C x_t + D u_t``. Hence

    G_layer(z) = D + z (G_ss(z) - D).

The Gramians, Hankel singular values (HSVs) and the truncation are those of ``(A, B_x,
C_x)``. Because ``|z| = 1`` on the unit circle, the H∞ error of the reduced layer (read
with the layer's timing) equals that of the truncated state-space system, so
``‖G − G_r‖_∞ ≤ 2 Σ_{j>r} σ_j`` holds for the layer as well. With ``input_covariance``
(data-weighted Gramians, Enns), P is that of ``(A, B_x Σ_u^{1/2})`` and the bound is for
``‖(G − G_r) Σ_u^{1/2}‖_∞`` instead.

Pitfalls (python-control 0.10.2), so this module never uses them:
``control.balred`` hard-codes continuous time (it keeps "unstable" modes of a stable
discrete system and returns a dt=0 system with only a warning), ``control.hsvd`` raises
NotImplementedError in discrete time, and ``control.ss`` silently drops imaginary parts.
Only real matrices reach python-control; the reduction itself is the square-root method
written here. ``slycot.ab09ad('D', ...)`` is the independent reference used in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.linalg as sla

from policies.lti import DiagonalSystem, check_system, real_form

if TYPE_CHECKING:
    import control

DEFAULT_MAX_COND = 1e3

GramianMethod = Literal["closed_form", "control"]


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
# Real realisation
# --------------------------------------------------------------------------------------


def real_realization(
    lam: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray | None = None
) -> control.StateSpace:
    """The real form as a discrete ``control.StateSpace`` (``dt=True``, 2n states).

    python-control reads it as ``x_{t+1} = A x_t + B u_t``; the layer's own timing differs
    by a factor z on the strictly proper part (module docstring).
    """
    import control  # 1.8 s to import (scipy.signal): only the reference path needs it

    return control.ss(*real_form(lam, B, C, D), dt=True)


# --------------------------------------------------------------------------------------
# Gramians and Hankel singular values
# --------------------------------------------------------------------------------------


def input_covariance(u: np.ndarray) -> np.ndarray:
    """Second moment ``Σ_u = E[u uᵀ]`` of recorded inputs ``u [..., H]``, float64 ``[H, H]``.

    Not centred: a constant input component is part of what the layer is driven by.
    """
    u = np.asarray(u, dtype=np.float64)
    flat = u.reshape(-1, u.shape[-1])
    if flat.shape[0] == 0 or not np.isfinite(flat).all():
        raise ValueError(f"need finite recorded inputs [..., H], got shape {u.shape}")
    cov = flat.T @ flat / flat.shape[0]
    return 0.5 * (cov + cov.T)


def _check_covariance(cov: np.ndarray, H: int) -> np.ndarray:
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape != (H, H) or not np.isfinite(cov).all():
        raise ValueError(f"input_covariance must be finite [H, H] = [{H}, {H}], got {cov.shape}")
    cov = 0.5 * (cov + cov.T)
    if np.linalg.eigvalsh(cov)[0] < -1e-10 * max(np.abs(cov).max(), 1e-300):
        raise ValueError("input_covariance must be positive semi-definite")
    return cov


def _closed_form_gramians(
    lam: np.ndarray, B: np.ndarray, C: np.ndarray, cov: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    # Complex diagonal system driven by a real input with E[u_t u_sᵀ] = Σ_u δ_ts (Σ_u = I:
    # white noise): Pc = E[h hᴴ] = Σ Λ^k B Σ_u Bᴴ Λ^{kᴴ}, R = E[h hᵀ] = Σ Λ^k B Σ_u Bᵀ Λ^k
    # (the input is real, so the pseudo-covariance R is needed too); likewise Qc, S for the
    # output side. Then Re h = (h + h̄)/2, Im h = (h − h̄)/(2i) give the real Gramians
    # blockwise.
    lc, l = lam.conj(), lam
    BS = B if cov is None else B @ cov
    Pc = (BS @ B.conj().T) / (1.0 - l[:, None] * lc[None, :])
    R = (BS @ B.T) / (1.0 - l[:, None] * l[None, :])
    Qc = (C.conj().T @ C) / (1.0 - lc[:, None] * l[None, :])
    S = (C.T @ C) / (1.0 - l[:, None] * l[None, :])
    P = 0.5 * np.block([[(Pc + R).real, (R - Pc).imag], [(R + Pc).imag, (Pc - R).real]])
    Q = 0.5 * np.block([[(Qc + S).real, -(Qc + S).imag], [(Qc - S).imag, (Qc - S).real]])
    return P, Q


def gramians(
    lam: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    method: GramianMethod = "closed_form",
    input_covariance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Controllability and observability Gramians ``(P, Q)``, each ``[2n, 2n]`` float64.

    Of the real form ``(A, B_x, C_x)``: ``P = A P Aᵀ + B_x Σ_u B_xᵀ``, ``Q = Aᵀ Q A + C_xᵀ
    C_x``, with ``Σ_u = I`` (white-noise Gramians) unless ``input_covariance`` is given.

    Args:
        method: ``"closed_form"`` (default; exact for the diagonal layer, O(n²H), ~2 ms at
            n=128) or ``"control"`` (``control.gram`` on the discrete StateSpace, i.e.
            SLICOT sb03md; ~100 ms at n=128).
        input_covariance: real PSD ``Σ_u [H_in, H_in]`` (``input_covariance(u)`` of the
            layer's recorded inputs): P is then the state covariance of the layer driven by
            temporally white inputs of that covariance (Enns' input-weighted Gramian with
            the static weight Σ_u^{1/2}, docs/design.md §6). Q stays the standard one.
    """
    lam, B, C, _ = check_system(lam, B, C)
    cov = None if input_covariance is None else _check_covariance(input_covariance, B.shape[1])
    if method == "closed_form":
        P, Q = _closed_form_gramians(lam, B, C, cov)
    elif method == "control":
        import control

        Bw = B if cov is None else B @ _psd_factor(cov)  # Σ_u = L Lᵀ, L real
        P = control.gram(real_realization(lam, Bw, C), "c")
        Q = control.gram(real_realization(lam, B, C), "o")
    else:
        raise ValueError(f"method must be 'closed_form' or 'control', got {method!r}")
    # Exact symmetry keeps the factorisations below honest.
    return 0.5 * (P + P.T), 0.5 * (Q + Q.T)


def _psd_factor(M: np.ndarray) -> np.ndarray:
    """``L`` with ``L Lᵀ = M`` for symmetric PSD ``M``: Cholesky, else eigen-square-root.

    Gramians of a (near) non-minimal layer are singular to working precision (e.g. a real
    mode has an uncontrollable imaginary part, or a data-weighted Gramian has directions
    the inputs never excite), where Cholesky fails; eigh then sets the eigenvalues at
    rounding level (≤ N·eps·λ_max, negative ones included) to zero, since their square
    roots (~1e-8 λ_max^{1/2}) would otherwise come back as spurious HSVs.
    """
    try:
        return sla.cholesky(M, lower=True)
    except np.linalg.LinAlgError:
        w, U = np.linalg.eigh(M)
        w = np.where(w > M.shape[0] * np.finfo(np.float64).eps * max(w[-1], 0.0), w, 0.0)
        return U * np.sqrt(w)


def _balance(
    P: np.ndarray, Q: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Square-root method: ``(hsv [2n], Lc, U, Vt, Lo)``, ``Loᵀ Lc = U diag(hsv) Vt``."""
    Lc, Lo = _psd_factor(P), _psd_factor(Q)
    U, s, Vt = np.linalg.svd(Lo.T @ Lc)
    return s, Lc, U, Vt, Lo


def hankel_singular_values(
    lam: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    method: GramianMethod = "closed_form",
    input_covariance: np.ndarray | None = None,
) -> np.ndarray:
    """Hankel singular values of the real form, descending, float64 ``[2n]``.

    ``σ = sqrt(eig(P Q))`` computed as the singular values of ``Loᵀ Lc`` (P = Lc Lcᵀ,
    Q = Lo Loᵀ), which avoids the non-symmetric eigenproblem. Where a Gramian is singular
    (eigen-square-root path), σ much below ~1e-8 σ_1 may be rounding noise.
    With ``input_covariance`` (``gramians``), the input-weighted HSVs: those of
    ``(A, B_x Σ_u^{1/2}, C_x)``.
    """
    P, Q = gramians(lam, B, C, method, input_covariance)
    return _balance(P, Q)[0]


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
        n_clamped: modes whose radius ``max_radius`` clamped (``_clamp_radius``).
        n_paired: slots that hold two real modes (``_pair_real_modes``).
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
            clamp's error is added to ``bound`` (``_clamp_radius``). None: no clamp.
        pair_real: budget for holding two real modes in one state (``_pair_real_modes``),
            as a fraction of the truncation's bound ``2 Σ_{j>r} σ_j``; 0: never (the
            result is then exactly the truncated balanced system).
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

    A, Bx, Cx, _ = real_form(lam, B, C)
    P, Q = gramians(lam, B, C, method, input_covariance)
    # The weighted bound's share of an unweighted error e: ‖e Σ_u^{1/2}‖ ≤ ‖e‖ ‖Σ_u‖₂^{1/2}.
    weight = 1.0
    if input_covariance is not None:
        weight = float(np.sqrt(max(np.linalg.eigvalsh(input_covariance)[-1], 0.0)))
    hsv, Lc, U, Vt, Lo = _balance(P, Q)
    if hsv[0] <= 0.0:
        raise ZeroMap("the layer's input-output map is zero (all HSVs vanish)")
    r = rank if rank is not None else select_rank(hsv, tol, min_rank)
    r = min(r, max(1, int(np.count_nonzero(hsv > hsv_rtol * hsv[0]))))

    s_isqrt = 1.0 / np.sqrt(hsv[:r])
    T = (Lc @ Vt[:r].T) * s_isqrt  # [2n, r]
    T_inv = (U[:, :r].T @ Lo.T) * s_isqrt[:, None]  # [r, 2n]
    A_r, B_r, C_r = T_inv @ A @ T, T_inv @ Bx, Cx @ T

    lam_r, B_red, C_red, Vinv, cond_V = _diagonalise(A_r, B_r, C_r, max_cond)
    truncation_bound = float(2.0 * hsv[r:].sum())
    lam_r, B_red, C_red, W, n_paired, pair_bound = _pair_real_modes(
        lam_r, B_red, C_red, Vinv @ T_inv, pair_real * truncation_bound / max(weight, 1e-300)
    )
    n_clamped, clamp_bound = 0, 0.0
    if max_radius is not None:
        lam_r, B_red, n_clamped, clamp_bound = _clamp_radius(lam_r, B_red, C_red, max_radius)
    pair_bound, clamp_bound = weight * pair_bound, weight * clamp_bound
    return ReductionResult(
        lam=lam_r,
        B=B_red,
        C=C_red,
        D=D.copy(),
        hsv=hsv,
        rank=r,
        bound=truncation_bound + pair_bound + clamp_bound,
        W=W,
        cond_V=cond_V,
        A_r=A_r,
        B_r=B_r,
        C_r=C_r,
        T=T,
        T_inv=T_inv,
        n_clamped=n_clamped,
        n_paired=n_paired,
    )


def _diagonalise(
    A_r: np.ndarray, B_r: np.ndarray, C_r: np.ndarray, max_cond: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Real ``(A_r, B_r, C_r)`` -> diagonal form ``(lam, B, C, V⁻¹ rows kept, cond V)``."""
    mu, V = sla.eig(A_r)
    cond_V = float(np.linalg.cond(V))
    if not np.isfinite(cond_V) or cond_V > max_cond:
        raise IllConditionedReduction(cond_V, max_cond)
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


def _clamp_radius(
    lam: np.ndarray, B: np.ndarray, C: np.ndarray, max_radius: float
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Bring every radius above ``max_radius`` down to it, keeping each moved mode's peak gain.

    A reduced mode can land a hair outside the radius its holder can represent (balanced
    truncation keeps stability, not the largest radius: 4e-8 beyond 0.9999 here). At
    |λ| ≈ 0.9999 the mode's gain |b c| / (1 − |λ|) is ~1e4 |b c|, so moving λ alone by
    7.5e-9 changed the layer by 2.9× the truncation's bound. Scaling the mode's input row
    by k = (1 − r') / (1 − r) keeps its response at its own frequency (z = e^{iθ}) exact;
    what is left, ``|c| |b| sup_ω |z/(z−λ) − k z/(z−λ')|`` per mode, is measured on a grid
    dense around θ and returned as the clamp's error bound (a 4x smaller error than the
    plain clamp's on layers with several modes at 0.9999).

    Returns ``(lam, B, modes clamped, error bound)``; ``C`` is unchanged.
    """
    radius = np.abs(lam)
    over = np.flatnonzero(radius > max_radius)
    if over.size == 0:
        return lam, B, 0, 0.0
    lam, B = lam.copy(), B.copy()
    bound = 0.0
    for j in over:
        old, new = lam[j], lam[j] * (max_radius / radius[j])
        k = (1.0 - max_radius) / (1.0 - radius[j])
        width = 1.0 - max_radius  # the resonance's half-width in ω
        omega = np.concatenate(
            [np.angle(old) + width * np.linspace(-200, 200, 4001), np.linspace(-np.pi, np.pi, 1025)]
        )
        z = np.exp(1j * omega)
        gap = np.abs(z / (z - old) - k * z / (z - new)).max()
        bound += float(np.linalg.norm(C[:, j]) * np.linalg.norm(B[j]) * gap)
        lam[j], B[j] = new, k * B[j]
    return lam, B, int(over.size), bound


def _pair_real_modes(
    lam: np.ndarray, B: np.ndarray, C: np.ndarray, W: np.ndarray, budget: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, float]:
    """Hold pairs of real modes in one complex state each, while their error fits ``budget``.

    A real mode (λ real, B row and C column real) uses half of its state: Im h is neither
    driven nor read, and θ, Im B, Im C sit at a saddle with zero gradient (1e-8 against
    1e-1 for the other modes), so training leaves it real and the half-state wasted. Two
    real modes μ₁ ≤ μ₂ (neighbours in value) fit one state at λ = (μ₁ + μ₂)/2 with
    ``B = b₁ + i b₂``, ``C = c₁ − i c₂``: Re h carries the first, Im h the second, and
    ``Re(C h) = c₁ x₁ + c₂ x₂``. The state map is exact (``W = W₁ + i W₂``); only the
    shared eigenvalue costs, ``|c||b| sup_ω |z/(z−μ) − z/(z−λ)|`` per mode. Neighbours
    are paired cheapest first while the summed cost stays within ``budget``.

    Returns ``(lam, B, C, W, pairs made, their error bound)``.
    """
    real = np.flatnonzero(lam.imag == 0)
    if budget <= 0 or real.size < 2:
        return lam, B, C, W, 0, 0.0
    real = real[np.argsort(lam[real].real)]
    z = np.exp(1j * np.linspace(0.0, np.pi, 1025))

    def cost(j: int, target: float) -> float:
        gap = np.abs(z / (z - lam[j]) - z / (z - target)).max()
        return float(np.linalg.norm(C[:, j]) * np.linalg.norm(B[j]) * gap)

    candidates = []
    for first, second in zip(real[:-1], real[1:], strict=True):
        mid = 0.5 * (lam[first].real + lam[second].real)
        candidates.append((cost(first, mid) + cost(second, mid), first, second, mid))
    used: set[int] = set()
    spent, merged = 0.0, []
    for c, first, second, mid in sorted(candidates):
        if first in used or second in used or spent + c > budget:
            continue
        used |= {first, second}
        spent += c
        merged.append((first, second, mid))
    if not merged:
        return lam, B, C, W, 0, 0.0
    lam, B, C, W = lam.copy(), B.copy(), C.copy(), W.copy()
    for first, second, mid in merged:
        lam[first] = mid
        B[first] = B[first].real + 1j * B[second].real
        C[:, first] = C[:, first].real - 1j * C[:, second].real
        W[first] = W[first].real + 1j * W[second].real
    drop = [second for _, second, _ in merged]
    keep = np.setdiff1d(np.arange(lam.shape[0]), drop)
    return lam[keep], B[keep], C[:, keep], W[keep], len(merged), spent
