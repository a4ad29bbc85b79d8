"""Float64 references for the tests: a layer's responses, with the layer's timing.

Independent of the reduction code they check (``compressm_rl.compression.lti``): direct
recursion, Markov parameters and the transfer matrix on the unit circle, on the arrays
of ``policies.lti`` (``lam [n]``, ``B [n, H_in]``, ``C [H_out, n]``, ``D [H_out]``).
"""

from __future__ import annotations

import numpy as np

from policies.lti import check_system


def impulse_response(
    lam: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray, steps: int
) -> np.ndarray:
    """Markov parameters of the layer, ``[steps, H_out, H_in]`` float64.

    ``G_0 = Re(C B) + diag D``, ``G_k = Re(C diag(lam)^k B)`` (layer timing).
    """
    lam, B, C, D = check_system(lam, B, C, D)
    powers = lam[None, :] ** np.arange(steps)[:, None]  # [steps, n]
    G = np.einsum("on,kn,ni->koi", C, powers, B).real
    G[0] += np.diag(D)
    return G


def real_impulse_response(
    A: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray, steps: int
) -> np.ndarray:
    """Markov parameters ``[steps, H_out, H_in]`` of ``x_t = A x_{t-1} + B u_t,
    y_t = C x_t + D u_t`` (layer timing): ``G_0 = C B + D``, ``G_k = C A^k B``."""
    out = np.empty((steps, C.shape[0], B.shape[1]))
    AkB = np.asarray(B, dtype=np.float64)
    for k in range(steps):
        out[k] = C @ AkB
        AkB = A @ AkB
    out[0] += D
    return out


def frequency_response(
    lam: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray, omegas: np.ndarray
) -> np.ndarray:
    """The layer's transfer matrix on the unit circle, complex ``[len(omegas), H_out, H_in]``.

    With ``z = e^{iω}``::

        G(z) = diag D + ½ [C diag(z/(z−λ)) B + conj(C) diag(z/(z−λ̄)) conj(B)]

    (layer timing; ``control``'s reading of ``real_realization`` has ``1/(z−λ)`` instead,
    which differs only by the all-pass factor z on the strictly proper part).
    """
    lam, B, C, D = check_system(lam, B, C, D)
    z = np.exp(1j * np.asarray(omegas, dtype=np.float64))[:, None]  # [W, 1]
    g1 = z / (z - lam[None, :])  # [W, n]
    g2 = z / (z - lam.conj()[None, :])
    G = 0.5 * (
        np.einsum("on,wn,ni->woi", C, g1, B) + np.einsum("on,wn,ni->woi", C.conj(), g2, B.conj())
    )
    return G + np.diag(D)[None]


def simulate(
    lam: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    D: np.ndarray,
    u: np.ndarray,
    h0: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the layer on ``u`` ``[T, H_in]`` from ``h0`` complex ``[n]`` (zeros if None).

    Returns ``y`` ``[T, H_out]`` and the final state ``[n]``. A float64 reference, not fast.
    """
    lam, B, C, D = check_system(lam, B, C, D)
    h = np.zeros(lam.shape[0], np.complex128) if h0 is None else np.asarray(h0, np.complex128)
    bu = np.asarray(u, dtype=np.float64) @ B.T  # [T, n]
    y = np.empty((bu.shape[0], C.shape[0]))
    for t in range(bu.shape[0]):
        h = lam * h + bu[t]
        y[t] = (C @ h).real + D * u[t]
    return y, h
