"""Task registry: env ids (with POMDP suffixes) and env factories.

An env id is a Gymnasium id, optionally with ``-P`` (positions only) or ``-V``
(velocities only): ``Hopper-v5-P``.
"""

from __future__ import annotations

import difflib

import gymnasium as gym

from envs.dynamics import Dynamics, RandomizedDynamics, parse_dynamics
from envs.pomdp import KeepPartObservation
from envs.vector import SameStepSyncVectorEnv

POMDP_SUFFIXES = {"-P": "positions", "-V": "velocities"}


# The tasks this project has presets for (their PPO settings live with the RL code,
# compressm_rl/rl/presets.yaml); any other Gymnasium id works too.
TASKS = (
    "InvertedPendulum-v5",
    "Hopper-v5",
    "HalfCheetah-v5",
    "Walker2d-v5",
    "Swimmer-v5",
    "Ant-v5",
    "Humanoid-v5",
    "Reacher-v5",
    "Pusher-v5",
)
# Those whose observation is [qpos, qvel, ...]: the ones with -P / -V variants.
POMDP_TASKS = TASKS[:7]


def split_env_id(env_id: str) -> tuple[str, str | None]:
    """``'Hopper-v5-P'`` -> ``('Hopper-v5', 'positions')``; plain ids -> ``(id, None)``."""
    for suffix, keep in POMDP_SUFFIXES.items():
        if env_id.endswith(suffix):
            return env_id[: -len(suffix)], keep
    return env_id, None


def known_env_ids() -> list[str]:
    """Gymnasium ids plus the POMDP variants of the project's tasks."""
    ids = list(gym.registry.keys())
    ids += [base + suffix for base in POMDP_TASKS for suffix in POMDP_SUFFIXES]
    return ids


def check_env_id(env_id: str) -> str:
    """Return the Gymnasium id behind ``env_id`` or raise a ValueError naming close matches."""
    base, keep = split_env_id(env_id)
    if keep and base in TASKS and base not in POMDP_TASKS:
        raise ValueError(
            f"{env_id!r}: {base}'s observation is not [positions, velocities], so it has no "
            f"-P / -V variant; use {base} (variants exist for {', '.join(POMDP_TASKS)})"
        )
    if base in gym.registry:
        return base
    close = difflib.get_close_matches(env_id, known_env_ids(), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown env id {env_id!r}.{hint} Tasks with presets: {', '.join(TASKS)} "
        f"(append -P or -V for the positions-only / velocities-only variants)."
    )


def make_env(env_id: str, dynamics: Dynamics | str | None = None, **kwargs) -> gym.Env:
    """One env, with the POMDP wrapper when the id asks for it and, outermost, the
    randomized-dynamics wrapper when ``dynamics`` (a ``Dynamics`` or its spec string,
    ``envs.dynamics.parse_dynamics``) randomizes anything; None, ``''`` and ``'none'``
    build exactly the plain env."""
    dynamics = parse_dynamics(dynamics)  # a bad spec fails before anything is built
    base = check_env_id(env_id)
    _, keep = split_env_id(env_id)
    env = gym.make(base, **kwargs)
    env = KeepPartObservation(env, keep) if keep else env
    return env if dynamics.is_none else RandomizedDynamics(env, dynamics)


def make_vec_env(
    env_id: str,
    num_envs: int,
    seed: int,
    num_workers: int = 0,
    physics_threads: int = 1,
    dynamics: Dynamics | str | None = None,
    **env_kwargs,
) -> gym.vector.VectorEnv:
    """``num_envs`` copies in SAME_STEP autoreset mode; ``reset(seed=seed)`` seeds them
    ``seed, seed+1, ...`` (Gymnasium vector-env convention).

    SAME_STEP: the step that ends an episode returns the next episode's first observation
    and puts the last one in ``info["final_obs"]`` (for bootstrapping truncations).
    ``num_workers > 0`` runs the envs in subprocesses (``AsyncVectorEnv``), else in this
    process (``envs.vector.SameStepSyncVectorEnv``: ``info`` holds only ``final_obs``);
    there ``physics_threads > 1`` runs the locomotion tasks' ``mj_step`` on that many
    threads (``envs.physics``, bit-identical). ``dynamics`` randomizes each env's own
    model per episode (``make_env``; env i's draws follow its reset seed ``seed + i``).
    ``env_kwargs`` go to ``gymnasium.make`` (e.g. ``max_episode_steps``).
    """
    check_env_id(env_id)
    dynamics = parse_dynamics(dynamics)
    fns = [lambda: make_env(env_id, dynamics, **env_kwargs) for _ in range(num_envs)]
    if num_workers > 0:
        envs = gym.vector.AsyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    else:
        envs = SameStepSyncVectorEnv(fns, physics_threads=physics_threads)
    envs.action_space.seed(seed)
    return envs
