"""Deterministic evaluation of a torch policy: mean and spread of episode returns.

Convention shared with the ONNX twin (``compressm_rl.deploy.evaluate_onnx``): one env,
episode k starts with ``env.reset(seed=seed + k)``, the policy's state is zeroed at each
episode start, actions are the deterministic (clipped mean) ones, and the return is the
sum of raw rewards until the episode terminates or is truncated.
"""

from __future__ import annotations

import numpy as np
import torch

from envs import make_env
from policies.actor_critic import ActorCritic


@torch.no_grad()
def evaluate_policy(
    policy: ActorCritic, env_id: str, episodes: int = 10, seed: int = 0
) -> np.ndarray:
    """Returns of ``episodes`` deterministic episodes, ``[episodes]`` float64."""
    env = make_env(env_id)
    returns = np.zeros(episodes)
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        state, done = None, False
        while not done:
            action, state = policy.predict(obs, state, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            returns[k] += reward
            done = terminated or truncated
    env.close()
    return returns
