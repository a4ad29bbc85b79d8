"""Linear Recurrent Unit (LRU) layers with an explicit recurrent state.

One layer, input ``u_t`` in R^H, complex state ``h_t`` in C^n::

    h_t = Λ h_{t-1} + B̃ u_t,        B̃ = diag(γ) (B_re + i B_im)
    y_t = Re(C h_t) + D ⊙ u_t,       C = C_re + i C_im
    λ_j = exp(-exp(ν_j) + i θ_j),     γ_j = sqrt(1 - |λ_j|²)

The phase θ is a direct parameter (not log θ): balanced truncation can produce real
eigenvalues (θ = 0 or π) that a log-phase cannot hold. |λ| is clamped to ``MAX_RADIUS``
so that |λ| < 1 holds for every parameter value, even where exp(ν) underflows, and so
that γ (and B = B̃/γ after a reduction) stays finite.

``LRU.system()`` reads a layer as the diagonal LTI system of ``policies.lti`` (the one
realisation every other part of the project uses), ``LRU.load_system()`` writes one back.

Every module takes its state as an argument and returns the new one; nothing is hidden
inside the module. A layer's state is complex ``[B, n]``; a stack's state is one real
tensor ``[B, S]`` laid out per layer as ``[Re h_1, Im h_1, Re h_2, Im h_2, ...]`` with
``S = Σ 2 n_l`` (the ONNX export uses the same layout). Zeros mean "episode start".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.lti import MAX_RADIUS, MIN_DECAY, DiagonalSystem, lru_parameters, merged_step_matrices
from policies.scan import linear_scan

__all__ = ["LRU", "LRUBlock", "LRUStack", "MAX_RADIUS"]


# The parametrisation's forward map, on parameter tensors with any leading dimensions
# (one layer's, or several layers' stacked by ``grouped_forward``).
def decay_of(nu_log: Tensor) -> Tensor:
    """exp(ν) ``[..., n]``, floored so that |λ| = exp(-decay) ≤ MAX_RADIUS."""
    return torch.exp(nu_log).clamp(min=MIN_DECAY)


def eigenvalues_of(decay: Tensor, theta: Tensor) -> Tensor:
    """λ = exp(-decay + iθ), complex ``[..., n]``."""
    return torch.polar(torch.exp(-decay), theta)


def gamma_of(decay: Tensor) -> Tensor:
    """γ = sqrt(1 - |λ|²) ``[..., n]``, from the decay (precise near |λ| = 1)."""
    return torch.sqrt(-torch.expm1(-2.0 * decay))


def input_weight_of(b_re: Tensor, b_im: Tensor, gamma: Tensor) -> Tensor:
    """``[..., n, H]`` parts and γ ``[..., n]`` -> B̃ ``[..., 2n, H]``, rows interleaved."""
    stacked = torch.stack([b_re, b_im], dim=-2) * gamma[..., None, None]  # [..., n, 2, H]
    return stacked.reshape(*b_re.shape[:-2], -1, b_re.shape[-1])


def output_weight_of(c_re: Tensor, c_im: Tensor) -> Tensor:
    """``[..., H, n]`` parts -> ``[..., H, 2n]``, columns interleaved (Re C, -Im C)."""
    return torch.stack([c_re, -c_im], dim=-1).reshape(*c_re.shape[:-1], -1)


class LRU(nn.Module):
    """Diagonal complex linear recurrence (one LRU layer, no nonlinearity).

    Args:
        width: H, input and output features.
        state_dim: n, complex states.
        r_min, r_max: ring of initial eigenvalue radii |λ|.
        max_phase: initial phases θ are uniform in [0, max_phase).
    """

    def __init__(
        self,
        width: int,
        state_dim: int,
        r_min: float = 0.5,
        r_max: float = 0.99,
        max_phase: float = math.pi,
    ) -> None:
        super().__init__()
        if width < 1 or state_dim < 1:
            raise ValueError(f"width and state_dim must be >= 1, got {width}, {state_dim}")
        self.width, self.state_dim = width, state_dim
        # |λ|² uniform on [r_min², r_max²] (the LRU paper's ring initialisation).
        radius_sq = torch.empty(state_dim).uniform_(r_min**2, r_max**2)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(radius_sq)))
        self.theta = nn.Parameter(torch.empty(state_dim).uniform_(0.0, max_phase))
        self.B_re = nn.Parameter(torch.randn(state_dim, width) / math.sqrt(2 * width))
        self.B_im = nn.Parameter(torch.randn(state_dim, width) / math.sqrt(2 * width))
        self.C_re = nn.Parameter(torch.randn(width, state_dim) / math.sqrt(state_dim))
        self.C_im = nn.Parameter(torch.randn(width, state_dim) / math.sqrt(state_dim))
        self.D = nn.Parameter(torch.randn(width))

    def decay(self) -> Tensor:
        """exp(ν), real ``[n]``, floored so that |λ| = exp(-decay) ≤ MAX_RADIUS."""
        return decay_of(self.nu_log)

    # ``decay`` may be passed in so that one training step computes it once for λ and γ.
    def eigenvalues(self, decay: Tensor | None = None) -> Tensor:
        """λ, complex ``[n]``, |λ| ≤ MAX_RADIUS < 1."""
        return eigenvalues_of(self.decay() if decay is None else decay, self.theta)

    def gamma(self, decay: Tensor | None = None) -> Tensor:
        """γ = sqrt(1 - |λ|²), real ``[n]``."""
        return gamma_of(self.decay() if decay is None else decay)

    def input_matrix(self) -> Tensor:
        """Effective B̃ = diag(γ) B, complex ``[n, H]``."""
        return torch.complex(self.B_re, self.B_im) * self.gamma()[:, None]

    def output_matrix(self) -> Tensor:
        """C, complex ``[H, n]``."""
        return torch.complex(self.C_re, self.C_im)

    def input_weight(self, decay: Tensor | None = None) -> Tensor:
        """B̃ as one real matrix ``[2n, H]`` with rows interleaved (Re B̃_1, Im B̃_1, ...),
        so ``u @ W.T`` viewed as complex is ``B̃ u`` from a single real GEMM."""
        return input_weight_of(self.B_re, self.B_im, self.gamma(decay))

    def output_weight(self) -> Tensor:
        """``[H, 2n]`` real with columns interleaved (Re C, -Im C): Re(C h) = W · view_as_real(h)."""
        return output_weight_of(self.C_re, self.C_im)

    @torch.no_grad()
    def system(self) -> DiagonalSystem:
        """The layer as a diagonal LTI system ``(λ [n], B̃ [n, H], C [H, n], D [H])``.

        The float32 numbers this layer computes with, widened to complex128 / float64
        numpy (not recomputed in float64: λ's rounding is the one that compounds over
        time, and the export and the reduction must see the layer that was trained).
        """

        def wide(t: Tensor, dtype: torch.dtype) -> np.ndarray:
            return t.detach().cpu().to(dtype).numpy()

        return DiagonalSystem(
            lam=wide(self.eigenvalues(), torch.complex128),
            B=wide(self.input_matrix(), torch.complex128),
            C=wide(self.output_matrix(), torch.complex128),
            D=wide(self.D, torch.float64),
        )

    @torch.no_grad()
    def load_system(self, system: DiagonalSystem) -> dict[nn.Parameter, nn.Parameter]:
        """Become ``system`` (any state size m; ``D`` must keep its width H).

        The state-sized parameters (ν, θ, B, C) are replaced by new ``Parameter``s
        (resizing ``.data`` in place would leave autograd's cached shapes stale); D is
        written in place. Returns ``{old: new}`` so that an optimiser can follow.
        """
        lam, b_tilde, c, d = system
        c = np.asarray(c, dtype=np.complex128)
        if np.shape(d) != (self.width,) or c.shape[0] != self.width:
            raise ValueError(f"the system must keep width H = {self.width}")
        values = lru_parameters(lam, b_tilde)
        values["C_re"], values["C_im"] = c.real, c.imag
        replaced = {}
        for name, value in values.items():
            old = getattr(self, name)
            new = nn.Parameter(
                torch.as_tensor(np.ascontiguousarray(value), dtype=old.dtype, device=old.device)
            )
            setattr(self, name, new)
            replaced[old] = new
        self.D.copy_(torch.as_tensor(d, dtype=self.D.dtype))
        self.state_dim = int(np.shape(lam)[0])
        return replaced

    def initial_state(self, batch: int, device: torch.device | None = None) -> Tensor:
        """Zero state ``[batch, n]`` complex64."""
        return torch.zeros(batch, self.state_dim, dtype=torch.complex64, device=device)

    def forward(
        self, u: Tensor, state: Tensor | None = None, reset: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Sequence mode.

        Args:
            u: inputs ``[B, T, H]``.
            state: complex ``[B, n]`` before the first step (zeros if None).
            reset: bool ``[B, T]``, True where step t starts a new episode.

        Returns:
            ``y`` ``[B, T, H]`` and the state after the last step, complex ``[B, n]``.
        """
        batch, steps, _ = u.shape
        decay = self.decay()
        bu = torch.view_as_complex((u @ self.input_weight(decay).T).view(batch, steps, -1, 2))
        h = linear_scan(self.eigenvalues(decay), bu, h0=state, reset=reset)
        y = torch.view_as_real(h).reshape(batch, steps, -1) @ self.output_weight().T
        return torch.addcmul(y, self.D, u), h[:, -1]

    def step(self, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Step mode: ``u`` ``[B, H]``, ``state`` complex ``[B, n]`` -> ``(y [B, H], state)``."""
        decay = self.decay()
        bu = torch.view_as_complex((u @ self.input_weight(decay).T).view(u.shape[0], -1, 2))
        h = self.eigenvalues(decay) * state + bu
        y = torch.view_as_real(h).reshape(u.shape[0], -1) @ self.output_weight().T
        return torch.addcmul(y, self.D, u), h


class LRUBlock(nn.Module):
    """Residual block: ``u + GELU(LRU(LayerNorm(u)))``."""

    def __init__(self, width: int, state_dim: int, **lru_kwargs: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.lru = LRU(width, state_dim, **lru_kwargs)

    def forward(
        self, u: Tensor, state: Tensor | None = None, reset: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        y, state = self.lru(self.norm(u), state, reset)
        return u + F.gelu(y), state

    def step(self, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        y, state = self.lru.step(self.norm(u), state)
        return u + F.gelu(y), state


class LRUStack(nn.Module):
    """Input encoder followed by residual LRU blocks.

    Args:
        in_dim: input features (e.g. observation size).
        width: H, features inside the stack.
        state_dims: n per layer; layers may differ (compression makes them differ).
    """

    def __init__(self, in_dim: int, width: int, state_dims: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        if len(state_dims) < 1:
            raise ValueError("an LRU stack needs at least one layer")
        self.encoder = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(LRUBlock(width, n) for n in state_dims)
        self.width = width

    @property
    def state_dims(self) -> list[int]:
        """Complex states per layer."""
        return [block.lru.state_dim for block in self.blocks]

    @property
    def state_size(self) -> int:
        """S, real numbers in the flat state (``Σ 2 n_l``)."""
        return 2 * sum(self.state_dims)

    def initial_state(self, batch: int, device: torch.device | None = None) -> Tensor:
        """Zero flat state ``[batch, S]`` float32 (an episode start)."""
        return torch.zeros(batch, self.state_size, device=device)

    def check_state(self, state: Tensor) -> None:
        """Raise ValueError unless ``state`` is a flat ``[B, S]`` state of this stack."""
        if state.dim() != 2 or state.shape[1] != self.state_size:
            raise ValueError(
                f"state must be [B, {self.state_size}] (Σ 2n over layers {self.state_dims}), "
                f"got {tuple(state.shape)}"
            )

    def split_state(self, state: Tensor) -> list[Tensor]:
        """Flat real ``[B, S]`` -> per-layer complex ``[B, n_l]``."""
        self.check_state(state)
        real = torch.promote_types(state.dtype, torch.float32)  # float64 stays float64
        parts, offset = [], 0
        for n in self.state_dims:
            re, im = state[:, offset : offset + n], state[:, offset + n : offset + 2 * n]
            parts.append(torch.complex(re.to(real), im.to(real)))
            offset += 2 * n
        return parts

    @staticmethod
    def join_state(parts: list[Tensor]) -> Tensor:
        """Per-layer complex ``[B, n_l]`` -> flat real ``[B, S]``."""
        return torch.cat([torch.cat([h.real, h.imag], dim=-1) for h in parts], dim=-1)

    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        reset: Tensor | None = None,
        return_state: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Sequence mode: ``x`` ``[B, T, in_dim]``, flat ``state`` ``[B, S]`` (zeros if None),
        ``reset`` bool ``[B, T]`` -> features ``[B, T, H]`` and the flat state after step T
        (None with ``return_state=False``, which a PPO gradient step passes: it needs
        only the features, and gathering the state costs ~10 recorded ops)."""
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        u = self.encoder(x)
        finals = []
        for block, h0 in zip(self.blocks, self.split_state(state), strict=True):
            u, h_last = block(u, h0, reset)
            finals.append(h_last)
        return u, self.join_state(finals) if return_state else None

    @torch.no_grad()
    def frozen_step(
        self, fused: bool | None = None
    ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``step`` with every weight read once, for a rollout (where the weights are
        fixed): same inputs, outputs and state layout, no autograd. Stale after a
        parameter update: ask for a new one.

        ``fused`` (None: where it can run, ``lru_fused.usable``): one compiled kernel call
        a step (``policies.lru_fused.frozen_step``). Otherwise six torch ops per layer:
        per layer, with its slice ``x = [Re h, Im h]`` of the flat state and
        z = LayerNorm(u), one product gives the new state and the layer's output,
        ``[x' | y] = x @ from_state + z @ from_input`` (``policies.lti.merged_step_matrices``,
        formed in float64; the ONNX graph's merged path). The dense 2n × 2n Aᵀ costs more
        multiply-adds than the elementwise form, but at rollout sizes a matrix product is
        cheaper than the five small ops it replaces.
        """
        from policies import lru_fused  # numba: imported when first needed

        if fused is None:
            fused = lru_fused.usable([self])
        if fused:
            return lru_fused.frozen_step(self)
        enc_w, enc_b = self.encoder.weight.T.clone(), self.encoder.bias.clone()
        layers = []
        for block in self.blocks:
            from_state, from_input = merged_step_matrices(*block.lru.system())
            norm = block.norm
            layers.append(
                (
                    2 * block.lru.state_dim,
                    (norm.normalized_shape, norm.weight.clone(), norm.bias.clone(), norm.eps),
                    torch.from_numpy(from_state).float().contiguous(),
                    torch.from_numpy(from_input).float().contiguous(),
                )
            )

        @torch.no_grad()
        def step(x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
            u = torch.addmm(enc_b, x, enc_w)
            new, offset = [], 0
            for size, norm, from_state, from_input in layers:
                z = F.layer_norm(u, *norm)
                out = torch.addmm(z @ from_input, state[:, offset : offset + size], from_state)
                offset += size
                new.append(out[:, :size])
                u = u + F.gelu(out[:, size:])
            return u, torch.cat(new, dim=1)

        return step

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Step mode: ``x`` ``[B, in_dim]``, ``state`` ``[B, S]`` -> ``(features [B, H], state)``."""
        u = self.encoder(x)
        new = []
        for block, h in zip(self.blocks, self.split_state(state), strict=True):
            u, h = block.step(u, h)
            new.append(h)
        return u, self.join_state(new)


def grouped_forward(
    stacks: list[LRUStack],
    x: Tensor,
    states: list[Tensor],
    reset: Tensor | None = None,
    fused: bool | None = None,
) -> Tensor:
    """Sequence-mode features of G stacks over the same inputs, in one pass.

    The stacks must share depth and width (an actor and its critic do); each starts from
    its own flat state. Every op runs once for all G stacks — batched matmuls, one scan
    per layer over ``G·B`` rows — instead of once per stack: at PPO sizes the update pays
    per op, not per number (two stacks' forward and backward at n = 25: 8.2 ms, one stack
    on twice the batch 5.5 ms). Layers of different n are padded with exact-zero states
    (λ = 0, B̃ = 0, C = 0): they stay zero and add nothing, to the output or the gradient.

    Args:
        stacks: G ``LRUStack``s of equal depth and width H.
        x: inputs ``[B, T, in_dim]``.
        states: G flat states ``[B, S_g]`` before the first step.
        reset: bool ``[B, T]``, True where step t starts a new episode.
        fused: run the whole pass as one autograd node over compiled kernels
            (``policies.lru_fused``, CPU only); None picks it where it can run
            (``lru_fused.usable``). False is the reference: the same maths in autograd ops.

    Returns:
        Features ``[G, B, T, H]`` (the stacks' ``forward`` outputs, stacked).
    """
    groups, (batch, steps, _), width = len(stacks), x.shape, stacks[0].width
    if len({len(s.blocks) for s in stacks}) != 1 or any(s.width != width for s in stacks):
        raise ValueError("grouped stacks must share their depth and width")
    for stack, state in zip(stacks, states, strict=True):
        stack.check_state(state)
    from policies import lru_fused  # numba: imported when first needed

    if fused is None:
        fused = lru_fused.usable(stacks, x)
    if fused:
        return lru_fused.fused_grouped_forward(stacks, x, states, reset)
    weight = torch.stack([s.encoder.weight for s in stacks])  # [G, H, in]
    bias = torch.stack([s.encoder.bias for s in stacks])
    u = torch.baddbmm(
        bias[:, None],
        x.reshape(1, batch * steps, -1).expand(groups, -1, -1),
        weight.transpose(1, 2),
    )  # [G, B·T, H]
    starts = [s.split_state(state) for s, state in zip(stacks, states, strict=True)]
    resets = None if reset is None else reset.repeat(groups, 1)
    for depth in range(len(stacks[0].blocks)):
        blocks = [s.blocks[depth] for s in stacks]
        lrus = [block.lru for block in blocks]
        n = max(lru.state_dim for lru in lrus)

        norm_w = torch.stack([b.norm.weight for b in blocks])
        norm_b = torch.stack([b.norm.bias for b in blocks])

        # The layers' parameters, padded to n states and stacked [G, ...], then one
        # forward map for all (padding: ν = 10 gives λ = exp(-e^10) = 0, and B = C = 0).
        def stacked(name: str, dim: int, fill: float = 0.0, lrus=lrus, n=n) -> Tensor:
            return torch.stack([_pad(getattr(lru, name), n, dim, fill) for lru in lrus])

        decay = decay_of(stacked("nu_log", 0, fill=10.0))
        lam = eigenvalues_of(decay, stacked("theta", 0))
        w_in = input_weight_of(stacked("B_re", 0), stacked("B_im", 0), gamma_of(decay))
        w_out = output_weight_of(stacked("C_re", 1), stacked("C_im", 1))
        d = torch.stack([lru.D for lru in lrus])
        h0 = torch.cat([_pad(start[depth], n, 1) for start in starts])
        eps = blocks[0].norm.eps
        z = torch.addcmul(norm_b[:, None], F.layer_norm(u, (width,), eps=eps), norm_w[:, None])
        bu = torch.bmm(z, w_in.transpose(1, 2)).view(groups * batch, steps, n, 2)
        a = lam[:, None, :].expand(groups, batch, n).reshape(groups * batch, 1, n)
        h = linear_scan(a, torch.view_as_complex(bu), h0=h0, reset=resets)
        y = torch.bmm(
            torch.view_as_real(h).reshape(groups, batch * steps, 2 * n), w_out.transpose(1, 2)
        )
        u = u + F.gelu(torch.addcmul(y, d[:, None], z))
    return u.reshape(groups, batch, steps, width)


def _pad(t: Tensor, size: int, dim: int, fill: float = 0.0) -> Tensor:
    """``t`` with dimension ``dim`` extended to ``size`` by ``fill``."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_full(shape, fill)], dim=dim)
