"""Running mean/std observation normaliser whose statistics are buffers.

Buffers travel with ``state_dict`` (checkpoints) and are folded into the ONNX export.
Statistics are float64 so that millions of updates do not drift.
"""

from __future__ import annotations

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

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge a batch ``[..., *shape]`` into the statistics (Chan et al. parallel update)."""
        x = x.reshape(-1, *self.mean.shape).to(torch.float64)
        batch_mean, batch_var, batch_count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        m2 = (
            self.var * self.count
            + batch_var * batch_count
            + delta**2 * self.count * batch_count / total
        )
        self.mean += delta * batch_count / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` ``[..., *shape]``; returns ``x``'s dtype."""
        mean = self.mean.to(x.dtype)
        std = torch.sqrt(self.var + self.eps).to(x.dtype)
        return ((x - mean) / std).clamp(-self.clip, self.clip)
