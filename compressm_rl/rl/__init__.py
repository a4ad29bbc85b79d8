"""Recurrent PPO: settings and presets (``config``), experience (``rollout``), the update
(``ppo``), and one iteration that strings them together (``iteration``)."""

from compressm_rl.rl.config import PPOConfig, preset_for
from compressm_rl.rl.iteration import IterationResult, iteration
from compressm_rl.rl.ppo import SequenceBatch, make_optimizer, ppo_update
from compressm_rl.rl.rollout import EnvCarry, Rollout, start_carry

__all__ = [
    "EnvCarry",
    "IterationResult",
    "PPOConfig",
    "Rollout",
    "SequenceBatch",
    "iteration",
    "make_optimizer",
    "ppo_update",
    "preset_for",
    "start_carry",
]
