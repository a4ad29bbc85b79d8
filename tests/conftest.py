"""Shared test helpers."""

import os

import pytest
import torch

# The Triton scan tests run on a GPU, or else through Triton's CPU interpreter; the
# interpreter must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from compressm_rl.runs import TrainConfig  # noqa: E402

TINY_PPO = dict(num_envs=2, rollout_steps=32, seq_len=16, epochs=1, minibatches=1)


def make_tiny_config(env_id: str = "InvertedPendulum-v5", total_steps: int = 64, **overrides):
    """A seconds-long real training run: 2 envs x 32 steps per iteration, a small SSM."""
    settings = dict(env_id=env_id, total_steps=total_steps, state_dim=12, width=8, ppo=TINY_PPO)
    settings.update(overrides)
    return TrainConfig.from_dict(settings)


@pytest.fixture(scope="session")
def tiny_config():
    """Factory for small ``TrainConfig``s (see ``make_tiny_config``)."""
    return make_tiny_config
