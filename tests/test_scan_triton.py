"""The triton scan equals the sequential reference, forward and backward.

Runs on a GPU, or on CPU tensors under ``TRITON_INTERPRET=1`` (``tests/conftest.py`` sets it
when there is no GPU, so a bare ``pytest`` runs these tests too); the interpreter is slow, so shapes are small and ``BLOCK_T`` is shrunk to cross chunk borders.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from policies import scan_triton  # noqa: E402
from policies.scan import linear_scan  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip(
        "TRITON_INTERPRET is set to something else than 1 and there is no GPU",
        allow_module_level=True,
    )
DEVICE = "cuda" if ON_GPU else "cpu"


def _inputs(batch, steps, width, dtype, a_shape, with_h0, seed=0):
    """Random stable ``a`` of shape ``a_shape``, ``b`` ``[B, T, N]``, optional ``h0``, resets.

    Resets always include t=0 of row 0 and two consecutive steps of the last row.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        x = torch.randn(*shape, generator=gen)
        if dtype.is_complex:
            x = torch.complex(x, torch.randn(*shape, generator=gen))
        return x

    a = rand(*a_shape)
    a = a / a.abs().clamp(min=1.0) * 0.95  # |a| < 1, not tiny
    b = rand(batch, steps, width)
    h0 = rand(batch, width) if with_h0 else None
    reset = torch.rand(batch, steps, generator=gen) < 0.15
    reset[0, 0] = True
    reset[-1, 3:5] = True
    return a, b, h0, reset


def _run(a, b, h0, reset, backend):
    """Forward and gradients of a weighted loss w.r.t. (a, b[, h0]), all on DEVICE."""
    leaves = [x.to(DEVICE).requires_grad_(True) for x in (a, b, h0) if x is not None]
    h0_ = leaves[2] if h0 is not None else None
    reset_ = reset.to(DEVICE) if reset is not None else None
    h = linear_scan(leaves[0], leaves[1], h0_, reset_, backend=backend)
    weight = torch.linspace(-1, 1, h.numel(), device=DEVICE).reshape(h.shape).to(h.dtype)
    loss = (h * weight).real.sum() if h.is_complex() else (h * weight).sum()
    loss.backward()
    return [h.detach()] + [x.grad for x in leaves]


def _assert_matches(a, b, h0, reset):
    ref = _run(a, b, h0, reset, "sequential")
    out = _run(a, b, h0, reset, "triton")
    assert out[0].dtype == ref[0].dtype
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(out[1:], ref[1:], strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture
def small_blocks(monkeypatch):
    """Chunks of 8 steps and 4 channels: T=37 spans 5 chunks, N=5 two channel blocks."""
    monkeypatch.setattr(scan_triton, "BLOCK_T", 8)
    monkeypatch.setattr(scan_triton, "BLOCK_N", 4)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float32])
@pytest.mark.parametrize("a_kind", ["lti", "full"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_sequential(small_blocks, dtype, a_kind, with_h0):
    batch, steps, width = 3, 37, 5
    a_shape = (width,) if a_kind == "lti" else (batch, steps, width)
    _assert_matches(*_inputs(batch, steps, width, dtype, a_shape, with_h0))


@pytest.mark.parametrize("a_shape", [(3, 1, 5), (1, 37, 5), (1, 1, 1)])
def test_other_broadcasts(small_blocks, a_shape):
    """a constant in time per row, shared across rows, or one scalar: grads sum back."""
    _assert_matches(*_inputs(3, 37, 5, torch.complex64, a_shape, True, seed=1))


@pytest.mark.parametrize("reset", ["none", "all"])
def test_no_resets_and_all_resets(small_blocks, reset):
    a, b, h0, _ = _inputs(2, 20, 5, torch.complex64, (5,), True, seed=2)
    flags = None if reset == "none" else torch.ones(2, 20, dtype=torch.bool)
    _assert_matches(a, b, h0, flags)


def test_default_blocks_long_sequence():
    """Default tile sizes; T=150 is more than two chunks and not a multiple of BLOCK_T."""
    assert scan_triton.BLOCK_T < 150
    _assert_matches(*_inputs(2, 150, 6, torch.complex64, (2, 150, 6), True, seed=3))


def test_contract_by_hand():
    """Reset at t=0 drops h0; back-to-back resets; LTI a."""
    a = torch.tensor([0.5])
    b = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]], device=DEVICE)
    h0 = torch.tensor([[10.0]], device=DEVICE)
    reset = torch.tensor([[True, False, True, True, False]], device=DEVICE)
    h = linear_scan(a.to(DEVICE), b, h0, reset, backend="triton")
    assert h.flatten().tolist() == [1.0, 2.5, 3.0, 4.0, 7.0]


def test_missing_triton_is_explained(monkeypatch):
    monkeypatch.setattr(scan_triton, "triton", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\]"):
        scan_triton.triton_linear_scan(torch.ones(1, 1, 1), torch.ones(1, 2, 1))
