"""Triton backend of ``policies.scan.linear_scan``: fused forward and backward kernels.

    h_t = a_t * (0 if reset[:, t] else h_{t-1}) + b_t,     h_{-1} = h0 (zeros if None)

Layout. ``b`` is ``[B, T, N]``; ``a`` is expanded to it with stride 0 on its broadcast
dimensions (so an LTI ``[1, 1, N]`` Λ is never materialised). One program owns one batch
row and ``BLOCK_N`` channels, and walks time in chunks of ``BLOCK_T`` steps: it loads a
``[BLOCK_T, BLOCK_N]`` tile, folds the carried state into the first row
(``b_0 += a_0 h_carry``), solves the chunk with ``tl.associative_scan`` on pairs
``(a, b)`` under ``(a_i, b_i) • (a_j, b_j) = (a_j a_i, a_j b_i + b_j)``, stores it and
carries the last row on. Any T works; the grid is ``(B, ceil(N / BLOCK_N))``.

Complex tensors are handed to the kernels as ``torch.view_as_real`` views: real and
imaginary parts sit side by side (offset 1) and the kernels carry them as separate float
tiles. Computation is float32 (float64 for float64/complex128 inputs).

A reset zeroes ``a_t`` inside the kernel (loaded from ``reset``), so ``h0`` is simply the
first carry. The backward kernel runs the same chunked scan with time reversed:
``δ_t = g_t + conj(a_{t+1}) δ_{t+1}`` (``a`` with resets folded in), ``grad_b = δ``,
``grad_a_t = δ_t conj(h_{t-1})`` (torch's conjugate convention), summed over time inside
the kernel when ``a`` is constant in time, and ``grad_h0 = conj(a_0) δ_0``.

Triton is optional (``pip install -e .[gpu]``): importing this module never fails, calling
``triton_linear_scan`` without it raises ImportError. Under ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors (that is how the tests exercise them). Offsets are int32:
tensors past 2^31 real elements are out of range.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; triton_linear_scan explains what to do
    triton = None

# Tile sizes (module-level so tests can shrink BLOCK_T to cross chunk boundaries cheaply).
BLOCK_T = 64
BLOCK_N = 32


def triton_linear_scan(
    a: Tensor, b: Tensor, h0: Tensor | None = None, reset: Tensor | None = None
) -> Tensor:
    """Reset-aware linear scan on Triton kernels, differentiable in ``a``, ``b`` and ``h0``.

    Args:
        a: decay ``[1|B, 1|T, 1|N]``, broadcastable to ``b``; real or complex.
        b: input ``[B, T, N]``; real or complex.
        h0: initial state ``[B, N]`` or None (zeros).
        reset: bool ``[B, T]`` or None; True where step t ignores ``h_{t-1}``.

    Returns:
        ``h`` of shape ``[B, T, N]`` in the promoted dtype of ``a`` and ``b`` (``b``'s dtype
        when ``a`` is no wider, as for the other backends).
    """
    if triton is None:
        raise ImportError(
            "scan backend 'triton' needs the triton package: pip install -e .[gpu] "
            "(or use backend='parallel')"
        )
    if a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"a and b must be 3-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if 2 * b.numel() >= 2**31:  # kernel offsets are int32 (real elements)
        raise ValueError(f"b {tuple(b.shape)} is too large for the triton scan (int32 offsets)")
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    work = _compute_dtype(out_dtype)
    # Casting outside the autograd.Function lets autograd cast the gradients back.
    a, b = a.to(work), b.to(work)
    h0 = h0.to(work) if h0 is not None else None
    if reset is not None:
        reset = reset.to(device=b.device, dtype=torch.uint8).contiguous()
    return _TritonScan.apply(a, b, h0, reset).to(out_dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32/complex64 for everything narrower, float64/complex128 kept as is."""
    if dtype.is_complex:
        return torch.complex128 if dtype == torch.complex128 else torch.complex64
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_real(x: Tensor) -> Tensor:
    """Real-valued view: complex ``[..., N]`` -> float ``[..., N, 2]`` (re, im interleaved)."""
    return torch.view_as_real(x.resolve_conj()) if x.is_complex() else x


class _TritonScan(torch.autograd.Function):
    """Forward kernel for h, backward kernel for (grad_a, grad_b); grad_h0 from δ_0."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor | None, reset: Tensor | None) -> Tensor:
        b = b.contiguous()
        h = torch.empty_like(b)
        _launch_forward(a.expand_as(b), b, h0, reset, h)
        ctx.save_for_backward(a, h, h0, reset)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor | None, Tensor, Tensor | None, None]:
        a, h, h0, reset = ctx.saved_tensors
        need_a, _, need_h0, _ = ctx.needs_input_grad
        grad_h = grad_h.resolve_conj().contiguous()
        delta = torch.empty_like(h)
        grad_a = None
        if need_a:
            # Constant-in-time a: the kernel sums over T itself into [B, 1, N]; it writes every element.
            steps = h.shape[1] if a.shape[1] > 1 else 1
            grad_a = torch.empty(h.shape[0], steps, h.shape[2], dtype=h.dtype, device=h.device)
        _launch_backward(a.expand_as(h), grad_h, h, h0, reset, delta, grad_a)
        if grad_a is not None:
            grad_a = _sum_to(grad_a, a.shape)
        grad_h0 = None
        if need_h0 and h0 is not None:
            grad_h0 = a[:, 0].conj() * delta[:, 0]  # δ carried one step further back
            if reset is not None:
                grad_h0 = grad_h0 * (1 - reset[:, :1]).to(grad_h0.real.dtype)
            grad_h0 = grad_h0.expand_as(h0)
        return grad_a, delta, grad_h0, None


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a ``[B, T|1, N]`` gradient over the dimensions where ``a`` was broadcast."""
    dims = [d for d in range(3) if shape[d] == 1 and grad.shape[d] != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _strides(x: Tensor) -> tuple[int, int, int]:
    """Strides of a ``[B, T, N]`` tensor in real-element units (complex ones are doubled)."""
    return tuple(_as_real(x).stride()[:3])


def _launch_forward(
    a: Tensor, b: Tensor, h0: Tensor | None, reset: Tensor | None, h: Tensor
) -> None:
    """h = scan(a, b) with ``a`` already expanded to ``[B, T, N]`` (stride 0 allowed)."""
    batch, steps, width = b.shape
    dummy = _as_real(b)  # stands in for absent optional pointers (never read)
    h0_r = _as_real(h0.contiguous()) if h0 is not None else dummy
    grid = (batch, triton.cdiv(width, BLOCK_N))
    _scan_fwd_kernel[grid](
        _as_real(a), _as_real(b), h0_r, reset if reset is not None else dummy, _as_real(h),
        steps, width,
        *_strides(a), *_strides(b),
        IS_COMPLEX=b.is_complex(), HAS_H0=h0 is not None, HAS_RESET=reset is not None,
        BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N,
    )  # fmt: skip


def _launch_backward(
    a: Tensor,
    grad_h: Tensor,
    h: Tensor,
    h0: Tensor | None,
    reset: Tensor | None,
    delta: Tensor,
    grad_a: Tensor | None,
) -> None:
    """δ = reverse scan of grad_h; grad_a (``[B, T|1, N]``) accumulated alongside."""
    batch, steps, width = h.shape
    dummy = _as_real(h)
    h0_r = _as_real(h0.contiguous()) if h0 is not None else dummy
    grad_a_r = _as_real(grad_a) if grad_a is not None else dummy
    grid = (batch, triton.cdiv(width, BLOCK_N))
    _scan_bwd_kernel[grid](
        _as_real(a), _as_real(grad_h), _as_real(h), h0_r,
        reset if reset is not None else dummy, _as_real(delta), grad_a_r,
        steps, width,
        *_strides(a), *_strides(h),
        IS_COMPLEX=h.is_complex(), HAS_H0=h0 is not None, HAS_RESET=reset is not None,
        NEED_GRAD_A=grad_a is not None,
        GRAD_A_FULL_T=grad_a is not None and grad_a.shape[1] > 1,
        BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _combine_real(a_i, b_i, a_j, b_j):
        """(a_i, b_i) • (a_j, b_j) = (a_j a_i, a_j b_i + b_j): step i, then step j."""
        return a_j * a_i, a_j * b_i + b_j

    @triton.jit
    def _combine_complex(ar_i, ai_i, br_i, bi_i, ar_j, ai_j, br_j, bi_j):
        """The same operator on complex numbers split into (real, imag) tiles."""
        ar = ar_j * ar_i - ai_j * ai_i
        ai = ar_j * ai_i + ai_j * ar_i
        br = ar_j * br_i - ai_j * bi_i + br_j
        bi = ar_j * bi_i + ai_j * br_i + bi_j
        return ar, ai, br, bi

    @triton.jit
    def _load_pair(ptr, offs, mask, IS_COMPLEX: tl.constexpr):
        """(re, im) tiles at real-element offsets; im is 0 for real tensors."""
        re = tl.load(ptr + offs, mask=mask, other=0.0)
        if IS_COMPLEX:
            im = tl.load(ptr + offs + 1, mask=mask, other=0.0)
        else:
            im = tl.zeros_like(re)
        return re, im

    @triton.jit
    def _store_pair(ptr, offs, re, im, mask, IS_COMPLEX: tl.constexpr):
        tl.store(ptr + offs, re, mask=mask)
        if IS_COMPLEX:
            tl.store(ptr + offs + 1, im, mask=mask)

    @triton.jit
    def _chunk_scan(ar, ai, br, bi, IS_COMPLEX: tl.constexpr):
        """Inclusive scan of ``[BLOCK_T, BLOCK_N]`` tiles along time (axis 0); returns b part."""
        if IS_COMPLEX:
            _, _, hr, hi = tl.associative_scan((ar, ai, br, bi), 0, _combine_complex)
        else:
            _, hr = tl.associative_scan((ar, br), 0, _combine_real)
            hi = tl.zeros_like(hr)
        return hr, hi

    @triton.jit
    def _last_row(x, rows, BLOCK_T: tl.constexpr):
        """Row BLOCK_T - 1 of a ``[BLOCK_T, BLOCK_N]`` tile, as ``[BLOCK_N]`` (no tile indexing)."""
        return tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, x, 0.0), axis=0)

    @triton.jit
    def _scan_fwd_kernel(
        a_ptr, b_ptr, h0_ptr, reset_ptr, h_ptr,
        T, N,
        sa_b, sa_t, sa_n, sb_b, sb_t, sb_n,
        IS_COMPLEX: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One (batch row, channel block): walk T in chunks, carrying h between them.

        ``b``, ``h`` and ``h0`` are contiguous (``h`` shares ``b``'s strides); ``a`` may
        have stride 0 on broadcast dimensions.
        """
        pid_b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        rows = tl.arange(0, BLOCK_T)
        if HAS_H0:
            cr, ci = _load_pair(h0_ptr, (pid_b * N + cols) * sb_n, col_ok, IS_COMPLEX)
        else:
            cr = tl.zeros([BLOCK_N], dtype=h_ptr.dtype.element_ty)
            ci = tl.zeros([BLOCK_N], dtype=h_ptr.dtype.element_ty)
        for start in range(0, T, BLOCK_T):
            t = start + rows
            t_ok = t < T
            mask = t_ok[:, None] & col_ok[None, :]
            a_offs = pid_b * sa_b + t[:, None] * sa_t + cols[None, :] * sa_n
            b_offs = pid_b * sb_b + t[:, None] * sb_t + cols[None, :] * sb_n
            ar, ai = _load_pair(a_ptr, a_offs, mask, IS_COMPLEX)
            br, bi = _load_pair(b_ptr, b_offs, mask, IS_COMPLEX)
            if HAS_RESET:  # a new episode ignores h_{t-1}: a_t = 0
                keep = tl.load(reset_ptr + pid_b * T + t, mask=t_ok, other=1) == 0
                ar = tl.where(keep[:, None], ar, 0.0)
                ai = tl.where(keep[:, None], ai, 0.0)
            # The state carried in enters through the first step: b_0 += a_0 h_carry.
            first = rows[:, None] == 0
            br += tl.where(first, ar * cr[None, :] - ai * ci[None, :], 0.0)
            bi += tl.where(first, ar * ci[None, :] + ai * cr[None, :], 0.0)
            hr, hi = _chunk_scan(ar, ai, br, bi, IS_COMPLEX)
            _store_pair(h_ptr, b_offs, hr, hi, mask, IS_COMPLEX)
            cr = _last_row(hr, rows, BLOCK_T)  # padded rows (t >= T) only follow the last chunk
            ci = _last_row(hi, rows, BLOCK_T)

    @triton.jit
    def _scan_bwd_kernel(
        a_ptr, g_ptr, h_ptr, h0_ptr, reset_ptr, d_ptr, ga_ptr,
        T, N,
        sa_b, sa_t, sa_n, sh_b, sh_t, sh_n,
        IS_COMPLEX: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
        NEED_GRAD_A: tl.constexpr, GRAD_A_FULL_T: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """δ_t = g_t + conj(a_{t+1}) δ_{t+1} from the end; grad_a_t = δ_t conj(h_{t-1}).

        Row r of chunk k is time ``t = T - 1 - (k BLOCK_T + r)``, so the reverse scan is
        the forward chunked scan on reversed indices. ``g``, ``h``, ``δ`` and a full-T
        ``grad_a`` are contiguous ``[B, T, N]``; a summed ``grad_a`` is ``[B, 1, N]``.
        """
        pid_b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        rows = tl.arange(0, BLOCK_T)
        dr = tl.zeros([BLOCK_N], dtype=h_ptr.dtype.element_ty)  # δ carried from later chunks
        di = tl.zeros([BLOCK_N], dtype=h_ptr.dtype.element_ty)
        acc_r = tl.zeros([BLOCK_N], dtype=h_ptr.dtype.element_ty)  # Σ_t grad_a_t (LTI a)
        acc_i = tl.zeros([BLOCK_N], dtype=h_ptr.dtype.element_ty)
        if HAS_H0:
            h0r, h0i = _load_pair(h0_ptr, (pid_b * N + cols) * sh_n, col_ok, IS_COMPLEX)
        for start in range(0, T, BLOCK_T):
            t = T - 1 - (start + rows)
            t_ok = t >= 0
            mask = t_ok[:, None] & col_ok[None, :]
            offs = pid_b * sh_b + t[:, None] * sh_t + cols[None, :] * sh_n
            # conj(a_{t+1}), zero past the end and where step t+1 starts an episode.
            nxt_ok = (t + 1 < T) & t_ok
            nxt_mask = nxt_ok[:, None] & col_ok[None, :]
            a_offs = pid_b * sa_b + (t[:, None] + 1) * sa_t + cols[None, :] * sa_n
            ar, ai = _load_pair(a_ptr, a_offs, nxt_mask, IS_COMPLEX)
            ai = -ai
            if HAS_RESET:
                keep_next = tl.load(reset_ptr + pid_b * T + t + 1, mask=nxt_ok, other=1) == 0
                ar = tl.where(keep_next[:, None], ar, 0.0)
                ai = tl.where(keep_next[:, None], ai, 0.0)
            gr, gi = _load_pair(g_ptr, offs, mask, IS_COMPLEX)
            first = rows[:, None] == 0
            gr += tl.where(first, ar * dr[None, :] - ai * di[None, :], 0.0)
            gi += tl.where(first, ar * di[None, :] + ai * dr[None, :], 0.0)
            delta_r, delta_i = _chunk_scan(ar, ai, gr, gi, IS_COMPLEX)
            _store_pair(d_ptr, offs, delta_r, delta_i, mask, IS_COMPLEX)
            dr = _last_row(delta_r, rows, BLOCK_T)
            di = _last_row(delta_i, rows, BLOCK_T)
            if NEED_GRAD_A:
                # h_{t-1}: the saved output one step back, h0 (or 0) before the first step.
                prev_mask = (t_ok & (t >= 1))[:, None] & col_ok[None, :]
                pr, pi = _load_pair(h_ptr, offs - sh_t, prev_mask, IS_COMPLEX)
                if HAS_H0:
                    at_zero = (t == 0)[:, None]
                    pr = tl.where(at_zero, h0r[None, :], pr)
                    pi = tl.where(at_zero, h0i[None, :], pi)
                if HAS_RESET:  # a_t was replaced by 0 there, so it gets no gradient
                    keep = tl.load(reset_ptr + pid_b * T + t, mask=t_ok, other=1) == 0
                    pr = tl.where(keep[:, None], pr, 0.0)
                    pi = tl.where(keep[:, None], pi, 0.0)
                # δ conj(h_prev) = (dr pr + di pi) + i (di pr - dr pi)
                ga_r = delta_r * pr + delta_i * pi
                ga_i = delta_i * pr - delta_r * pi
                if GRAD_A_FULL_T:
                    _store_pair(ga_ptr, offs, ga_r, ga_i, mask, IS_COMPLEX)
                else:
                    acc_r += tl.sum(tl.where(mask, ga_r, 0.0), axis=0)
                    acc_i += tl.sum(tl.where(mask, ga_i, 0.0), axis=0)
        if NEED_GRAD_A and not GRAD_A_FULL_T:
            ga_offs = (pid_b * N + cols) * sh_n  # contiguous [B, 1, N]
            _store_pair(ga_ptr, ga_offs, acc_r, acc_i, col_ok, IS_COMPLEX)
