"""The fused actor-critic pass (``policies.lru_fused``) against autograd and finite
differences: features, and the gradients of the inputs, the states and every parameter."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from policies.kernel_math import erf, exp
from policies.lru import LRUStack, grouped_forward
from policies.lru_fused import TILE_ROWS, fused_grouped_forward
from policies.lti import MIN_DECAY


def _stacks(dims: list[list[int]], in_dim: int, width: int, seed: int) -> list[LRUStack]:
    torch.manual_seed(seed)
    stacks = [LRUStack(in_dim, width, d).double() for d in dims]
    with torch.no_grad():  # a mode at the |λ| clamp: its ν gets no gradient there
        stacks[0].blocks[0].lru.nu_log[0] = math.log(MIN_DECAY) - 1.0
        for stack in stacks:
            for block in stack.blocks:  # LayerNorm away from its (1, 0) initialisation
                block.norm.weight.add_(0.1 * torch.randn_like(block.norm.weight))
                block.norm.bias.add_(0.1 * torch.randn_like(block.norm.bias))
    return stacks


def _inputs(stacks, batch: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, stacks[0].encoder.in_features, generator=gen, dtype=torch.float64)
    states = [torch.randn(batch, s.state_size, generator=gen, dtype=torch.float64) for s in stacks]
    reset = torch.rand(batch, steps, generator=gen) < 0.1
    reset[0, 0], reset[-1, steps // 2] = True, True  # a reset at the first step, one inside
    return x, states, reset


def _features_and_grads(stacks, x, states, reset, fused: bool):
    x = x.clone().requires_grad_()
    states = [s.clone().requires_grad_() for s in states]
    out = grouped_forward(stacks, x, states, reset, fused=fused)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    params = [p for s in stacks for p in s.parameters()]
    grads = torch.autograd.grad((out * weights).sum(), [x, *states, *params])
    return [out, *grads]


@pytest.mark.parametrize(
    "dims, batch, steps",
    [
        ([[4, 3], [2, 5]], 3, 7),
        ([[3]], 5, 64),
        ([[2, 2], [2, 2]], 2, TILE_ROWS + 9),
    ],
    ids=["padded-layers", "one-stack-tiles-and-a-rest", "sequence-longer-than-a-tile"],
)
def test_fused_pass_matches_the_autograd_path_in_float64(dims, batch, steps):
    """Features and every gradient (inputs, states, each parameter) equal to 1e-10,
    with layers of different n padded, resets, start states, several tiles, a clamped |λ|."""
    stacks = _stacks(dims, in_dim=5, width=6, seed=len(dims) + steps)
    x, states, reset = _inputs(stacks, batch, steps, seed=steps)
    fused = _features_and_grads(stacks, x, states, reset, fused=True)
    reference = _features_and_grads(stacks, x, states, reset, fused=False)
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert fused[-1].abs().sum() > 0  # the last parameter's gradient is not trivially zero


def test_fused_pass_passes_gradcheck():
    """Finite differences, independently of any hand-derived formula: the gradients of
    the inputs, the states and every parameter of two small stacks."""
    stacks = _stacks([[2, 3], [3, 1]], in_dim=3, width=4, seed=1)
    x, states, reset = _inputs(stacks, 2, 5, seed=2)
    names = [(i, name) for i, s in enumerate(stacks) for name, _ in s.named_parameters()]

    def fused(x, *leaves):
        states, values = leaves[: len(stacks)], leaves[len(stacks) :]
        stacks_of = [copy.deepcopy(s) for s in stacks]
        for (i, name), value in zip(names, values, strict=True):
            *path, attr = name.split(".")
            module = stacks_of[i].get_submodule(".".join(path))
            delattr(module, attr)  # a plain tensor in the Parameter's place
            setattr(module, attr, value)
        return fused_grouped_forward(stacks_of, x, list(states), reset)

    params = [p.detach().clone() for s in stacks for p in s.parameters()]
    leaves = [t.requires_grad_() for t in (x, *states, *params)]
    assert torch.autograd.gradcheck(fused, leaves)


def test_float32_pass_is_the_float64_pass_to_float32_precision():
    """The float32 kernels (approximate erf and exp inside GELU) stay within 1e-5 of the
    float64 pass, features and gradients, at a PPO minibatch's size (8 × 64, H = 64)."""
    stacks = _stacks([[25, 25], [25, 20]], in_dim=11, width=64, seed=3)
    x, states, reset = _inputs(stacks, 8, 64, seed=4)
    wide = _features_and_grads(stacks, x, states, reset, fused=True)
    narrow_stacks = [copy.deepcopy(s).float() for s in stacks]
    narrow = _features_and_grads(
        narrow_stacks, x.float(), [s.float() for s in states], reset, fused=True
    )
    for w, n in zip(wide, narrow, strict=True):
        assert n.dtype == torch.float32
        err = (n.double() - w).abs().max() / w.abs().max()
        assert err < 1e-5, err


def test_kernel_erf_and_exp_approximations():
    x = np.linspace(-7, 7, 20001)
    want = np.array([math.erf(v) for v in x])
    assert np.abs(erf(x.astype(np.float32)) - want).max() < 1e-6
    assert np.abs(erf(x) - want).max() == 0  # float64: math.erf itself
    y = np.linspace(-80, 0, 20001).astype(np.float32)
    want = np.exp(y.astype(np.float64))
    assert (np.abs(exp(y) - want) / want).max() < 1e-6


def test_grouped_forward_picks_the_fused_pass_on_cpu():
    """``fused=None`` is the fused pass on CPU: bit for bit ``fused=True``."""
    torch.manual_seed(0)
    stacks = [LRUStack(5, 8, [3, 4]), LRUStack(5, 8, [2, 4])]
    x = torch.randn(2, 6, 5)
    states = [torch.randn(2, s.state_size) for s in stacks]
    auto = grouped_forward(stacks, x, states)
    assert torch.equal(auto, grouped_forward(stacks, x, states, fused=True))
    assert not torch.equal(auto, grouped_forward(stacks, x, states, fused=False))
    with pytest.raises(ValueError, match="state must be"):
        grouped_forward(stacks, x, [states[1], states[0]])
    half = [s.to(torch.bfloat16) for s in stacks]  # the kernels take float32 and float64
    with pytest.raises(ValueError, match="float32 or float64"):
        grouped_forward(half, x.bfloat16(), [s.bfloat16() for s in states], fused=True)


def test_frozen_step_kernel_equals_step_in_float64():
    """The rollout's one-call step (``lru_fused.frozen_step``) is ``LRUStack.step``: in
    float64 to 1e-12 over 20 steps, with layers of different n and a clamped |λ|."""
    stack = _stacks([[6, 2]], in_dim=5, width=8, seed=5)[0]
    step = stack.frozen_step(fused=True)
    x = torch.randn(3, 5, dtype=torch.float64)
    state = want = torch.randn(3, stack.state_size, dtype=torch.float64)
    for _ in range(20):
        y, state = step(x, state)
        y_want, want = stack.step(x, want)
        torch.testing.assert_close(y, y_want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state, want, rtol=1e-12, atol=1e-12)
