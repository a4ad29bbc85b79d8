"""Gymnasium MuJoCo tasks: registry with presets, vector-env factory, POMDP wrappers.

Imports nothing else of this project (see DESIGN.md §1).
"""

from envs.pomdp import KeepPartObservation
from envs.tasks import PRESETS, TaskPreset, check_env_id, make_env, make_vec_env, preset_for

__all__ = [
    "PRESETS",
    "KeepPartObservation",
    "TaskPreset",
    "check_env_id",
    "make_env",
    "make_vec_env",
    "preset_for",
]
