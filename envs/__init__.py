"""Gymnasium MuJoCo tasks: registry, vector-env factory, POMDP wrappers.

Imports nothing else of this project (docs/design.md §1).
"""

from envs.pomdp import KeepPartObservation
from envs.tasks import TASKS, check_env_id, make_env, make_vec_env, split_env_id

__all__ = [
    "TASKS",
    "KeepPartObservation",
    "check_env_id",
    "make_env",
    "make_vec_env",
    "split_env_id",
]
