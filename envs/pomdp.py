"""Partially observable MuJoCo variants: keep only joint positions or only velocities.

Gymnasium's MuJoCo locomotion observations are ``[qpos (minus the root x/y when
excluded), qvel]`` (plus contact forces on some tasks, which are dropped with the
velocities). Removing one half makes memory necessary: a feed-forward policy sees either
no velocities (``-P``) or no configuration (``-V``).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

KEEP_CHOICES = ("positions", "velocities")


def position_count(env: gym.Env) -> int:
    """Number of leading observation entries that are joint positions, from the task's
    ``observation_structure`` (Gymnasium's v5 MuJoCo tasks: ``qpos`` less the excluded
    root coordinates: 1 on the planar walkers, 2 on Swimmer, Ant and Humanoid)."""
    base = env.unwrapped
    name = env.spec.id if env.spec else type(base).__name__
    if getattr(base, "model", None) is None:
        raise ValueError(f"{name} is not a MuJoCo env: no POMDP variant")
    structure = getattr(base, "observation_structure", None)
    if not isinstance(structure, dict) or "qpos" not in structure or "qvel" not in structure:
        raise ValueError(
            f"{name}'s observation is not [qpos, qvel, ...] (it declares no "
            "observation_structure): no -P / -V variant; use the task's own id"
        )
    return int(structure["qpos"])


class KeepPartObservation(gym.ObservationWrapper):
    """Keep the position block or the velocity block of a MuJoCo observation."""

    def __init__(self, env: gym.Env, keep: str) -> None:
        super().__init__(env)
        if keep not in KEEP_CHOICES:
            raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")
        n_pos = position_count(env)
        n_vel = int(env.unwrapped.model.nv)
        self._index = np.arange(n_pos) if keep == "positions" else np.arange(n_pos, n_pos + n_vel)
        low = env.observation_space.low[self._index]
        high = env.observation_space.high[self._index]
        self.observation_space = gym.spaces.Box(low, high, dtype=env.observation_space.dtype)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[self._index]
