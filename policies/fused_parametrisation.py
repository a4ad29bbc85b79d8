"""The LRU layers' parametrisation for the fused kernels (``policies.lru_fused``), forward
and backward, as compiled kernels.

``layer_weights``: one layer of each of G stacks from its trainable parameters (ν, θ, B, C)
to the kernels' planar arrays (λ, B̃ = γB, C as (Re C, -Im C)), padded to a common n with
exact zeros; ``policies.lru``'s forward map (d = max(e^ν, MIN_DECAY), λ = e^{-d+iθ},
γ = sqrt(1 - e^{-2d})) in float64, stored in the parameters' dtype. ``parameter_grads``:
the chain rule back from the kernels' gradients of those arrays to the parameters'
(the formulas: ``policies.lru_fused.FusedStacks``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from policies.lti import MIN_DECAY


def layer_weights(blocks: list[list[np.ndarray]], sizes: list[int], real) -> dict:
    """One layer of every stack as the kernels' planar arrays, padded to n = max size with
    exact zeros (λ = 0, B̃ = 0, C = 0: a padded state stays 0 and adds nothing)."""
    groups, n = len(blocks), max(sizes)
    width = blocks[0][0].shape[0]
    out = {
        "norm_w": np.stack([b[0] for b in blocks]),
        "norm_b": np.stack([b[1] for b in blocks]),
        "d": np.stack([b[8] for b in blocks]),
        "lam": np.zeros((groups, 2, n), real),
        "w_in": np.zeros((groups, 2 * n, width), real),
        "w_out": np.zeros((groups, width, 2 * n), real),
        "gamma": np.zeros((groups, n), real),
        "radius": np.zeros((groups, n), real),
        "exp_nu": np.zeros((groups, n), real),
    }
    for g, (block, m) in enumerate(zip(blocks, sizes, strict=True)):
        if block[4].shape[0] != m:  # the kernel writes m rows unchecked
            raise ValueError(f"layer of stack {g} has {block[4].shape[0]} states, not {m}")
        _parametrise_kernel(
            *block[2:8], MIN_DECAY, out["lam"][g], out["w_in"][g], out["w_out"][g],
            out["gamma"][g], out["radius"][g], out["exp_nu"][g],
        )  # fmt: skip
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _parametrise_kernel(  # pragma: no cover - compiled
    nu_log, theta, b_re, b_im, c_re, c_im, min_decay, lam, w_in, w_out, gamma, radius, exp_nu
):
    """One layer's m states into one group's padded planar arrays: λ ``[2, N]``, B̃ = γB
    ``[2N, H]``, C as (Re C, -Im C) ``[H, 2N]``, and γ, |λ|, e^ν ``[N]`` for the backward.
    ``policies.lru``'s forward map (d = max(e^ν, MIN_DECAY), λ = e^{-d+iθ},
    γ = sqrt(-expm1(-2d))), computed in float64 and stored in the arrays' dtype: one
    call instead of ~15 numpy calls (~60 µs a layer at n = 25)."""
    m, width = b_re.shape
    n = lam.shape[1]
    for j in range(m):
        e = math.exp(np.float64(nu_log[j]))
        decay = max(e, min_decay)
        r = math.exp(-decay)
        g = math.sqrt(-math.expm1(-2.0 * decay))
        lam[0, j] = r * math.cos(np.float64(theta[j]))
        lam[1, j] = r * math.sin(np.float64(theta[j]))
        gamma[j], radius[j], exp_nu[j] = g, r, e
        for k in range(width):
            w_in[j, k] = g * b_re[j, k]
            w_in[n + j, k] = g * b_im[j, k]
    for k in range(width):
        for j in range(m):
            w_out[k, j] = c_re[k, j]
            w_out[k, n + j] = -c_im[k, j]


def parameter_grads(block, weights, g, m, g_norm_w, g_norm_b, g_lam, g_w_in, g_w_out, g_d):
    """One stack's layer gradients, in ``BLOCK_PARAMETERS`` order, from the kernel's
    gradients of the planar arrays (the chain rule in ``FusedStacks``' docstring)."""
    real = g_w_in.dtype
    b_re, b_im = block[4], block[5]
    width = b_re.shape[1]
    g_nu, g_theta = np.empty(m, real), np.empty(m, real)
    g_b_re, g_b_im = np.empty((m, width), real), np.empty((m, width), real)
    g_c_re, g_c_im = np.empty((width, m), real), np.empty((width, m), real)
    _parametrisation_grads_kernel(
        b_re, b_im, weights["gamma"][g], weights["radius"][g], weights["exp_nu"][g],
        weights["lam"][g], g_lam[g], g_w_in[g], g_w_out[g], MIN_DECAY,
        g_nu, g_theta, g_b_re, g_b_im, g_c_re, g_c_im,
    )  # fmt: skip
    return [g_norm_w[g], g_norm_b[g], g_nu, g_theta, g_b_re, g_b_im, g_c_re, g_c_im, g_d[g]]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _parametrisation_grads_kernel(  # pragma: no cover - compiled
    b_re, b_im, gamma, radius, exp_nu, lam, g_lam, g_w_in, g_w_out, min_decay,
    g_nu, g_theta, g_b_re, g_b_im, g_c_re, g_c_im,
):  # fmt: skip
    """The parametrisation's chain rule (``FusedStacks``' docstring) for one group's m
    states, in float64, written into the gradient arrays."""
    m, width = b_re.shape
    n = lam.shape[1]
    for j in range(m):
        g_gamma = 0.0
        for k in range(width):
            g_gamma += g_w_in[j, k] * np.float64(b_re[j, k]) + g_w_in[n + j, k] * np.float64(
                b_im[j, k]
            )
            g_b_re[j, k] = gamma[j] * g_w_in[j, k]
            g_b_im[j, k] = gamma[j] * g_w_in[n + j, k]
        gl_re, gl_im = g_lam[0, j], g_lam[1, j]
        lam_re, lam_im = np.float64(lam[0, j]), np.float64(lam[1, j])
        g_theta[j] = gl_im * lam_re - gl_re * lam_im
        r = np.float64(radius[j])
        g_decay = -(gl_re * lam_re + gl_im * lam_im) + g_gamma * r * r / gamma[j]
        g_nu[j] = g_decay * exp_nu[j] if exp_nu[j] >= min_decay else 0.0
    for k in range(width):
        for j in range(m):
            g_c_re[k, j] = g_w_out[k, j]
            g_c_im[k, j] = -g_w_out[k, n + j]
