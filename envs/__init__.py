"""Gymnasium MuJoCo tasks: registry, vector-env factory, POMDP wrappers,
randomized dynamics.

Imports nothing else of this project (docs/design.md §1).
"""

from envs.dynamics import PRESETS, Dynamics, RandomizedDynamics, parse_dynamics, parse_grid
from envs.pomdp import KeepPartObservation
from envs.tasks import TASKS, check_env_id, make_env, make_vec_env, split_env_id

__all__ = [
    "PRESETS",
    "TASKS",
    "Dynamics",
    "KeepPartObservation",
    "RandomizedDynamics",
    "check_env_id",
    "make_env",
    "make_vec_env",
    "parse_dynamics",
    "parse_grid",
    "split_env_id",
]
