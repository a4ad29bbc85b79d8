"""The fused LRU block (``policies.lru_fused``) against autograd and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from policies.lru import LRUStack, grouped_forward
from policies.lru_fused import TILE_ROWS, FusedLRUBlock, erf, exp


def _block_inputs(groups: int, batch: int, steps: int, width: int, n: int, seed: int):
    """Random float64 inputs of one grouped block, |λ| < 1, resets at t = 0 and inside."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    lam = torch.polar(
        0.3 + 0.65 * torch.rand(groups, n, generator=gen, dtype=torch.float64),
        math.pi * torch.rand(groups, n, generator=gen, dtype=torch.float64),
    )
    reset = torch.rand(batch, steps, generator=gen) < 0.1
    reset[0, 0], reset[-1, steps // 2] = True, True
    return (
        randn(groups, batch * steps, width),
        1 + 0.1 * randn(groups, width),
        0.1 * randn(groups, width),
        lam,
        randn(groups, 2 * n, width) / math.sqrt(width),
        randn(groups, width, 2 * n) / math.sqrt(n),
        randn(groups, width),
        randn(groups, batch, n, dtype=torch.complex128),
        reset,
    )


def _reference(u, norm_w, norm_b, lam, w_in, w_out, d, h0, reset, eps=1e-5):
    """The block in plain autograd ops with a Python loop over time (no scan kernel)."""
    groups, rows, width = u.shape
    batch, n = h0.shape[1:]
    steps = rows // batch
    z = torch.nn.functional.layer_norm(u, (width,), eps=eps) * norm_w[:, None] + norm_b[:, None]
    bu = torch.view_as_complex((z @ w_in.transpose(1, 2)).view(groups, batch, steps, n, 2))
    h, states = h0, []
    for t in range(steps):
        h = torch.where(reset[None, :, t, None], 0, lam[:, None] * h) + bu[:, :, t]
        states.append(h)
    h_real = torch.view_as_real(torch.stack(states, dim=2)).reshape(groups, rows, 2 * n)
    v = h_real @ w_out.transpose(1, 2) + d[:, None] * z
    return u + torch.nn.functional.gelu(v)


@pytest.mark.parametrize(
    "groups, batch, steps, n",
    [(2, 3, 7, 4), (1, 5, 64, 3), (2, 2, TILE_ROWS + 9, 2)],
    ids=["small", "tiles-of-4-sequences-and-a-rest", "sequence-longer-than-a-tile"],
)
def test_fused_block_matches_autograd_reference_in_float64(groups, batch, steps, n):
    """Output and every gradient (u, LayerNorm affine, λ, B̃, C, D, h0) equal to 1e-10."""
    inputs = _block_inputs(groups, batch, steps, 6, n, seed=groups + steps)
    leaves = [x.clone().requires_grad_(x.dtype != torch.bool) for x in inputs]
    out = FusedLRUBlock.apply(*leaves, 1e-5)
    want = _reference(*[x.detach().clone().requires_grad_(x.dtype != torch.bool) for x in inputs])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)

    weights = torch.randn_like(out)
    ref_leaves = [x.detach().clone().requires_grad_(x.dtype != torch.bool) for x in inputs]
    ref_out = _reference(*ref_leaves)
    got = torch.autograd.grad((out * weights).sum(), leaves[:-1])
    expected = torch.autograd.grad((ref_out * weights).sum(), ref_leaves[:-1])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_fused_block_passes_gradcheck():
    """Finite differences, independently of any hand-derived formula."""
    inputs = _block_inputs(2, 2, 5, 3, 2, seed=7)
    leaves = [x.requires_grad_(x.dtype != torch.bool) for x in inputs]
    assert torch.autograd.gradcheck(lambda *xs: FusedLRUBlock.apply(*xs, 1e-5), leaves)


def test_float32_block_is_the_float64_block_to_float32_precision():
    """The float32 kernels (approximate erf and exp inside GELU) stay within 1e-5 of the
    float64 block, output and gradients, at a PPO minibatch's size."""
    inputs = _block_inputs(2, 8, 64, 64, 25, seed=3)
    results = []
    for dtype in (torch.float64, torch.float32):
        cast = [
            x.to(torch.complex64 if x.is_complex() else dtype)
            if dtype == torch.float32 and x.dtype != torch.bool
            else x
            for x in inputs
        ]
        leaves = [x.clone().requires_grad_(x.dtype != torch.bool) for x in cast]
        out = FusedLRUBlock.apply(*leaves, 1e-5)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        grads = torch.autograd.grad((out * weights).sum(), leaves[:-1])
        results.append([out, *grads])
    for wide, narrow in zip(*results, strict=True):
        scale = wide.abs().max()
        err = (narrow.to(wide.dtype) - wide).abs().max() / scale
        assert err < 1e-5, err


def test_kernel_erf_and_exp_approximations():
    x = np.linspace(-7, 7, 20001)
    want = np.array([math.erf(v) for v in x])
    assert np.abs(erf(x.astype(np.float32)) - want).max() < 1e-6
    assert np.abs(erf(x) - want).max() == 0  # float64: math.erf itself
    y = np.linspace(-80, 0, 20001).astype(np.float32)
    want = np.exp(y.astype(np.float64))
    assert (np.abs(exp(y) - want) / want).max() < 1e-6


def test_grouped_forward_picks_the_fused_blocks_on_cpu():
    """``fused=None`` is the fused path on CPU: same numbers as ``fused=True`` bit for bit."""
    torch.manual_seed(0)
    stacks = [LRUStack(5, 8, [3, 4]), LRUStack(5, 8, [2, 4])]
    x = torch.randn(2, 6, 5)
    states = [torch.randn(2, s.state_size) for s in stacks]
    auto = grouped_forward(stacks, x, states)
    assert torch.equal(auto, grouped_forward(stacks, x, states, fused=True))
    assert not torch.equal(auto, grouped_forward(stacks, x, states, fused=False))
