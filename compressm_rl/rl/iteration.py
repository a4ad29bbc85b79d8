"""One PPO iteration: rollout → critic pass → GAE → update. The runner, the benchmarks and
the tests all call ``iteration``; nothing else strings these steps together."""

from __future__ import annotations

import time
from dataclasses import dataclass

import gymnasium as gym
from torch import Tensor

from compressm_rl.rl.config import PPOConfig
from compressm_rl.rl.distributed import SINGLE, World
from compressm_rl.rl.ppo import SequenceBatch, compute_gae, ppo_update
from compressm_rl.rl.rollout import EnvCarry, Rollout, collect_rollout, critic_pass
from policies.actor_critic import ActorCritic, RecurrentState
from policies.normalizer import RunningNormalizer

PHASES = ("rollout", "critic pass", "gae", "update")


@dataclass
class IterationResult:
    """What one iteration produced, for logging and for the compression guards."""

    rollout: Rollout
    values: Tensor  # [T, N] critic values during the rollout
    returns: Tensor  # [T, N] GAE returns (the critic's targets)
    stats: dict[str, float]  # losses, entropy, approx KL, clip fraction (``ppo_update``)
    seconds: dict[str, float]  # wall-clock per phase (``PHASES``)


def iteration(
    policy: ActorCritic,
    optimizer,
    envs: gym.vector.VectorEnv,
    carry: EnvCarry,
    reward_norm: RunningNormalizer | None,
    cfg: PPOConfig,
    world: World = SINGLE,
) -> IterationResult:
    """Collect ``cfg.rollout_steps`` steps of every env, then update ``policy`` in place.

    ``carry`` (the envs' observations, episode bookkeeping and recurrent state) is
    advanced to the end of the rollout, the critic's state included; it stays on the CPU.
    The policy and ``optimizer`` may live on another device (CUDA): the rollout steps a
    CPU copy of the actor, and the result's tensors are on the policy's device. With
    data parallelism (``world`` of several ranks) the normalisers and gradients are
    shared (``compressm_rl.rl.distributed``).
    """
    t0 = time.perf_counter()
    rollout = collect_rollout(policy, envs, carry, cfg.rollout_steps, reward_norm, cfg.gamma, world)
    # The rollout stepped on the CPU; the critic pass and the update run where the policy
    # is: its tensors move there here, once each (nothing moves on the CPU).
    rollout = rollout.to(policy.log_std.device)
    t1 = time.perf_counter()
    critic = critic_pass(policy, rollout, cfg.seq_len, cfg.gamma)
    carry.state = RecurrentState(carry.state.actor, critic.final_state.cpu())  # carry: CPU
    t2 = time.perf_counter()
    advantages, returns = compute_gae(
        critic.rewards, critic.values, rollout.dones, critic.last_value, cfg.gamma, cfg.gae_lambda
    )
    t3 = time.perf_counter()
    batch = SequenceBatch.from_rollout(
        rollout, critic.values, advantages, returns, critic.segment_states, cfg.seq_len
    )
    stats = ppo_update(policy, optimizer, batch, cfg, world)
    t4 = time.perf_counter()
    seconds = dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True))
    return IterationResult(rollout, critic.values, returns, stats, seconds)
