"""The parallel and numba scans equal the sequential reference, forward and backward."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.scan import linear_scan


def _inputs(batch, steps, width, dtype, full_a, with_h0, reset_p, seed):
    gen = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    shape = (batch, steps, width) if full_a else (width,)

    def rand(*s):
        x = torch.randn(*s, generator=gen, dtype=real)
        if dtype.is_complex:
            x = torch.complex(x, torch.randn(*s, generator=gen, dtype=real))
        return x

    a = rand(*shape)
    a = a / a.abs().clamp(min=1.0) * 0.95  # stable but not tiny
    b = rand(batch, steps, width)
    h0 = rand(batch, width) if with_h0 else None
    reset = torch.rand(batch, steps, generator=gen) < reset_p
    return a, b, h0, reset


def _grads(a, b, h0, reset, backend):
    leaves = [x.clone().requires_grad_(True) for x in (a, b, h0) if x is not None]
    a_, b_ = leaves[0], leaves[1]
    h0_ = leaves[2] if h0 is not None else None
    h = linear_scan(a_, b_, h0_, reset, backend=backend)
    weight = torch.linspace(-1, 1, h.numel()).reshape(h.shape).to(h.dtype)
    loss = (h * weight).real.sum() if h.is_complex() else (h * weight).sum()
    loss.backward()
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]
    return h.detach(), grads


@pytest.mark.parametrize("backend", ["parallel", "numba"])
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 70),
    width=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.complex64]),
    full_a=st.booleans(),
    with_h0=st.booleans(),
    reset_p=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_backend_matches_sequential(
    backend, batch, steps, width, dtype, full_a, with_h0, reset_p, seed
):
    a, b, h0, reset = _inputs(batch, steps, width, dtype, full_a, with_h0, reset_p, seed)
    h_seq, g_seq = _grads(a, b, h0, reset, "sequential")
    h_par, g_par = _grads(a, b, h0, reset, backend)
    torch.testing.assert_close(h_par, h_seq, rtol=1e-4, atol=1e-5)
    for gp, gs in zip(g_par, g_seq, strict=True):
        torch.testing.assert_close(gp, gs, rtol=1e-4, atol=1e-4)


def test_sequential_is_the_recurrence_with_resets():
    """Hand-rolled check of the contract itself, including reset at t=0 and back-to-back resets."""
    a = torch.tensor([0.5])
    b = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]])
    h0 = torch.tensor([[10.0]])
    reset = torch.tensor([[True, False, True, True, False]])
    h = linear_scan(a, b, h0, reset, backend="sequential")
    # t0 reset -> h0 ignored: 1; t1: .5*1+2=2.5; t2, t3 reset: 3, 4; t4: .5*4+5=7
    assert h.flatten().tolist() == [1.0, 2.5, 3.0, 4.0, 7.0]
    h_no_reset = linear_scan(a, b, h0, None, backend="parallel")
    assert h_no_reset[0, 0, 0].item() == pytest.approx(6.0)  # 0.5*10 + 1


@pytest.mark.parametrize("backend", ["sequential", "parallel", "numba"])
def test_float64_complex_long_sequence(backend):
    a, b, h0, reset = _inputs(2, 1024, 8, torch.complex128, True, True, 0.01, 3)
    ref = linear_scan(a, b, h0, reset, backend="sequential")
    torch.testing.assert_close(linear_scan(a, b, h0, reset, backend=backend), ref)


def test_numba_forward_is_the_reference_bit_for_bit():
    """Same additions in the same order as the sequential loop: not merely close."""
    a, b, h0, reset = _inputs(3, 50, 16, torch.complex64, False, True, 0.1, 7)
    ref = linear_scan(a, b, h0, reset, backend="sequential")
    assert torch.equal(linear_scan(a, b, h0, reset, backend="numba"), ref)
    assert torch.equal(linear_scan(a, b, h0, reset), ref)  # "auto" on CPU is numba


def test_numba_gradient_of_a_broadcast_over_states():
    """a ``[B, T, 1]`` (one decay shared by all states) gets its gradient summed back."""
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 9, 1, dtype=torch.float64, generator=gen) * 0.9
    b = torch.randn(2, 9, 4, dtype=torch.float64, generator=gen)
    reset = torch.rand(2, 9, generator=gen) < 0.2
    for backend in ("sequential", "numba"):
        a_ = a.clone().requires_grad_(True)
        linear_scan(a_, b, None, reset, backend=backend).square().sum().backward()
        if backend == "sequential":
            expected = a_.grad
    torch.testing.assert_close(a_.grad, expected)


def test_bad_shapes_are_named():
    b = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="reset must be"):
        linear_scan(torch.zeros(3), b, reset=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="h0 must be"):
        linear_scan(torch.zeros(3), b, h0=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        linear_scan(torch.zeros(4), b)
    with pytest.raises(ValueError, match="unknown scan backend"):
        linear_scan(torch.zeros(3), b, backend="cuda-magic")
