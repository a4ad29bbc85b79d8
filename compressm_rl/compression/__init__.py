"""Compression of LRU policies by balanced truncation: the settings (``config``), the LTI
maths on arrays (``lti``) and the in-training pipeline over an actor-critic (``pipeline``)."""

from compressm_rl.compression.config import CompressionConfig
from compressm_rl.compression.lti import hinf_norm
from compressm_rl.compression.pipeline import (
    LayerRef,
    ReductionEvent,
    apply_reductions,
    compress_policy,
    decide_reductions,
    heal_actor,
    lru_layers,
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
