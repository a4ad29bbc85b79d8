"""The H∞ norm of one diagonal LTI layer (docs/design.md §6), numpy float64 arrays.

``hinf_norm`` measures ``‖G‖_∞`` of the layer's strictly proper part (``‖G Σ_u^{1/2}‖_∞``
when weighted by an input covariance, as ``compression.gramians`` weights P) on the
diagonal form: the scale that turns ``balanced_truncation``'s bound (``compression.lti``)
into a relative error, and, applied to the error system, a check of that bound.
Conventions (realisation, timing) are those of ``compression.gramians``.
"""

from __future__ import annotations

import numpy as np

from compressm_rl.compression.gramians import _check_covariance, _psd_factor
from policies.lti import check_system

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
    grid maxima within ``_HINF_NEAR`` of the best (``_bracketed_peaks``) are refined, all
    at once, by Brent's method (``_brent_maxima``) on the bracket of their grid neighbours.
    """
    sigma, best, peaks, lo, hi = _bracketed_peaks(omega, sigma, gain)
    if peaks.size == 0:
        return best
    W = omega.size
    a = np.where(peaks == 0, -omega[lo], omega[lo])
    b = np.where(peaks == W - 1, 2.0 * np.pi - omega[hi], omega[hi])
    x, fx = omega[peaks], sigma[peaks]
    # w: the second best point, v: the previous w (Brent's notation).
    w, fw = np.where(sigma[lo] >= sigma[hi], a, b), np.maximum(sigma[lo], sigma[hi])
    v, fv = np.where(sigma[lo] >= sigma[hi], b, a), np.minimum(sigma[lo], sigma[hi])
    return max(best, _brent_maxima(a, b, x, fx, w, fw, v, fv, gain))


def _bracketed_peaks(
    omega: np.ndarray, sigma: np.ndarray, gain
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, np.ndarray]:
    """The grid maxima to refine, each between its grid neighbours: ``(σ [W] with the
    bracket ends evaluated, the best σ so far, peak indices, lower and upper neighbour
    indices)``; the peaks are the ``_HINF_PEAKS`` best grid maxima within ``_HINF_NEAR`` of
    the best, less those a neighbour beats."""
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
    return sigma, best, peaks[bracketed], lo[bracketed], hi[bracketed]


def _brent_maxima(
    a: np.ndarray,
    b: np.ndarray,
    x: np.ndarray,
    fx: np.ndarray,
    w: np.ndarray,
    fw: np.ndarray,
    v: np.ndarray,
    fv: np.ndarray,
    gain,
) -> float:
    """Brent's method for a maximum, run on every bracket ``[a, b]`` at once: parabolic
    steps through the three best points (x the best, w the second best, v the previous w;
    σ ``fx``, ``fw``, ``fv``) while they shrink fast enough, golden-section steps
    otherwise, at most ``_HINF_STEPS``. Returns the best σ found."""
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
    return float(fx.max())
