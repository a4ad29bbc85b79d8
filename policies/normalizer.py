"""Running mean/std observation normaliser whose statistics are buffers.

Buffers travel with ``state_dict`` (checkpoints) and are folded into the ONNX export.
Statistics are float64 so that millions of updates do not drift.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn


class RunningNormalizer(nn.Module):
    """``clip((x - mean) / sqrt(var + eps), -clip, clip)`` with running statistics.

    Args:
        shape: feature shape, e.g. ``(obs_dim,)``.
        clip: bound on the normalised value (10 as in SB3's VecNormalize).
        eps: added to the variance.
    """

    def __init__(self, shape: tuple[int, ...] | int, clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.clip, self.eps = clip, eps
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    def update(self, x: Tensor | np.ndarray) -> None:
        """Merge a batch ``[..., *shape]`` into the statistics."""
        self.update_each(np.asarray(x, dtype=np.float64).reshape(1, -1, *self.mean.shape))

    @torch.no_grad()
    def update_each(self, batches: np.ndarray) -> np.ndarray:
        """Merge ``T`` batches ``[T, N, *shape]`` one after another (Chan et al.'s
        parallel update) and return the variance after each merge ``[T, *shape]``.

        Vectorised (a rollout's reward scale needs the variance after every env step;
        per-step calls cost ~0.15 ms each beside MuJoCo). With d = x - mean₀ and S1, S2
        the running sums of d and d² over the m samples merged so far, n = count₀ + m:
        mean = mean₀ + S1/n and n·var = count₀·var₀ + S2 - S1²/n (the merge, unrolled;
        centring on the previous mean keeps S1 small once the statistics have settled).
        """
        x = np.asarray(batches, dtype=np.float64)
        x = x.reshape(x.shape[0], -1, *self.mean.shape)
        # .cpu(): the statistics may live on the learner's device (a no-op on the CPU)
        mean0, var0 = self.mean.cpu().numpy().copy(), self.var.cpu().numpy().copy()
        count0 = float(self.count)
        d = x - mean0
        s1, s2 = np.cumsum(d.sum(1), axis=0), np.cumsum((d * d).sum(1), axis=0)
        n = (count0 + x.shape[1] * np.arange(1, x.shape[0] + 1)).reshape(-1, *[1] * mean0.ndim)
        variances = (count0 * var0 + s2 - s1 * s1 / n) / n
        self.mean.copy_(torch.from_numpy(np.asarray(mean0 + s1[-1] / n[-1])))
        self.var.copy_(torch.from_numpy(np.asarray(variances[-1])))
        self.count.fill_(float(n[-1].item()))
        return variances

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` ``[..., *shape]``; returns ``x``'s dtype."""
        mean = self.mean.to(x.dtype)
        std = torch.sqrt(self.var + self.eps).to(x.dtype)
        return ((x - mean) / std).clamp(-self.clip, self.clip)

    @torch.no_grad()
    def frozen(self) -> Callable[[np.ndarray], Tensor]:
        """``forward`` for float32 results from numpy input, with the statistics read once
        (for a rollout, during which they are fixed): same values, bit for bit."""
        mean = self.mean.float().cpu().numpy()
        std = torch.sqrt(self.var + self.eps).float().cpu().numpy()
        low, high = np.float32(-self.clip), np.float32(self.clip)

        def normalize(x: np.ndarray) -> Tensor:
            return torch.from_numpy(np.clip((np.asarray(x, np.float32) - mean) / std, low, high))

        return normalize
