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
``‖(G − G_r) Σ_u^{1/2}‖_∞`` instead. ``hinf_norm`` measures ``‖G‖_∞`` (``‖G Σ_u^{1/2}‖_∞``
when weighted) on the diagonal form: the scale that turns the bound into a relative
error, and, applied to the error system, a check of the bound.

Pitfalls (python-control 0.10.2), so this module never uses them:
``control.balred`` hard-codes continuous time (it keeps "unstable" modes of a stable
discrete system and returns a dt=0 system with only a warning), ``control.hsvd`` raises
NotImplementedError in discrete time, and ``control.ss`` silently drops imaginary parts.
Only real matrices reach python-control; the reduction itself is the square-root method
written here. ``slycot.ab09ad('D', ...)`` is the independent reference used in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
# H∞ norm
# --------------------------------------------------------------------------------------

# ``hinf_norm``'s frequency grid (``_hinf_grid``): relative step κ, at most _HINF_MAX_STEP.
_HINF_KAPPA = 0.5
_HINF_MAX_STEP = np.pi / 64
_HINF_BATCH = 32  # frequencies per exact evaluation at most (a [batch, p, 2n] product)
_HINF_PEAKS = 4  # grid maxima refined: the best ones ...
_HINF_NEAR = 0.05  # ... within this fraction of the grid's best (κ = 0.5 misses a peak by ≤ ~3%)
_HINF_STEPS = 30  # refinement steps at most (Brent's method; ~5-10 needed)


def hinf_norm(
    lam: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    input_covariance: np.ndarray | None = None,
) -> float:
    """H∞ norm of the layer's strictly proper part, ``sup_ω σ_max(G(e^{iω}))``.

    ``G(z) = z C_x (zI − A)^{-1} B_x`` is the real form read with the layer's timing (D
    excluded); ``|z| = 1`` makes the factor z irrelevant, so this is also the norm of
    ``real_realization(lam, B, C)``. With ``input_covariance`` Σ_u ``[H_in, H_in]``, the
    weighted norm ``‖G Σ_u^{1/2}‖_∞``: the weighting of ``balanced_truncation``'s ``bound``,
    so ``bound / hinf_norm`` is the cut's worst-case relative error.

    Works on the diagonal form, never the 2n×2n real system: for real inputs, with
    ``z = e^{iω}``,

        G(z) = ½ [C diag(z/(z−λ)) B + conj(C) diag(z/(z−λ̄)) conj(B)],

    and ``ω ∈ [0, π]`` suffices (``G(e^{−iω}) = conj G(e^{iω})``). On a grid adapted to
    the poles (``_hinf_grid``: dense around each mode's angle |arg λ| at the scale
    1 − |λ|), σ_max is computed exactly only where a cheap upper bound can beat the best
    value so far (``_grid_gains``), so the grid's maximum is exact; the best grid maxima
    are then refined between their neighbours (``_refine_peaks``). The result is a
    σ_max attained at some ω, i.e. a lower bound; it agreed with SLICOT ab13dd (tol
    1e-10) to within that tolerance on 480 random layers (n ≤ 64, modes up to
    |λ| = 0.9999, real and clustered modes, H > 2n). Time at n = 128, H = 64 with one BLAS
    thread (as the CLI sets), on one core of an AMD EPYC (Zen 3, family 25; KVM guest, ``lscpu``)
    whose other core was busy: 20-30 ms with narrow modes, 60-90 ms for a layer of broad
    ones (where the bound prunes little).
    """
    lam, B, C, _ = check_system(lam, B, C)
    if not (np.isfinite(B).all() and np.isfinite(C).all()):
        raise ValueError("B and C must be finite")  # NaN would fail every bound test: 0
    if input_covariance is not None:
        B = B @ _psd_factor(_check_covariance(input_covariance, B.shape[1]))
    # G's columns lie in the span of the real vectors Re C_j, Im C_j (its rows: of Re B_j,
    # Im B_j), so a real orthonormal basis of it shrinks an H > 2n to 2n, σ unchanged.
    C, B = _real_compress(C), _real_compress(B.T).T
    if not (np.any(B) and np.any(C)):
        return 0.0
    poles = np.concatenate([lam, lam.conj()])  # [2n]
    Cc = 0.5 * np.concatenate([C, C.conj()], axis=1)  # [p, 2n]
    Bc = np.concatenate([B, B.conj()], axis=0)  # [2n, m]

    def gain(omega: np.ndarray) -> np.ndarray:
        chunks = np.array_split(omega, max(1, -(-omega.size // _HINF_BATCH)))
        return np.concatenate([_largest_gain(Cc, Bc, _mode_gains(poles, w)) for w in chunks])

    omega = _hinf_grid(lam)
    # ‖G(ω)‖_F² = gᴴ K g with the mode gains g_j = z/(z − pole_j): O(n²) per frequency
    # against O(n p m) for G.
    K = (Cc.conj().T @ Cc) * (Bc.conj() @ Bc.T)  # [2n, 2n] Hermitian PSD
    sigma = _grid_gains(_mode_gains(poles, omega), K, lambda i: gain(omega[i]))
    if not np.any(sigma > 0.0):
        return 0.0  # G ≡ 0 though B, C are not (every mode unobservable or unreachable)
    return _refine_peaks(omega, sigma, gain)


def _real_compress(M: np.ndarray) -> np.ndarray:
    """``Qᵀ M`` for complex ``M [p, n]`` with p > 2n, Q ``[p, 2n]`` a real orthonormal basis
    of the span of ``[Re M, Im M]``; ``M`` itself when p ≤ 2n."""
    if M.shape[0] <= 2 * M.shape[1]:
        return M
    Q = np.linalg.qr(np.concatenate([M.real, M.imag], axis=1))[0]
    return Q.T @ M


def _hinf_grid(lam: np.ndarray) -> np.ndarray:
    """Sorted frequencies in [0, π] for ``hinf_norm``, adapted to the poles.

    Steps of ``κ d(ω)``, d the distance from e^{iω} to the nearest pole, at most
    ``_HINF_MAX_STEP``: each mode's term z/(z − λ) changes by about κ between neighbours,
    so a resonance of width 1 − |λ| gets ~(2/κ) log(spacing / width) points, while a
    layer of broad modes gets the 65 of the step cap. The angles of narrow modes, where
    their gains peak, are added.
    """
    # For ω ∈ [0, π] the nearer of λ, λ̄ is the one in the upper half-plane.
    radius, angle = np.abs(lam), np.abs(np.angle(lam))
    upper = radius * np.exp(1j * angle)
    steps = [0.0]
    while steps[-1] < np.pi:
        d = float(np.abs(np.exp(1j * steps[-1]) - upper).min())
        # (1e-12: progress next to a pole within rounding of the circle)
        steps.append(steps[-1] + min(_HINF_MAX_STEP, max(_HINF_KAPPA * d, 1e-12)))
    narrow = angle[1.0 - radius < _HINF_MAX_STEP]
    return np.unique(np.concatenate([steps[:-1], [np.pi], narrow]))


def _mode_gains(poles: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """``z / (z − pole)`` at ``z = e^{iω}``, complex ``[W, 2n]``."""
    z = np.exp(1j * omega)[:, None]
    return z / (z - poles)


def _largest_gain(Cc: np.ndarray, Bc: np.ndarray, g: np.ndarray) -> np.ndarray:
    """σ_max of ``Cc diag(g_w) Bc`` for each row ``g_w`` of ``g [W, 2n]``, float64 ``[W]``."""
    G = (Cc * g[:, None, :]) @ Bc  # [W, p, m]
    # The top eigenvalue of the smaller Gram matrix: faster than a batched SVD, and as
    # accurate for σ_max (its error is relative to σ_max² either way).
    Gh = G.conj().swapaxes(1, 2)
    M = G @ Gh if G.shape[1] <= G.shape[2] else Gh @ G
    return np.sqrt(np.maximum(np.linalg.eigvalsh(M)[:, -1], 0.0))


def _grid_gains(g: np.ndarray, K: np.ndarray, gain) -> np.ndarray:
    """σ_max on the grid wherever it can exceed the grid's maximum, else −inf, ``[W]``.

    Branch and bound over the grid, with ``g [W, 2n]`` the mode gains and ``gain(indices)``
    the exact σ_max. Upper bounds: ``‖G(ω)‖_F``, and ``σ(ω') + ‖G(ω) − G(ω')‖_F`` from the
    evaluated neighbours ω' on either side (tight near narrow peaks, where G is nearly
    rank one; on a layer of broad modes most of the grid is evaluated).
    """

    def frobenius(d: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(np.einsum("wj,wj->w", d @ K.T, d.conj()).real, 0.0))

    upper = frobenius(g)
    sigma = np.full(g.shape[0], -np.inf)
    best, batch = 0.0, 4  # a narrow peak usually settles it in the first few
    while True:
        open_ = np.flatnonzero(np.isneginf(sigma) & (upper > best))
        if open_.size == 0:
            return sigma
        new = open_[np.argsort(upper[open_])[::-1][:batch]]
        batch = min(2 * batch, _HINF_BATCH)
        sigma[new] = gain(new)
        best = max(best, float(sigma[new].max()))
        open_ = np.flatnonzero(np.isneginf(sigma) & (upper > best))
        done = np.flatnonzero(~np.isneginf(sigma))
        at = np.searchsorted(done, open_)
        for nb in (done[np.maximum(at - 1, 0)], done[np.minimum(at, done.size - 1)]):
            moved = np.isin(nb, new)  # bounds only change where a neighbour is new
            i, j = open_[moved], nb[moved]
            upper[i] = np.minimum(upper[i], sigma[j] + frobenius(g[i] - g[j]))


def _refine_peaks(omega: np.ndarray, sigma: np.ndarray, gain) -> float:
    """The best σ_max found from the grid's best maxima, each refined between its neighbours.

    A peak can fall between grid points (a few % above both), so the ``_HINF_PEAKS`` best
    grid maxima within ``_HINF_NEAR`` of the best are refined, all at once, by Brent's
    method (parabolic steps through the three best points while they shrink fast enough,
    golden-section steps otherwise) on the bracket of their grid neighbours.
    """
    W = omega.size
    i = np.arange(W)
    sigma = sigma.copy()
    best = float(sigma.max())
    is_peak = (sigma >= sigma[np.maximum(i - 1, 0)]) & (sigma >= sigma[np.minimum(i + 1, W - 1)])
    peaks = np.flatnonzero(is_peak & (sigma >= (1.0 - _HINF_NEAR) * best))
    peaks = peaks[np.argsort(sigma[peaks])[::-1][:_HINF_PEAKS]]
    # Bracket ends: the grid neighbours, pruned ones evaluated now. σ is even about 0
    # and π, so a peak there is bracketed by its neighbour's mirror image.
    lo = np.where(peaks == 0, 1, peaks - 1)
    hi = np.where(peaks == W - 1, W - 2, peaks + 1)
    ends = np.unique(np.concatenate([lo, hi]))
    missing = ends[np.isneginf(sigma[ends])]
    if missing.size:
        sigma[missing] = gain(omega[missing])
        best = max(best, float(sigma[missing].max()))
    # The best one is bracketed, unless a pruned neighbour beats it: the Frobenius bound
    # (``_grid_gains``) is rounding where G nearly cancels (G − G_r of a near-exact cut,
    # ~1e-12 of the layer's norm), and then nothing may be left to refine.
    bracketed = (sigma[peaks] >= sigma[lo]) & (sigma[peaks] >= sigma[hi])
    peaks, lo, hi = peaks[bracketed], lo[bracketed], hi[bracketed]
    if peaks.size == 0:
        return best
    a = np.where(peaks == 0, -omega[lo], omega[lo])
    b = np.where(peaks == W - 1, 2.0 * np.pi - omega[hi], omega[hi])
    x, fx = omega[peaks], sigma[peaks]
    # w: the second best point, v: the previous w (Brent's notation).
    w, fw = np.where(sigma[lo] >= sigma[hi], a, b), np.maximum(sigma[lo], sigma[hi])
    v, fv = np.where(sigma[lo] >= sigma[hi], b, a), np.minimum(sigma[lo], sigma[hi])
    # Location to 1e-6 of the bracket: ~1e-12 relative at a peak as wide as the bracket.
    tol = 1e-6 * (b - a)
    d = e = b - a  # the last two steps; this long, the first step may be parabolic
    active = np.ones(x.shape, bool)
    for _ in range(_HINF_STEPS):
        mid = 0.5 * (a + b)
        active &= np.abs(x - mid) > 2.0 * tol - 0.5 * (b - a)
        if not active.any():
            break
        r, q = (x - w) * (fx - fv), (x - v) * (fx - fw)
        p, q = (x - v) * q - (x - w) * r, 2.0 * (q - r)
        p, q = np.where(q > 0, -p, p), np.abs(q)
        # The parabola's vertex, where it is inside the bracket and the step is under half
        # the one before last (else a golden-section step into the longer side).
        parabolic = (
            (np.abs(e) > tol)
            & (np.abs(p) < np.abs(0.5 * q * e))
            & (p > q * (a - x))
            & (p < q * (b - x))
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(parabolic, p / q, 0.0)
        step = np.where(
            (x + step - a < 2 * tol) | (b - x - step < 2 * tol), np.copysign(tol, mid - x), step
        )
        longer = np.where(x >= mid, a - x, b - x)
        e = np.where(active, np.where(parabolic, d, longer), e)
        d = np.where(active, np.where(parabolic, step, 0.381966 * longer), d)
        u = x + np.where(np.abs(d) >= tol, d, np.copysign(tol, d))
        fu = np.full(x.shape, -np.inf)
        fu[active] = gain(u[active])
        up = active & (fu >= fx)
        down = active & ~up
        a = np.where((up & (u >= x)) | (down & (u < x)), np.where(up, x, u), a)
        b = np.where((up & (u < x)) | (down & (u >= x)), np.where(up, x, u), b)
        to_w = down & ((fu >= fw) | (w == x))
        to_v = down & ~to_w & ((fu >= fv) | (v == x) | (v == w))
        v, fv = (
            np.where(up | to_w, w, np.where(to_v, u, v)),
            np.where(up | to_w, fw, np.where(to_v, fu, fv)),
        )
        w, fw = np.where(up, x, np.where(to_w, u, w)), np.where(up, fx, np.where(to_w, fu, fw))
        x, fx = np.where(up, u, x), np.where(up, fu, fx)
    return max(best, float(fx.max()))


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
    # Copies, and complex: assigning b₁ + i b₂ into a float array would keep b₁ alone.
    lam, B, C, W = (np.array(M, dtype=np.complex128) for M in (lam, B, C, W))
    for first, second, mid in merged:
        lam[first] = mid
        B[first] = B[first].real + 1j * B[second].real
        C[:, first] = C[:, first].real - 1j * C[:, second].real
        W[first] = W[first].real + 1j * W[second].real
    drop = [second for _, second, _ in merged]
    keep = np.setdiff1d(np.arange(lam.shape[0]), drop)
    return lam[keep], B[keep], C[:, keep], W[keep], len(merged), spent
