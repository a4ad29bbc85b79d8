"""Compression of LRU policies by balanced truncation: the settings (``config``, state
budgets in ``budget``), the LTI maths on arrays (``gramians``, ``lti``: balanced
truncation, ``mode_fitting``, ``hinf``: H∞ norms) and the in-training pipeline over an
actor-critic (``pipeline``: its steps in ``plan``, ``kl_guard``, ``surgery``, with
``measurements`` and ``events``)."""

from compressm_rl.compression.config import CompressionConfig
from compressm_rl.compression.events import LayerRef, ReductionEvent, lru_layers
from compressm_rl.compression.hinf import hinf_norm
from compressm_rl.compression.kl_guard import heal_actor
from compressm_rl.compression.pipeline import (
    apply_reductions,
    compress_policy,
    decide_reductions,
)

__all__ = [
    "CompressionConfig",
    "LayerRef",
    "ReductionEvent",
    "apply_reductions",
    "compress_policy",
    "decide_reductions",
    "heal_actor",
    "hinf_norm",
    "lru_layers",
]
