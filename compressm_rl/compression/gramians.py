"""Gramians and Hankel singular values of one diagonal LTI layer, numpy float64 arrays.

Conventions are those of ``policies.lti`` (one realisation for the whole project)::

    h_t = diag(lam) h_{t-1} + B u_t,      y_t = Re(C h_t) + D ⊙ u_t

with the real form ``x = [Re h; Im h]``, ``(A, B_x, C_x, D_x) = real_form(lam, B, C, D)``.
Note the timing: the layer reads its output from the *updated* state (``y_t = C x_t +
D u_t`` with ``x_t = A x_{t-1} + B u_t``), whereas a ``control.StateSpace`` means
``x_{t+1} = A x_t + B u_t, y_t = C x_t + D u_t``. Hence

    G_layer(z) = D + z (G_ss(z) - D).

The Gramians and Hankel singular values (HSVs) are those of ``(A, B_x, C_x)``; with
``input_covariance`` (data-weighted Gramians, Enns), P is that of ``(A, B_x Σ_u^{1/2})``.
Only real matrices reach python-control (``control.ss`` silently drops imaginary parts;
``compression.lti`` lists the other pitfalls). ``compression.lti`` truncates on these
Gramians, ``compression.hinf`` measures H∞ norms with the same input weighting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.linalg as sla

from policies.lti import check_system, real_form

if TYPE_CHECKING:
    import control

GramianMethod = Literal["closed_form", "control"]


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
