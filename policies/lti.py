"""One realisation of a diagonal linear recurrent layer, on numpy arrays (no torch).

Every part of the project that needs a layer's algebra reads it here: the rollout's
frozen step (``LRUStack.frozen_step``), the ONNX builder, and the balanced-truncation
maths (``compressm_rl.compression.lti``). See docs/design.md §2-§3.

One layer, input ``u_t`` real ``[H_in]``, complex state ``h_t`` ``[n]``, output real
``[H_out]``, discrete time::

    h_t = diag(lam) h_{t-1} + B u_t,      y_t = Re(C h_t) + D ⊙ u_t

``lam`` complex ``[n]`` (|lam| < 1), ``B`` complex ``[n, H_in]`` (the *effective* input
matrix, an LRU's γ included), ``C`` complex ``[H_out, n]``, ``D`` real ``[H_out]`` (then
``H_in == H_out``). The output is read from the *updated* state.

Real form, ``x = [Re h; Im h]`` (2n states), exact for the layer's map::

    x_t = A x_{t-1} + B_x u_t,    y_t = C_x x_t + D_x u_t
    A = [[diag a, -diag b], [diag b, diag a]]  (lam = a + i b)
    B_x = [Re B; Im B],   C_x = [Re C, -Im C],   D_x = diag(D)

The rollout and the ONNX graph carry states as rows (``x' = x Aᵀ + u B_xᵀ``); since
both the new state and the output are linear in ``(x, u)``, one product gives both
(``merged_step_matrices``).

The LRU parametrisation (``policies.lru.LRU``) maps free parameters to the system::

    lam = exp(-exp(ν) + i θ),   γ = sqrt(1 - |lam|²),   B = diag(γ) (B_re + i B_im)

with |lam| clamped to ``MAX_RADIUS`` (γ → 0 would blow up B_re = Re B / γ).
``lru_parameters`` is the inverse.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

MAX_RADIUS = 0.9999
MIN_DECAY = -math.log(MAX_RADIUS)  # exp(ν) floor that keeps |lam| ≤ MAX_RADIUS
MIN_RADIUS = 1e-30  # lam = 0 has no ν; float32 holds 1e-30 · h as 0 beside any b_t


class DiagonalSystem(NamedTuple):
    """A layer's ``(lam [n], B [n, H_in], C [H_out, n], D [H_out])`` (module docstring).

    Unpacks into the array functions of this module and of the reduction maths:
    ``real_form(*system)``.
    """

    lam: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray

    @property
    def state_dim(self) -> int:
        """n, complex states."""
        return int(self.lam.shape[0])


def check_system(
    lam: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray | None = None
) -> DiagonalSystem:
    """The arrays as complex128 / float64 with matching shapes and |lam| < 1, or a ValueError.

    ``D`` None stays None (a system without feed-through).
    """
    lam = np.asarray(lam, dtype=np.complex128)
    B = np.asarray(B, dtype=np.complex128)
    C = np.asarray(C, dtype=np.complex128)
    if lam.ndim != 1 or B.ndim != 2 or C.ndim != 2:
        raise ValueError(
            f"expected lam [n], B [n, H_in], C [H_out, n]; got {lam.shape}, {B.shape}, {C.shape}"
        )
    n = lam.shape[0]
    if B.shape[0] != n or C.shape[1] != n:
        raise ValueError(f"B {B.shape} and C {C.shape} do not match n = {n}")
    if np.any(np.abs(lam) >= 1.0):
        raise ValueError(f"the layer must be stable, got max |lam| = {np.abs(lam).max()}")
    if D is not None:
        D = np.asarray(D, dtype=np.float64)
        if D.shape != (C.shape[0],) or B.shape[1] != C.shape[0]:
            raise ValueError(
                f"D must be [H] with H_in == H_out == H; got D {D.shape}, B {B.shape}, C {C.shape}"
            )
    return DiagonalSystem(lam, B, C, D)


def real_form(
    lam: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(A [2n, 2n], B_x [2n, H_in], C_x [H_out, 2n], D_x [H_out, H_in])``, float64.

    ``x = [Re h; Im h]`` (module docstring). ``D`` None gives a zero ``D_x``.
    """
    lam, B, C, D = check_system(lam, B, C, D)
    a, b = np.diag(lam.real), np.diag(lam.imag)
    A = np.block([[a, -b], [b, a]])
    Bx = np.concatenate([B.real, B.imag], axis=0)
    Cx = np.concatenate([C.real, -C.imag], axis=1)
    Dx = np.zeros((C.shape[0], B.shape[1])) if D is None else np.diag(D)
    return A, Bx, Cx, Dx


def merged_step_matrices(
    lam: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One step's new state and output from one product, in row form, float64.

    With ``x`` ``[.., 2n]`` the carried state and ``u`` ``[.., H]`` the input::

        [x' | y] = x @ from_state + u @ from_input
        from_state = [Aᵀ | Aᵀ C_xᵀ]            [2n, 2n + H]
        from_input = [B_xᵀ | B_xᵀ C_xᵀ + D_x]   [H, 2n + H]

    (``y = C_x x' + D u`` with ``x' = A x + B_x u`` substituted).
    """
    A, Bx, Cx, Dx = real_form(lam, B, C, D)
    from_state = np.concatenate([A.T, A.T @ Cx.T], axis=1)
    from_input = np.concatenate([Bx.T, Bx.T @ Cx.T + Dx.T], axis=1)
    return from_state, from_input


def lru_parameters(lam: np.ndarray, B: np.ndarray) -> dict[str, np.ndarray]:
    """LRU parameters for eigenvalues ``lam`` ``[n]`` and effective input matrix ``B``.

    Returns float64 ``nu_log [n]``, ``theta [n]`` (in (−π, π]), ``B_re, B_im [n, H]``
    with ``B_re + i B_im = B / γ``. Needs ``|lam| ≤ MAX_RADIUS`` (a reduction keeps to it:
    ``balanced_truncation(..., max_radius=MAX_RADIUS)``). ``lam = 0`` (ν = +∞) is held as
    ``|lam| = MIN_RADIUS``, which float32 cannot tell from 0 in any state it adds to.
    """
    lam = np.asarray(lam, dtype=np.complex128)
    radius = np.abs(lam)
    if np.any(radius > MAX_RADIUS * (1 + 1e-12)):
        raise ValueError(
            f"need |lam| <= MAX_RADIUS = {MAX_RADIUS}, got {radius.max()}; reduce with "
            f"max_radius=MAX_RADIUS (it clamps with the mode's gain kept)"
        )
    lam = np.where(radius < MIN_RADIUS, MIN_RADIUS, lam)
    decay = -np.log(np.abs(lam))
    gamma = np.sqrt(-np.expm1(-2.0 * decay))
    Bs = np.asarray(B, dtype=np.complex128) / gamma[:, None]
    return {
        "nu_log": np.log(decay),
        "theta": np.angle(lam),
        "B_re": Bs.real.copy(),
        "B_im": Bs.imag.copy(),
    }
