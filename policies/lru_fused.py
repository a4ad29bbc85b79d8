"""The LRU block's sequence pass as one compiled kernel per direction (CPU, numba).

One block of G stacks side by side (``policies.lru.grouped_forward``), on inputs
``u`` ``[G, B, T, H]`` (B sequences of T steps)::

    z = LayerNorm(u) · w + b                      each group's affine w, b  [G, H]
    h_t = λ h_{t-1} + B̃ z_t  (h_{-1} = h0; h_{t-1} ignored where step t resets)
    v = Re(C h) + D ⊙ z
    out = u + GELU(v)

Under autograd this is ~40 recorded ops, each a pass over a ``[G, B·T, H]`` tensor that
no longer sits in cache: on the EPYC VM such a pass costs 60-150 µs against 10-15 µs
warm, and the block spent more time moving activations than multiplying. Here one
kernel call walks the G·B sequences one at a time; each sequence's activations
(``T × 2n`` floats at most) stay in L1/L2 from the LayerNorm to the residual, and its
four products are small GEMMs (``np.dot``, BLAS). The backward is a second kernel, the
same walk in reverse order of operations. The parametrisation (λ, B̃, C from ν, θ, B, C)
stays in autograd outside, written once in ``policies.lru``.

States are real here, ``[Re h_1, Im h_1, Re h_2, ...]`` (the layout of ``B̃``'s rows and
``C``'s columns in ``input_weight_of``/``output_weight_of``), so complex products are
written out. Gradients follow torch's convention for complex tensors
(grad = ∂L/∂Re + i ∂L/∂Im), with δ = ∂L/∂h and g = ∂L/∂out:

    g_v = g ⊙ GELU'(v),  g_D = Σ g_v ⊙ z,  g_C = g_vᵀ h,  ∂L/∂h (direct) = g_v C
    δ_t = ∂L/∂h_t + conj(λ) δ_{t+1}  (no carry into a reset step t + 1)
    g_λ = Σ_t δ_t conj(h_{t-1}),  g_h0 = conj(λ) δ_0   (no term where step t resets)
    g_B̃ = δᵀ z,  g_z = g_v ⊙ D + δ B̃,  g_w = Σ g_z ⊙ ẑ,  g_b = Σ g_z
    g_u = g + LayerNorm'(g_z ⊙ w)

GELU is the exact erf form; in float32 erf is Eigen's rational approximation (|error|
< 1e-6 against the float64 erf, vectorisable, no exp), in float64 ``math.erf``.
Tested against the autograd path in float64 (``tests/test_lru_fused.py``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload
from threadpoolctl import threadpool_limits
from torch import Tensor

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _erf(x):  # pragma: no cover - replaced inside compiled code by the overload below
    return math.erf(x)


@overload(_erf, inline="always")
def _erf_impl(x):
    if x == types.float32:
        # Eigen's generic_fast_erf_float: x·P(x²)/Q(x²) on [-4, 4] (erf = ±1 beyond).
        def fast(x):
            x = min(max(x, np.float32(-4.0)), np.float32(4.0))
            x2 = x * x
            p = x2 * np.float32(-2.72614225801306e-10) + np.float32(2.77068142495902e-08)
            p = x2 * p + np.float32(-2.10102402082508e-06)
            p = x2 * p + np.float32(-5.69250639462346e-05)
            p = x2 * p + np.float32(-7.34990630326855e-04)
            p = x2 * p + np.float32(-2.95459980854025e-03)
            p = x2 * p + np.float32(-1.60960333262415e-02)
            q = x2 * np.float32(-1.45660718464996e-05) + np.float32(-2.13374055278905e-04)
            q = x2 * q + np.float32(-1.68282697438203e-03)
            q = x2 * q + np.float32(-7.37332916720468e-03)
            q = x2 * q + np.float32(-1.42647390514189e-02)
            return x * p / q

        return fast
    return lambda x: math.erf(x)


def _exp(x):  # pragma: no cover - replaced inside compiled code by the overload below
    return math.exp(x)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits`` (a bitcast LLVM can vectorise)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@overload(_exp, inline="always")
def _exp_impl(x):
    if x == types.float32:
        # Cephes' expf: e^x = 2^k e^f, |f| ≤ ln2/2, e^f by a degree-7 polynomial (relative
        # error ~1e-7), 2^k by writing the exponent bits. For x ≤ 0 (GELU' uses e^{-v²/2}).
        def fast(x):
            x = max(x, np.float32(-87.0))
            k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
            f = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
            p = np.float32(1.9875691500e-4) * f + np.float32(1.3981999507e-3)
            p = p * f + np.float32(8.3334519073e-3)
            p = p * f + np.float32(4.1665795894e-2)
            p = p * f + np.float32(1.6666665459e-1)
            p = p * f + np.float32(5.0000001201e-1)
            p = p * f * f + f + np.float32(1.0)
            return p * _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))

        return fast
    return lambda x: math.exp(x)


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def exp(x: np.ndarray) -> np.ndarray:
    """The kernels' exp on a 1-D array of values ≤ 0 (float32: the approximation)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = _exp(x[i])
    return out


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def erf(x: np.ndarray) -> np.ndarray:
    """The kernels' erf on a 1-D array (float32: the approximation; float64: exact)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = _erf(x[i])
    return out


# Rows per tile: whole sequences, ~256 rows (BLAS reaches ~100 GFLOP/s on [256, 64] @
# [64, 50] here, ~50 on [64, 64] @ [64, 50]; at 512 rows the tile spills out of L2).
TILE_ROWS = 256


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _forward_kernel(  # pragma: no cover - compiled
    u, norm_w, norm_b, eps, lam, w_in, w_out, d, h0, reset, out, normed, rstd, h, v
):
    """u, out, normed, v ``[G, B·T, H]`` (rows sequence-major); norm_w, norm_b, d
    ``[G, H]``; lam ``[G, 2, n]`` (Re λ, Im λ); w_in ``[G, 2n, H]``; w_out ``[G, H, 2n]``;
    h0 ``[G, B, 2n]``; reset ``[B, T]``; rstd ``[G, B·T]``; h ``[G, B·T, 2n]``. States
    and their weights are planar: ``[Re h_1..n, Im h_1..n]``. Writes out, normed, rstd,
    h, v."""
    groups, rows, width = u.shape
    batch, steps = reset.shape
    n = lam.shape[2]
    dtype = u.dtype
    half, sqrt_half = dtype.type(0.5), dtype.type(_SQRT_HALF)
    per_tile = max(1, TILE_ROWS // steps)
    for g in range(groups):
        w_in_t = np.ascontiguousarray(w_in[g].T)  # [H, 2n]
        w_out_t = np.ascontiguousarray(w_out[g].T)  # [2n, H]
        lam_re, lam_im = lam[g, 0], lam[g, 1]
        for first in range(0, batch, per_tile):
            last = min(batch, first + per_tile)
            r0, r1 = first * steps, last * steps
            z = np.empty((r1 - r0, width), dtype)
            for r in range(r0, r1):
                mean = 0.0
                for k in range(width):
                    mean += u[g, r, k]
                mean /= width
                var = 0.0
                for k in range(width):
                    var += (u[g, r, k] - mean) * (u[g, r, k] - mean)
                inv = 1.0 / math.sqrt(var / width + eps)
                rstd[g, r] = inv
                for k in range(width):
                    x = dtype.type((u[g, r, k] - mean) * inv)
                    normed[g, r, k] = x
                    z[r - r0, k] = x * norm_w[g, k] + norm_b[g, k]
            hs = h[g, r0:r1]
            hs[:] = np.dot(z, w_in_t)  # B̃ z, then the scan in place
            for b in range(first, last):
                for t in range(steps):
                    if reset[b, t]:
                        continue
                    r = (b - first) * steps + t
                    prev = h0[g, b] if t == 0 else hs[r - 1]
                    for j in range(n):
                        re, im = prev[j], prev[n + j]
                        hs[r, j] += lam_re[j] * re - lam_im[j] * im
                        hs[r, n + j] += lam_re[j] * im + lam_im[j] * re
            y = np.dot(hs, w_out_t)
            for r in range(r0, r1):
                for k in range(width):
                    x = y[r - r0, k] + d[g, k] * z[r - r0, k]
                    v[g, r, k] = x
                    out[g, r, k] = u[g, r, k] + half * x * (1 + _erf(x * sqrt_half))


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _backward_kernel(  # pragma: no cover - compiled
    grad,
    normed,
    rstd,
    norm_w,
    norm_b,
    lam,
    w_in,
    w_out,
    d,
    h0,
    reset,
    h,
    v,
    grad_u,
    grad_norm_w,
    grad_norm_b,
    grad_lam,
    grad_w_in,
    grad_w_out,
    grad_d,
    grad_h0,
):
    """Inputs as ``_forward_kernel`` saved them, and ``grad`` = ∂L/∂out. Writes grad_u
    ``[G, B·T, H]`` and grad_h0 ``[G, B, 2n]``; adds into grad_norm_w, grad_norm_b,
    grad_d ``[G, H]``, grad_lam ``[G, 2, n]`` (float64), grad_w_in ``[G, 2n, H]`` and
    grad_w_out ``[G, H, 2n]`` (zeroed by the caller)."""
    groups, rows, width = grad.shape
    batch, steps = reset.shape
    n = lam.shape[2]
    dtype = grad.dtype
    half, sqrt_half = dtype.type(0.5), dtype.type(_SQRT_HALF)
    inv_sqrt_2pi = dtype.type(_INV_SQRT_2PI)
    per_tile = max(1, TILE_ROWS // steps)
    for g in range(groups):
        lam_re, lam_im = lam[g, 0], lam[g, 1]
        acc_re, acc_im = grad_lam[g, 0], grad_lam[g, 1]
        for first in range(0, batch, per_tile):
            last = min(batch, first + per_tile)
            r0, r1 = first * steps, last * steps
            z = np.empty((r1 - r0, width), dtype)
            grad_v = np.empty((r1 - r0, width), dtype)
            for r in range(r0, r1):
                for k in range(width):
                    z[r - r0, k] = normed[g, r, k] * norm_w[g, k] + norm_b[g, k]
                    x = v[g, r, k]
                    slope = half * (1 + _erf(x * sqrt_half)) + x * inv_sqrt_2pi * _exp(
                        -half * x * x
                    )
                    grad_v[r - r0, k] = grad[g, r, k] * slope
                    grad_d[g, k] += grad_v[r - r0, k] * z[r - r0, k]
            hs = h[g, r0:r1]
            grad_w_out[g] += np.dot(grad_v.T, hs)
            delta = np.dot(grad_v, w_out[g])  # ∂L/∂h from the output, then the reverse scan
            for b in range(first, last):
                for t in range(steps - 1, -1, -1):
                    r = (b - first) * steps + t
                    if t < steps - 1 and not reset[b, t + 1]:
                        for j in range(n):
                            re, im = delta[r + 1, j], delta[r + 1, n + j]
                            delta[r, j] += lam_re[j] * re + lam_im[j] * im
                            delta[r, n + j] += lam_re[j] * im - lam_im[j] * re
                    if reset[b, t]:
                        if t == 0:
                            grad_h0[g, b, :] = 0
                        continue
                    prev = h0[g, b] if t == 0 else hs[r - 1]
                    for j in range(n):
                        dr, di = delta[r, j], delta[r, n + j]
                        acc_re[j] += dr * prev[j] + di * prev[n + j]
                        acc_im[j] += di * prev[j] - dr * prev[n + j]
                    if t == 0:
                        for j in range(n):
                            dr, di = delta[r, j], delta[r, n + j]
                            grad_h0[g, b, j] = lam_re[j] * dr + lam_im[j] * di
                            grad_h0[g, b, n + j] = lam_re[j] * di - lam_im[j] * dr
            grad_w_in[g] += np.dot(delta.T, z)
            grad_z = np.dot(delta, w_in[g])
            for r in range(r0, r1):
                mean_gn, mean_gnx = 0.0, 0.0
                for k in range(width):
                    gz = grad_z[r - r0, k] + grad_v[r - r0, k] * d[g, k]
                    grad_norm_w[g, k] += gz * normed[g, r, k]
                    grad_norm_b[g, k] += gz
                    gn = gz * norm_w[g, k]
                    grad_z[r - r0, k] = gn
                    mean_gn += gn
                    mean_gnx += gn * normed[g, r, k]
                mean_gn /= width
                mean_gnx /= width
                inv = rstd[g, r]
                for k in range(width):
                    x = normed[g, r, k]
                    grad_u[g, r, k] = grad[g, r, k] + dtype.type(
                        inv * (grad_z[r - r0, k] - mean_gn - x * mean_gnx)
                    )


def _np(t: Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor (copied only if not contiguous)."""
    t = t.detach()
    return (t if t.is_contiguous() else t.contiguous()).numpy()


# Interleaved [Re 1, Im 1, Re 2, ...] <-> planar [Re 1..n, Im 1..n] along one axis, in
# numpy (a few µs; the same in torch ops costs ~10 µs an op, which adds up at PPO sizes).
def _planar(x: np.ndarray, axis: int) -> np.ndarray:
    shape = x.shape
    split = x.reshape(*shape[:axis], shape[axis] // 2, 2, *shape[axis + 1 :])
    return np.ascontiguousarray(np.swapaxes(split, axis, axis + 1)).reshape(shape)


def _interleaved(x: np.ndarray, axis: int) -> np.ndarray:
    shape = x.shape
    split = x.reshape(*shape[:axis], 2, shape[axis] // 2, *shape[axis + 1 :])
    return np.ascontiguousarray(np.swapaxes(split, axis, axis + 1)).reshape(shape)


_blas_threads: int | None = None


def _match_blas_threads() -> None:
    """Hold the BLAS behind the kernels' ``np.dot`` (scipy's OpenBLAS, threaded by
    default) to torch's thread count, so that one torch thread means one core: its
    spinning helper threads otherwise took a second core from the env steps."""
    global _blas_threads
    threads = torch.get_num_threads()
    if threads != _blas_threads:
        import scipy.linalg  # noqa: F401 - loads that BLAS, so that it can be found

        threadpool_limits(threads, user_api="blas")
        _blas_threads = threads


class FusedLRUBlock(torch.autograd.Function):
    """``out = u + GELU(LRU(LayerNorm(u)))`` for G groups; see the module docstring.

    Args (to ``apply``):
        u: ``[G, B·T, H]`` real inputs, rows sequence-major (B sequences of T steps).
        norm_w, norm_b: LayerNorm affine ``[G, H]``.
        lam: eigenvalues, complex ``[G, n]``.
        w_in: B̃ as real ``[G, 2n, H]``, rows interleaved (``policies.lru.input_weight_of``).
        w_out: C as real ``[G, H, 2n]``, columns interleaved (``output_weight_of``).
        d: skip ``[G, H]``.
        h0: complex ``[G, B, n]``, the state before each sequence's first step.
        reset: bool ``[B, T]``, episode starts (the same for every group).
        eps: LayerNorm's epsilon.

    Returns ``out`` ``[G, B·T, H]``.
    """

    @staticmethod
    def forward(ctx, u, norm_w, norm_b, lam, w_in, w_out, d, h0, reset, eps):
        _match_blas_threads()
        groups, rows, width = u.shape
        batch, n = h0.shape[1:]
        real = np.float64 if u.dtype == torch.float64 else np.float32
        # The kernels hold states planar, [Re h_1..n, Im h_1..n]: contiguous loads.
        arrays = (
            _np(norm_w),
            _np(norm_b),
            _planar(_np(torch.view_as_real(lam)).reshape(groups, 2 * n), 1).reshape(groups, 2, n),
            _planar(_np(w_in), 1),
            _planar(_np(w_out), 2),
            _np(d),
            _planar(_np(torch.view_as_real(h0)).reshape(groups, batch, 2 * n), 2).astype(real),
            _np(reset),
        )
        out, normed, v = (torch.empty_like(u) for _ in range(3))
        rstd = torch.empty(groups, rows, dtype=u.dtype)
        h = torch.empty(groups, rows, 2 * n, dtype=u.dtype)
        nw, nb, lam_, w_in_, w_out_, d_, h0_, reset_ = arrays
        _forward_kernel(
            _np(u), nw, nb, eps, lam_, w_in_, w_out_, d_, h0_, reset_,
            out.numpy(), normed.numpy(), rstd.numpy(), h.numpy(), v.numpy(),
        )  # fmt: skip
        ctx.save_for_backward(normed, rstd, h, v)
        ctx.arrays, ctx.lam_dtype = arrays, lam.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, h, v = ctx.saved_tensors
        nw, nb, lam, w_in, w_out, d, h0, reset = ctx.arrays
        groups, _, n = lam.shape
        real = h0.dtype
        grad_u = torch.empty_like(grad)
        grad_norm_w, grad_norm_b, grad_d = (np.zeros(nw.shape, real) for _ in range(3))
        grad_lam = np.zeros(lam.shape, np.float64)
        grad_w_in, grad_w_out = np.zeros(w_in.shape, real), np.zeros(w_out.shape, real)
        grad_h0 = np.empty(h0.shape, real)
        _backward_kernel(
            _np(grad), normed.numpy(), rstd.numpy(), nw, nb, lam, w_in, w_out, d, h0, reset,
            h.numpy(), v.numpy(), grad_u.numpy(), grad_norm_w, grad_norm_b, grad_lam,
            grad_w_in, grad_w_out, grad_d, grad_h0,
        )  # fmt: skip
        complex_lam = _interleaved(grad_lam.reshape(groups, 2 * n), 1).view(np.complex128)
        complex_h0 = _interleaved(grad_h0, 2).view(
            np.complex128 if real == np.float64 else np.complex64
        )
        return (
            grad_u,
            torch.from_numpy(grad_norm_w),
            torch.from_numpy(grad_norm_b),
            torch.from_numpy(complex_lam).to(ctx.lam_dtype),
            torch.from_numpy(_interleaved(grad_w_in, 1)),
            torch.from_numpy(_interleaved(grad_w_out, 2)),
            torch.from_numpy(grad_d),
            torch.from_numpy(complex_h0),
            None,
            None,
        )
