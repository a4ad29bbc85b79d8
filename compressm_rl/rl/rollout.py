"""Experience for recurrent PPO (docs/design.md §5): the rollout, then the critic pass.

``collect_rollout`` steps the envs with the actor alone (its weights read once, in real
form) and stores each step's actor state; ``critic_pass`` then computes every value with
one scan per sequence segment and bootstraps truncated episodes from ``final_obs``.

Gymnasium runs in SAME_STEP autoreset mode: the step that ends an episode returns the
next episode's first observation, and the last one is ``info["final_obs"]``. So
``episode_start[t]`` marks a step whose observation begins an episode, and ``done[t]``
marks a step whose transition ended one (terminated or truncated).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from compressm_rl.rl.distributed import (
    SINGLE,
    World,
    merge_normalizer,
    statistics,
    sync_normalizer,
)
from policies.actor_critic import ActorCritic, RecurrentState
from policies.normalizer import RunningNormalizer


@dataclass
class EnvCarry:
    """What survives from one rollout to the next for each of the N envs."""

    obs: np.ndarray  # [N, obs_dim] raw observation to act on next
    episode_start: np.ndarray  # bool [N]: obs begins an episode
    state: RecurrentState  # state before acting on obs (not yet masked)
    episode_return: np.ndarray  # [N] raw return of the ongoing episodes
    episode_length: np.ndarray  # [N]
    discounted_return: np.ndarray  # [N] for reward scaling


@dataclass
class Rollout:
    """T steps of N envs; tensors are time-major ``[T, N, ...]``."""

    obs: Tensor  # [T, N, obs_dim] normalised with the statistics frozen for this rollout
    actions: Tensor  # [T, N, act_dim] unclipped samples
    log_probs: Tensor  # [T, N]
    rewards: Tensor  # [T, N] scaled, before the critic pass bootstraps truncations
    dones: Tensor  # [T, N] float: the transition at t ended the episode
    episode_start: Tensor  # [T, N] bool: reset mask for the scans
    actor_states: Tensor  # [T, N, S_actor] state before step t (before the reset mask)
    critic_state0: Tensor  # [N, S_critic] critic state before step 0
    truncations: list[tuple[int, int, Tensor]]  # (t, env, final_obs normalised)
    next_obs: Tensor  # [N, obs_dim] normalised obs after the last step
    next_episode_start: Tensor  # [N] bool
    finished_returns: list[float]
    finished_lengths: list[int]

    def to(self, device: torch.device | str) -> Rollout:
        """This rollout with its tensors on ``device``: one transfer per tensor (the
        truncations' final observations stacked into one), made once per iteration
        between the rollout, which steps on the CPU, and the learner's passes. On the
        device they are already on, the same tensors (no copy)."""
        finals = [final for _, _, final in self.truncations]
        if finals and finals[0].device.type != torch.device(device).type:
            finals = list(torch.stack(finals).to(device).unbind())
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
            truncations=[(t, i, x) for (t, i, _), x in zip(self.truncations, finals, strict=True)],
        )


def start_carry(policy: ActorCritic, envs: gym.vector.VectorEnv, obs: np.ndarray) -> EnvCarry:
    """The carry for freshly reset envs."""
    n = envs.num_envs
    return EnvCarry(
        obs=obs,
        episode_start=np.ones(n, dtype=bool),
        state=policy.initial_state(n),
        episode_return=np.zeros(n),
        episode_length=np.zeros(n, dtype=np.int64),
        discounted_return=np.zeros(n),
    )


@torch.no_grad()
def collect_rollout(
    policy: ActorCritic,
    envs: gym.vector.VectorEnv,
    carry: EnvCarry,
    steps: int,
    reward_norm: RunningNormalizer | None,
    gamma: float,
    world: World = SINGLE,
) -> Rollout:
    """Step ``envs`` for ``steps`` steps with the stochastic actor; updates ``carry`` in place.

    Observation statistics stay frozen during the rollout (so the update replays exactly
    what the actor saw) and are updated from the raw observations afterwards; with data
    parallelism from every rank's (``world``), so that all ranks keep the same statistics.
    """
    # One loop on purpose (CleanRL's style): the SAME_STEP bookkeeping of an env step —
    # which flags, returns and final observations belong to which episode — reads in
    # one place; helpers per step would also cost ~1 µs each at 2,048 steps.
    raw_obs, obs, actions, log_probs, rewards, dones, starts, states = ([] for _ in range(8))
    discounted: list[np.ndarray] = []
    truncations: list[tuple[int, int, Tensor]] = []  # (t, env, final obs normalised)
    finished_returns, finished_lengths = [], []
    critic_state0 = carry.state.critic.clone()
    actor_state = carry.state.actor
    low, high = envs.single_action_space.low, envs.single_action_space.high
    # The weights and observation statistics are fixed until the update: read them once.
    act, normalize = policy.rollout_actor(), policy.obs_norm.frozen()
    for t in range(steps):
        obs_t = normalize(carry.obs)
        start_t = torch.from_numpy(carry.episode_start)
        states.append(actor_state)
        action, log_prob, actor_state = act(
            obs_t, actor_state, start_t if carry.episode_start.any() else None
        )
        next_obs, reward, terminated, truncated, info = envs.step(
            np.clip(action.numpy(), low, high)
        )
        done = terminated | truncated

        carry.episode_return += reward
        carry.episode_length += 1
        carry.discounted_return = carry.discounted_return * gamma + reward
        discounted.append(carry.discounted_return.copy())  # zeroed below where done
        for i in np.flatnonzero(done):
            finished_returns.append(float(carry.episode_return[i]))
            finished_lengths.append(int(carry.episode_length[i]))
            if truncated[i] and not terminated[i]:
                truncations.append((t, int(i), normalize(info["final_obs"][i])))
        carry.episode_return[done] = 0.0
        carry.episode_length[done] = 0
        carry.discounted_return[done] = 0.0

        raw_obs.append(carry.obs)
        obs.append(obs_t)
        actions.append(action)
        log_probs.append(log_prob)
        rewards.append(reward)
        dones.append(done)
        starts.append(start_t)
        carry.obs, carry.episode_start = next_obs, done

    carry.state = RecurrentState(actor_state, carry.state.critic)  # critic advanced later
    next_obs_t = normalize(carry.obs)
    sync_normalizer(policy.obs_norm, np.stack(raw_obs), world)
    scaled_rewards = _scale_rewards(np.stack(rewards), np.stack(discounted), reward_norm, world)
    return Rollout(
        obs=torch.stack(obs),
        actions=torch.stack(actions),
        log_probs=torch.stack(log_probs),
        rewards=torch.as_tensor(scaled_rewards, dtype=torch.float32),
        dones=torch.as_tensor(np.stack(dones), dtype=torch.float32),
        episode_start=torch.stack(starts),
        actor_states=torch.stack(states),
        critic_state0=critic_state0,
        truncations=truncations,
        next_obs=next_obs_t,
        next_episode_start=torch.as_tensor(carry.episode_start),
        finished_returns=finished_returns,
        finished_lengths=finished_lengths,
    )


def _scale_rewards(
    rewards: np.ndarray,
    returns_seen: np.ndarray,
    reward_norm: RunningNormalizer | None,
    world: World,
) -> np.ndarray:
    """``[T, N]`` rewards scaled: step t's divided by the std of the discounted returns
    seen up to and including step t (SB3's VecNormalize), for all steps at once, and
    clipped to ±10; unchanged without ``reward_norm``. With data parallelism the scale
    within the rollout is this rank's; the statistics carried on are merged from every
    rank's returns."""
    if reward_norm is None:
        return rewards
    before = statistics(reward_norm) if world.distributed else None
    variances = reward_norm.update_each(returns_seen)
    if world.distributed:
        merge_normalizer(reward_norm, before, returns_seen, world)
    scale = np.sqrt(variances + reward_norm.eps)[:, None]
    return np.clip(rewards / scale, -10, 10)


class CriticPass(NamedTuple):
    """The critic over one rollout (``critic_pass``); ``[T, N]`` is time-major."""

    values: Tensor  # [T, N]
    last_value: Tensor  # [N], of the observation after the last step
    segment_states: Tensor  # [K, N, S_critic], critic state at each segment start
    final_state: Tensor  # [N, S_critic], after step T-1: the next rollout starts here
    rewards: Tensor  # [T, N], the rollout's rewards with truncations bootstrapped


@torch.no_grad()
def critic_pass(policy: ActorCritic, rollout: Rollout, seq_len: int, gamma: float) -> CriticPass:
    """Values of a whole rollout with one critic scan per ``seq_len`` segment.

    The returned rewards have ``gamma * V(final_obs)`` added at every truncated (not
    terminated) step, replaying that env's critic from the rollout start up to the final
    observation; ``rollout.rewards`` is left as it was.
    """
    obs = rollout.obs.transpose(0, 1)  # [N, T, obs]
    reset = rollout.episode_start.transpose(0, 1)
    state = rollout.critic_state0
    values, seg_states = [], []
    for start in range(0, obs.shape[1], seq_len):
        seg_states.append(state)
        v, state = policy.values(
            obs[:, start : start + seq_len], state, reset[:, start : start + seq_len]
        )
        values.append(v)
    values_nt = torch.cat(values, dim=1)
    last_value, _ = policy.values(
        rollout.next_obs[:, None], state, rollout.next_episode_start[:, None]
    )

    rewards = rollout.rewards.clone()
    for t, i, final_obs in rollout.truncations:
        seq = torch.cat([obs[i, : t + 1], final_obs[None]])[None]
        no_reset = torch.zeros(1, dtype=torch.bool, device=reset.device)
        seq_reset = torch.cat([reset[i, : t + 1], no_reset])[None]
        v_final, _ = policy.values(seq, rollout.critic_state0[i : i + 1], seq_reset)
        rewards[t, i] += gamma * v_final[0, -1]
    return CriticPass(
        values_nt.T.contiguous(), last_value[:, 0], torch.stack(seg_states), state, rewards
    )
