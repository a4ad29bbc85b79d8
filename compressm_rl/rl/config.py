"""PPO settings: one typed, validated ``PPOConfig``, and per-task presets kept as data.

The presets live in ``presets.yaml`` next to this file (RL Zoo's ``hyperparams/ppo.yml``
idea): a task's settings are ``PPOConfig``'s defaults with that file's values on top,
and a run's own overrides on top of those (``preset_for(env_id).with_overrides(...)``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from pathlib import Path

import yaml

from compressm_rl.settings import check_types, setting
from envs.tasks import split_env_id

PRESETS_FILE = Path(__file__).with_name("presets.yaml")


@dataclass(frozen=True)
class PPOConfig:
    """Recurrent PPO settings. Times are env steps summed over all envs.

    Every value is checked when the config is built: a ``ValueError`` names the field,
    the value and the valid range.
    """

    total_steps: int = setting(1_000_000, "env steps, all envs and ranks", flag="--total-steps")
    num_envs: int = setting(8, "envs stepped together (per rank)", flag="--num-envs")
    rollout_steps: int = setting(256, "steps per env and iteration")
    seq_len: int = setting(64, "steps per replayed sequence (divides rollout_steps)")
    epochs: int = setting(10, "passes over each rollout")
    minibatches: int = setting(4, "minibatches per epoch")
    lr: float = setting(3e-4, "Adam learning rate")
    anneal_lr: bool = setting(True, "anneal the lr linearly to 0 over the run")
    gamma: float = setting(0.99, "discount")
    gae_lambda: float = setting(0.95, "GAE λ")
    clip_coef: float = setting(0.2, "PPO's ratio clip")
    ent_coef: float = setting(0.0, "entropy bonus")
    vf_coef: float = setting(0.5, "value loss weight")
    max_grad_norm: float = setting(0.5, "gradient clip (global norm)")
    target_kl: float | None = setting(None, "stop an iteration's epochs above this approximate KL")
    # rsl_rl's adaptive schedule: the lr follows each minibatch's KL (ppo.adapted_lr)
    desired_kl: float | None = setting(
        None, "rsl_rl's adaptive lr: follow each minibatch's KL toward this (anneal_lr off)"
    )
    norm_reward: bool = setting(True, "scale rewards by the running return's std")
    init_log_std: float = setting(0.0, "the action distribution's initial log σ")

    def __post_init__(self) -> None:
        check_types(self, "ppo ")
        checks = {
            "num_envs": (1 <= self.num_envs <= 4096, "1 to 4096"),
            "rollout_steps": (1 <= self.rollout_steps <= 100_000, "1 to 100000"),
            "seq_len": (
                1 <= self.seq_len <= self.rollout_steps and self.rollout_steps % self.seq_len == 0,
                f"a divisor of rollout_steps = {self.rollout_steps}",
            ),
            "total_steps": (
                self.total_steps >= self.steps_per_iteration,
                f"at least one iteration, num_envs × rollout_steps = {self.steps_per_iteration}",
            ),
            "epochs": (1 <= self.epochs <= 1000, "1 to 1000"),
            "minibatches": (
                1 <= self.minibatches <= self.sequences_per_iteration,
                f"between 1 and the {self.sequences_per_iteration} sequences of an iteration",
            ),
            "lr": (self.lr > 0 and math.isfinite(self.lr), "a positive number"),
            "gamma": (0 < self.gamma <= 1, "in (0, 1]"),
            "gae_lambda": (0 <= self.gae_lambda <= 1, "in [0, 1]"),
            "clip_coef": (self.clip_coef > 0, "a positive number"),
            "ent_coef": (self.ent_coef >= 0, "0 or more"),
            "vf_coef": (self.vf_coef >= 0, "0 or more"),
            "max_grad_norm": (self.max_grad_norm > 0, "a positive number"),
            "target_kl": (self.target_kl is None or self.target_kl > 0, "None or positive"),
            "desired_kl": (self.desired_kl is None or self.desired_kl > 0, "None or positive"),
            "init_log_std": (math.isfinite(self.init_log_std), "a finite number"),
        }
        for name, (ok, valid) in checks.items():
            if not ok:
                raise ValueError(f"ppo {name} = {getattr(self, name)!r} is out of range: {valid}")
        if self.desired_kl is not None and self.anneal_lr:
            raise ValueError(
                "ppo desired_kl adapts the learning rate and anneal_lr (true by default) "
                "anneals it: set anneal_lr: false to use desired_kl"
            )

    @property
    def steps_per_iteration(self) -> int:
        """Env steps of one rollout, all envs together."""
        return self.num_envs * self.rollout_steps

    @property
    def sequences_per_iteration(self) -> int:
        """Sequences of ``seq_len`` steps the update replays each epoch."""
        return self.num_envs * (self.rollout_steps // max(1, self.seq_len))

    @property
    def num_iterations(self) -> int:
        return self.total_steps // self.steps_per_iteration

    def with_overrides(self, **overrides) -> PPOConfig:
        """A copy with the non-None ``overrides`` applied (an unknown key is an error)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown PPO setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def _preset_table() -> dict[str, dict]:
    table = yaml.safe_load(PRESETS_FILE.read_text()) or {}
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"{PRESETS_FILE} must map task ids to mappings of PPO settings")
    return table


def preset_tasks() -> list[str]:
    """Task ids with a preset (their POMDP variants share it)."""
    return list(_preset_table())


def preset_entries(env_id: str) -> dict:
    """The task's own ``presets.yaml`` entries (its base task's for a POMDP variant)."""
    base, _ = split_env_id(env_id)
    return dict(_preset_table().get(base, {}))


def preset_for(env_id: str) -> PPOConfig:
    """The task's PPO settings (POMDP variants use their base task's; defaults otherwise)."""
    return PPOConfig().with_overrides(**preset_entries(env_id))
