"""The LRU stacks' CPU fast paths: the update's actor-critic pass and the rollout step
as compiled kernels (numba), tested equal to the autograd path (docs/design.md §5).

One block of G stacks side by side (``policies.lru.grouped_forward``), on inputs
``u`` ``[G, B·T, H]`` (B sequences of T steps)::

    z = LayerNorm(u) · w + b                      each group's affine w, b  [G, H]
    h_t = λ h_{t-1} + B̃ z_t  (h_{-1} = h0; h_{t-1} ignored where step t resets)
    v = Re(C h) + D ⊙ z
    out = u + GELU(v)

Under autograd this is ~40 recorded ops, each a pass over a ``[G, B·T, H]`` tensor that
no longer sits in cache: on the EPYC VM such a pass costs 60-150 µs against 10-15 µs
warm, and the block spent more time moving activations than multiplying.
``_forward_kernel`` walks tiles of whole sequences (``TILE_ROWS``); a tile's activations
stay in L1/L2 from the LayerNorm to the residual, and its two products are small GEMMs
(``np.dot``, BLAS). ``_backward_kernel`` is the same walk in reverse order of operations.
``FusedStacks`` strings the encoders, the parametrisation and the blocks of all stacks
into one autograd node; ``frozen_step`` is the rollout's step as one ``_step_kernel`` call.

States are planar inside the kernels, ``[Re h_1..n, Im h_1..n]`` (the flat stack state's
layout per layer), so complex products are written out. Gradients follow torch's
convention for complex tensors (grad = ∂L/∂Re + i ∂L/∂Im), with δ = ∂L/∂h and
g = ∂L/∂out:

    g_v = g ⊙ GELU'(v),  g_D = Σ g_v ⊙ z,  g_C = g_vᵀ h,  ∂L/∂h (direct) = g_v C
    δ_t = ∂L/∂h_t + conj(λ) δ_{t+1}  (no carry into a reset step t + 1)
    g_λ = Σ_t δ_t conj(h_{t-1}),  g_h0 = conj(λ) δ_0   (no term where step t resets)
    g_B̃ = δᵀ z,  g_z = g_v ⊙ D + δ B̃,  g_w = Σ g_z ⊙ ẑ,  g_b = Σ g_z
    g_u = g + LayerNorm'(g_z ⊙ w)

GELU is the exact erf form; in float32 erf is Eigen's rational approximation and exp
Cephes' (both < 1e-6 off, vectorisable), in float64 ``math.erf`` and ``math.exp``
(``policies.kernel_math``).
Tested in ``tests/test_lru_fused.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numba
import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from policies.fused_parametrisation import layer_weights, parameter_grads
from policies.kernel_math import erf_scalar, exp_scalar

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# Rows per tile: whole sequences, ~256 rows. One BLAS thread runs [R, 64] @ [64, 50] at
# 38 / 47 / 51 GFLOP/s for R = 64 / 256 / 512 here (a one-sequence tile wastes a fifth);
# the kernels' time with 128-, 256- and 512-row tiles was within this VM's noise.
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
                    out[g, r, k] = u[g, r, k] + half * x * (1 + erf_scalar(x * sqrt_half))


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
    grad_w_out ``[G, H, 2n]`` (zeroed by the caller). Per tile: the output's gradient
    (``_output_grads``), the reverse scan (``_reverse_scan``), the LayerNorm's
    (``_layer_norm_grads``)."""
    groups, rows, width = grad.shape
    batch, steps = reset.shape
    dtype = grad.dtype
    per_tile = max(1, TILE_ROWS // steps)
    for g in range(groups):
        for first in range(0, batch, per_tile):
            last = min(batch, first + per_tile)
            r0, r1 = first * steps, last * steps
            z = np.empty((r1 - r0, width), dtype)
            grad_v = np.empty((r1 - r0, width), dtype)
            _output_grads(grad, normed, norm_w, norm_b, v, d, g, r0, r1, z, grad_v, grad_d)
            hs = h[g, r0:r1]
            grad_w_out[g] += np.dot(grad_v.T, hs)
            delta = np.dot(grad_v, w_out[g])  # ∂L/∂h from the output, then the reverse scan
            _reverse_scan(delta, hs, h0, reset, lam, g, first, last, grad_lam, grad_h0)
            grad_w_in[g] += np.dot(delta.T, z)
            grad_z = np.dot(delta, w_in[g])
            _layer_norm_grads(
                grad, grad_z, grad_v, normed, rstd, norm_w, d, g, r0, r1,
                grad_norm_w, grad_norm_b, grad_u,
            )  # fmt: skip


# The backward kernel's parts, inlined into it at numba's IR level (inline="always"): it
# compiles as one function, as before the split, with bit-for-bit the same results. As
# separate calls the numbers matched when compiled in the process, but a kernel loaded
# from numba's cache rounded differently (the speed is the same either way).
@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy", inline="always")
def _output_grads(  # pragma: no cover - compiled
    grad, normed, norm_w, norm_b, v, d, g, r0, r1, z, grad_v, grad_d
):
    """Rows r0..r1 of group g (``_backward_kernel``): z = ẑ · w + b again, g_v = g ⊙ GELU'(v)
    into ``z`` and ``grad_v`` (tile rows), and g_D added into ``grad_d``."""
    width = grad.shape[2]
    dtype = grad.dtype
    half, sqrt_half = dtype.type(0.5), dtype.type(_SQRT_HALF)
    inv_sqrt_2pi = dtype.type(_INV_SQRT_2PI)
    for r in range(r0, r1):
        for k in range(width):
            z[r - r0, k] = normed[g, r, k] * norm_w[g, k] + norm_b[g, k]
            x = v[g, r, k]
            slope = half * (1 + erf_scalar(x * sqrt_half)) + x * inv_sqrt_2pi * exp_scalar(
                -half * x * x
            )
            grad_v[r - r0, k] = grad[g, r, k] * slope
            grad_d[g, k] += grad_v[r - r0, k] * z[r - r0, k]


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy", inline="always")
def _reverse_scan(  # pragma: no cover - compiled
    delta, hs, h0, reset, lam, g, first, last, grad_lam, grad_h0
):
    """The tile's sequences first..last of group g, in reverse (``_backward_kernel``):
    δ_t = ∂L/∂h_t + conj(λ) δ_{t+1} in place in ``delta`` (tile rows; no carry into a
    reset step), g_λ = Σ_t δ_t conj(h_{t-1}) added into ``grad_lam``, and
    g_h0 = conj(λ) δ_0 written into ``grad_h0`` (0 where step 0 resets)."""
    steps = reset.shape[1]
    n = lam.shape[2]
    lam_re, lam_im = lam[g, 0], lam[g, 1]
    acc_re, acc_im = grad_lam[g, 0], grad_lam[g, 1]
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


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy", inline="always")
def _layer_norm_grads(  # pragma: no cover - compiled
    grad, grad_z, grad_v, normed, rstd, norm_w, d, g, r0, r1, grad_norm_w, grad_norm_b, grad_u
):
    """Rows r0..r1 of group g (``_backward_kernel``): g_z = g_v ⊙ D + δ B̃ (``grad_z``
    holds δ B̃, tile rows; overwritten), g_w and g_b added into ``grad_norm_w`` and
    ``grad_norm_b``, and g_u = g + LayerNorm'(g_z ⊙ w) written into ``grad_u``."""
    width = grad.shape[2]
    dtype = grad.dtype
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


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _step_kernel(  # pragma: no cover - compiled
    x, state, enc_w, enc_b, norm_w, norm_b, eps, lam, w_in, w_out, d, sizes, features, new_state
):
    """One step of a stack for a batch. x ``[B, in]``; state, new_state ``[B, S]`` (the
    flat layout: per layer ``[Re h (n_l), Im h (n_l)]``); enc_w ``[H, in]``, enc_b ``[H]``;
    per layer l, padded to N states as ``layer_weights`` makes them: norm_w, norm_b, d
    ``[L, H]``, lam ``[L, 2, N]``, w_in ``[L, 2N, H]``, w_out ``[L, H, 2N]``; sizes
    ``[L]`` the true n_l. Writes features ``[B, H]`` and new_state."""
    batch, width = x.shape[0], enc_b.shape[0]
    dtype = x.dtype
    half, sqrt_half = dtype.type(0.5), dtype.type(_SQRT_HALF)
    padded = lam.shape[2]
    u = np.dot(x, enc_w.T)
    for b in range(batch):
        for k in range(width):
            u[b, k] += enc_b[k]
    z = np.empty((batch, width), dtype)
    offset = 0
    for layer in range(sizes.shape[0]):
        n = sizes[layer]
        for b in range(batch):
            mean = 0.0
            for k in range(width):
                mean += u[b, k]
            mean /= width
            var = 0.0
            for k in range(width):
                var += (u[b, k] - mean) * (u[b, k] - mean)
            inv = 1.0 / math.sqrt(var / width + eps)
            for k in range(width):
                x_k = dtype.type((u[b, k] - mean) * inv)
                z[b, k] = x_k * norm_w[layer, k] + norm_b[layer, k]
        h = np.dot(z, w_in[layer].T)  # B̃ z, [B, 2N]; the padded states stay 0
        for b in range(batch):
            for j in range(n):
                re, im = state[b, offset + j], state[b, offset + n + j]
                h[b, j] += lam[layer, 0, j] * re - lam[layer, 1, j] * im
                h[b, padded + j] += lam[layer, 0, j] * im + lam[layer, 1, j] * re
                new_state[b, offset + j] = h[b, j]
                new_state[b, offset + n + j] = h[b, padded + j]
        y = np.dot(h, w_out[layer].T)
        for b in range(batch):
            for k in range(width):
                v = y[b, k] + d[layer, k] * z[b, k]
                u[b, k] += half * v * (1 + erf_scalar(v * sqrt_half))
        offset += 2 * n
    features[:] = u


def frozen_step(stack) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``LRUStack.frozen_step`` on CPU: the stack's weights read once (copied) into the
    kernels' planar arrays, each step one ``_step_kernel`` call (~25 torch ops before)."""
    _match_blas_threads()
    blocks = [[_np(t).copy() for t in _block_parameters(block)] for block in stack.blocks]
    sizes = np.array(stack.state_dims, np.int64)
    real = blocks[0][0].dtype.type
    weights = layer_weights(blocks, list(sizes), real)
    enc_w, enc_b = _np(stack.encoder.weight).copy(), _np(stack.encoder.bias).copy()
    eps = stack.blocks[0].norm.eps
    norm_w, norm_b, lam, w_in, w_out, d = (
        weights[k] for k in ("norm_w", "norm_b", "lam", "w_in", "w_out", "d")
    )

    def step(x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        stack.check_state(state)
        features = torch.empty(x.shape[0], enc_b.shape[0], dtype=x.dtype)
        new_state = torch.empty_like(state)
        _step_kernel(
            _np(x), _np(state), enc_w, enc_b, norm_w, norm_b, eps, lam, w_in, w_out, d,
            sizes, features.numpy(), new_state.numpy(),
        )  # fmt: skip
        return features, new_state

    return step


def _np(t: Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor (copied only if not contiguous)."""
    t = t.detach()
    return (t if t.is_contiguous() else t.contiguous()).numpy()


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


# A block's parameters in the order ``FusedStacks`` takes them (per stack, per layer).
BLOCK_PARAMETERS = ("weight", "bias", "nu_log", "theta", "B_re", "B_im", "C_re", "C_im", "D")


def _block_parameters(block) -> list[Tensor]:
    """``BLOCK_PARAMETERS`` of one ``LRUBlock``: its LayerNorm's affine, then its LRU's."""
    norm, lru = block.norm, block.lru
    return [norm.weight, norm.bias] + [getattr(lru, name) for name in BLOCK_PARAMETERS[2:]]


def usable(stacks, x: Tensor | None = None) -> bool:
    """Whether the kernels can run these stacks (on ``x``): CPU, float32 or float64. What
    ``grouped_forward`` and ``LRUStack.frozen_step`` pick with ``fused=None``."""
    weight = stacks[0].encoder.weight
    on_cpu = weight.device.type == "cpu" and (x is None or x.device.type == "cpu")
    return on_cpu and weight.dtype in (torch.float32, torch.float64)


def fused_grouped_forward(stacks, x: Tensor, states: list[Tensor], reset: Tensor | None) -> Tensor:
    """``policies.lru.grouped_forward`` as one autograd node (CPU): same arguments, same
    features ``[G, B, T, H]``; see ``FusedStacks``."""
    if not usable(stacks, x):
        raise ValueError("the fused pass runs float32 or float64 stacks on CPU tensors")
    batch, steps, _ = x.shape
    if reset is None:
        reset = torch.zeros(batch, steps, dtype=torch.bool)
    layout = ([s.state_dims for s in stacks], stacks[0].blocks[0].norm.eps)
    tensors = list(states)
    for stack in stacks:
        tensors += [stack.encoder.weight, stack.encoder.bias]
        for block in stack.blocks:
            tensors += _block_parameters(block)
    return FusedStacks.apply(x, reset, layout, *tensors)


class FusedStacks(torch.autograd.Function):
    """The sequence-mode features of G LRU stacks of equal depth and width (an actor and
    its critic) over the same inputs, as one autograd node.

    Everything between the observations and the features runs in numpy and the compiled
    kernels: each stack's encoder, the parametrisation of every layer (λ, γ, B̃, C from
    ν, θ, B, C; ``policies.lru``'s forward map, in float64, stored in the parameters'
    dtype), the layers
    padded to a common n with exact zeros, and the blocks (``_forward_kernel``). The
    backward runs the same chain in reverse (``_backward_kernel``, then the
    parametrisation's derivatives below) and returns each parameter's gradient; autograd
    sees one node instead of ~40 per layer, whose bookkeeping cost more than the maths.

    With g_λ = ∂L/∂Re λ + i ∂L/∂Im λ from the kernel, d = max(e^ν, MIN_DECAY), λ = e^{-d+iθ},
    γ = sqrt(1 - e^{-2d}), B̃ = γ B, and C's columns stored as (Re C, -Im C)::

        g_θ = Re(conj(g_λ) iλ),   g_γ = Σ_H Re(conj(g_B̃) B),   g_B = γ g_B̃
        g_d = -Re(conj(g_λ) λ) + g_γ e^{-2d} / γ,   g_ν = g_d e^ν where e^ν ≥ MIN_DECAY

    Args (to ``apply``):
        x: inputs ``[B, T, in_dim]``; reset: bool ``[B, T]``;
        layout: ``(state_dims per stack, LayerNorm eps)``;
        tensors: the G flat states ``[B, S_g]``, then per stack its encoder's weight and
            bias and per layer ``BLOCK_PARAMETERS`` (``fused_grouped_forward`` lists them).
    """

    @staticmethod
    def forward(ctx, x, reset, layout, *tensors):
        _match_blas_threads()
        dims, eps = layout
        groups, depth = len(dims), len(dims[0])
        states, params = tensors[:groups], tensors[groups:]
        per_stack = 2 + depth * len(BLOCK_PARAMETERS)
        arrays = [
            [_np(t) for t in params[g * per_stack : (g + 1) * per_stack]] for g in range(groups)
        ]
        batch, steps, in_dim = x.shape
        rows = batch * steps
        real = arrays[0][0].dtype
        inputs = _np(x).reshape(rows, in_dim).astype(real, copy=False)
        width = arrays[0][0].shape[0]
        u = np.empty((groups, rows, width), real)
        for g in range(groups):
            np.dot(inputs, arrays[g][0].T, out=u[g])
            u[g] += arrays[g][1]
        flat_states = [_np(state).astype(real, copy=False) for state in states]
        offsets = np.zeros(groups, np.int64)
        layers = []
        reset_np = _np(reset)
        for layer in range(depth):
            blocks = [
                a[2 + layer * len(BLOCK_PARAMETERS) : 2 + (layer + 1) * len(BLOCK_PARAMETERS)]
                for a in arrays
            ]
            sizes = [d[layer] for d in dims]
            weights = layer_weights(blocks, sizes, real)
            n = weights["lam"].shape[2]
            h0 = np.zeros((groups, batch, 2 * n), real)
            for g, size in enumerate(sizes):
                start = offsets[g]
                h0[g, :, :size] = flat_states[g][:, start : start + size]
                h0[g, :, n : n + size] = flat_states[g][:, start + size : start + 2 * size]
                offsets[g] += 2 * size
            out, normed, v = (np.empty_like(u) for _ in range(3))
            rstd, h = np.empty((groups, rows), real), np.empty((groups, rows, 2 * n), real)
            _forward_kernel(
                u, weights["norm_w"], weights["norm_b"], eps, weights["lam"], weights["w_in"],
                weights["w_out"], weights["d"], h0, reset_np, out, normed, rstd, h, v,
            )  # fmt: skip
            layers.append((blocks, sizes, weights, h0, normed, rstd, h, v))
            u = out
        ctx.saved = (inputs, arrays, layers, reset_np, [s.dtype for s in states])
        ctx.x_dtype = x.dtype
        return torch.from_numpy(u).view(groups, batch, steps, width)

    @staticmethod
    def backward(ctx, grad):
        inputs, arrays, layers, reset, state_dtypes = ctx.saved
        groups, batch, steps, width = grad.shape
        real = inputs.dtype
        grad_u = _np(grad).reshape(groups, batch * steps, width).astype(real, copy=False)
        param_grads = [[None] * len(a) for a in arrays]
        state_grads = [[] for _ in range(groups)]
        for layer in range(len(layers) - 1, -1, -1):
            blocks, sizes, weights, h0, normed, rstd, h, v = layers[layer]
            n = weights["lam"].shape[2]
            grad_in = np.empty_like(grad_u)
            g_norm_w, g_norm_b, g_d = (np.zeros((groups, width), real) for _ in range(3))
            g_lam = np.zeros((groups, 2, n), np.float64)
            g_w_in = np.zeros((groups, 2 * n, width), real)
            g_w_out = np.zeros((groups, width, 2 * n), real)
            g_h0 = np.empty_like(h0)
            _backward_kernel(
                grad_u, normed, rstd, weights["norm_w"], weights["norm_b"], weights["lam"],
                weights["w_in"], weights["w_out"], weights["d"], h0, reset, h, v,
                grad_in, g_norm_w, g_norm_b, g_lam, g_w_in, g_w_out, g_d, g_h0,
            )  # fmt: skip
            first = 2 + layer * len(BLOCK_PARAMETERS)
            for g, size in enumerate(sizes):
                grads = parameter_grads(
                    blocks[g], weights, g, size, g_norm_w, g_norm_b, g_lam, g_w_in, g_w_out, g_d
                )
                param_grads[g][first : first + len(BLOCK_PARAMETERS)] = grads
                state_grads[g].insert(
                    0, np.concatenate([g_h0[g, :, :size], g_h0[g, :, n : n + size]], axis=1)
                )
            grad_u = grad_in
        grad_x = np.zeros_like(inputs) if ctx.needs_input_grad[0] else None
        for g in range(groups):
            param_grads[g][0] = grad_u[g].T @ inputs
            param_grads[g][1] = grad_u[g].sum(0)
            if grad_x is not None:
                grad_x += grad_u[g] @ arrays[g][0]
        to_torch = torch.from_numpy
        return (
            None if grad_x is None else to_torch(grad_x).view(batch, steps, -1).to(ctx.x_dtype),
            None,
            None,
            *[
                to_torch(np.concatenate(parts, axis=1)).to(dtype)
                if ctx.needs_input_grad[3 + g]
                else None
                for g, (parts, dtype) in enumerate(zip(state_grads, state_dtypes, strict=True))
            ],
            *[to_torch(np.ascontiguousarray(t)) for grads in param_grads for t in grads],
        )
