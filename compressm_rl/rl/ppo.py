"""The PPO update for recurrent policies (docs/design.md §5), read top to bottom.

``compute_gae`` turns a rollout's rewards into advantages; ``SequenceBatch`` cuts the
rollout into env-major sequences that start from their stored actor and critic states;
``ppo_update`` replays whole sequences with the episode-start mask (one scan per layer,
no Python loop over time) and takes clipped-surrogate steps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from compressm_rl.rl.config import PPOConfig
from compressm_rl.rl.distributed import SINGLE, World, average_gradients, mean_over_ranks
from compressm_rl.rl.rollout import Rollout
from policies.actor_critic import ActorCritic


def make_optimizer(policy: ActorCritic, lr: float) -> torch.optim.Adam:
    """Adam as CleanRL's PPO sets it (eps 1e-5)."""
    # fused: one kernel for all tensors instead of ~10 ops per tensor (2.9 -> 0.7 ms a step)
    return torch.optim.Adam(policy.parameters(), lr=lr, eps=1e-5, fused=True)


_ALIGN = 16  # float32 elements: 64 bytes


def gradient_buffer(params: list[torch.nn.Parameter]) -> Tensor:
    """One zeroed buffer for every gradient of ``params`` (one dtype and device): each
    ``p.grad`` becomes a view into it, and ``backward`` accumulates into those views in
    place. A gradient step then zeroes, all-reduces and clips one tensor instead of one
    per parameter (45 for the SSM policy), as DDP's ``gradient_as_bucket_view`` does.
    Each view starts 64-byte aligned (float32), as a tensor of its own would."""
    sizes = [-(-p.numel() // _ALIGN) * _ALIGN for p in params]
    flat = torch.zeros(sum(sizes), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p, size in zip(params, sizes, strict=True):
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += size
    return flat


def clip_flat_grad_norm_(flat_grads: Tensor, max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` on a ``gradient_buffer``: scale every gradient
    by ``min(1, max_norm / (‖g‖₂ + 1e-6))``, the global norm over all of them."""
    norm = torch.linalg.vector_norm(flat_grads)
    flat_grads.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))


def compute_gae(
    rewards: Tensor, values: Tensor, dones: Tensor, last_value: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over ``[T, N]``; ``dones[t]`` cuts the bootstrap
    after step t (truncations were already bootstrapped into the reward).

    Returns advantages and returns (advantages + values), both ``[T, N]``. The loop runs
    on numpy views (5x cheaper per step than on tiny torch tensors), on the CPU also for a
    learner on CUDA (a GPU kernel launch per step would cost more); the results are on
    ``values``' device.
    """
    r, v, d = (x.cpu().numpy() for x in (rewards, values, dones))
    last = last_value.cpu().numpy()
    adv = np.zeros_like(r)
    running = np.zeros_like(r[0])
    for t in reversed(range(len(r))):
        next_value = last if t == len(r) - 1 else v[t + 1]
        not_done = 1.0 - d[t]
        delta = r[t] + gamma * next_value * not_done - v[t]
        running = delta + gamma * lam * not_done * running
        adv[t] = running
    advantages = torch.from_numpy(adv).to(values.device)
    return advantages, advantages + values


def to_sequences(x: Tensor, seq_len: int) -> Tensor:
    """``[T, N, ...]`` -> ``[N * T/seq_len, seq_len, ...]`` (env-major segments)."""
    steps, n = x.shape[:2]
    x = x.transpose(0, 1).reshape(n, steps // seq_len, seq_len, *x.shape[2:])
    return x.reshape(n * (steps // seq_len), seq_len, *x.shape[3:])


@dataclass
class SequenceBatch:
    """A rollout as ``M`` sequences of ``L`` steps (``M = N·T/L``, env-major), each with
    the recurrent states it started from. ``batch[idx]`` selects sequences."""

    obs: Tensor  # [M, L, obs_dim] normalised
    actions: Tensor  # [M, L, act_dim]
    log_probs: Tensor  # [M, L] of the actions when sampled
    reset: Tensor  # [M, L] bool, episode starts
    values: Tensor  # [M, L] critic values when sampled
    advantages: Tensor  # [M, L]
    returns: Tensor  # [M, L]
    actor_state0: Tensor  # [M, S_actor] before each sequence's first step
    critic_state0: Tensor  # [M, S_critic]

    @classmethod
    def from_rollout(
        cls,
        rollout: Rollout,
        values: Tensor,
        advantages: Tensor,
        returns: Tensor,
        critic_segment_states: Tensor,
        seq_len: int,
    ) -> SequenceBatch:
        """Cut ``[T, N]`` rollout tensors into sequences; ``critic_segment_states``
        ``[K, N, S_critic]`` are the critic states at each segment start (``critic_pass``)."""
        n_segments, n_envs, critic_size = critic_segment_states.shape
        return cls(
            obs=to_sequences(rollout.obs, seq_len),
            actions=to_sequences(rollout.actions, seq_len),
            log_probs=to_sequences(rollout.log_probs, seq_len),
            reset=to_sequences(rollout.episode_start, seq_len),
            values=to_sequences(values, seq_len),
            advantages=to_sequences(advantages, seq_len),
            returns=to_sequences(returns, seq_len),
            actor_state0=to_sequences(rollout.actor_states, seq_len)[:, 0],
            critic_state0=critic_segment_states.transpose(0, 1).reshape(
                n_envs * n_segments, critic_size
            ),
        )

    def __len__(self) -> int:
        return self.obs.shape[0]

    def __getitem__(self, idx: Tensor) -> SequenceBatch:
        return SequenceBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def ppo_update(
    policy: ActorCritic,
    optimizer: torch.optim.Optimizer,
    batch: SequenceBatch,
    cfg: PPOConfig,
    world: World = SINGLE,
) -> dict[str, float]:
    """``cfg.epochs`` passes of clipped-surrogate PPO over minibatches of sequences.

    Each sequence is replayed from its stored actor and critic states with the
    episode-start mask, so the first forward pass reproduces the rollout's log-probs
    exactly. Returns the mean losses, entropy, approximate KL and clip fraction. With
    ``cfg.desired_kl`` the optimiser's lr is adapted before every step (``adapted_lr``)
    and stays adapted: it is the schedule, saved with the optimiser in checkpoints.

    Data-parallel (``world``): each rank steps on minibatches of its own rollout and the
    gradients are averaged over ranks before clipping, so a step sees ``world.size``
    minibatches (the global batch) at the same learning rate; the early stop on
    ``target_kl`` uses the mean KL over ranks. The returned stats are this rank's.
    """
    grads = gradient_buffer(list(policy.parameters()))  # every p.grad a view into it
    n_seq = len(batch)
    mb_size = max(1, n_seq // cfg.minibatches)
    stats: dict[str, list[float]] = {
        k: [] for k in ("pg_loss", "v_loss", "entropy", "approx_kl", "clipfrac")
    }
    for epoch in range(cfg.epochs):
        # Drawn on the CPU (the same stream on every device), moved once an epoch.
        order = torch.randperm(n_seq).to(batch.obs.device)
        for begin in range(0, n_seq, mb_size):
            mb = batch[order[begin : begin + mb_size]]
            log_prob, entropy, new_values = policy.evaluate(
                mb.obs, mb.actor_state0, mb.critic_state0, mb.reset, mb.actions
            )

            log_ratio = log_prob - mb.log_probs
            ratio = log_ratio.exp()
            with torch.no_grad():  # the k3 estimate of KL(rollout policy ‖ current), ≥ 0
                approx_kl = ((ratio - 1) - log_ratio).mean()
            # The first step of an update still has the rollout's policy (KL 0 but for
            # rounding): nothing to adapt to. Every rank must step at the same lr.
            if cfg.desired_kl is not None and (epoch, begin) != (0, 0):
                kl = mean_over_ranks(float(approx_kl), world)  # on CUDA: one more sync
                for group in optimizer.param_groups:
                    group["lr"] = adapted_lr(group["lr"], kl, cfg.desired_kl)
            adv = (mb.advantages - mb.advantages.mean()) / (mb.advantages.std() + 1e-8)
            pg_loss = torch.max(
                -adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)
            ).mean()
            # Clipped value loss, as in CleanRL and the PPO reference implementation.
            old_v, ret = mb.values, mb.returns
            v_clipped = old_v + (new_values - old_v).clamp(-cfg.clip_coef, cfg.clip_coef)
            v_loss = 0.5 * torch.max((new_values - ret).square(), (v_clipped - ret).square()).mean()
            entropy_mean = entropy.mean()
            loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy_mean

            grads.zero_()
            loss.backward()
            average_gradients(grads, world)  # a no-op in one process
            clip_flat_grad_norm_(grads, cfg.max_grad_norm)
            optimizer.step()

            with torch.no_grad():  # one read for the stats (on CUDA: one sync, not five)
                clipfrac = ((ratio - 1).abs() > cfg.clip_coef).float().mean()
                values = torch.stack([pg_loss, v_loss, entropy_mean, approx_kl, clipfrac])
                for key, value in zip(stats, values.tolist(), strict=True):
                    stats[key].append(value)
        per_epoch = -(-n_seq // mb_size)
        if cfg.target_kl is not None:
            kl = mean_over_ranks(float(np.mean(stats["approx_kl"][-per_epoch:])), world)
            if kl > cfg.target_kl:
                break
    return {k: float(np.mean(v)) for k, v in stats.items()}


# rsl_rl's adaptive schedule: its bounds, and the step factor of one adjustment.
ADAPTIVE_LR_BOUNDS = (1e-5, 1e-2)
ADAPTIVE_LR_FACTOR = 1.5


def adapted_lr(lr: float, kl: float, desired_kl: float) -> float:
    """rsl_rl's adaptive learning rate, applied before each minibatch's step: divided by
    1.5 when the KL from the rollout's policy exceeds ``2 · desired_kl``, multiplied by
    1.5 below ``desired_kl / 2``, kept within [1e-5, 1e-2].

    Why here: Adam moves every parameter by about the lr whatever its gradient's scale,
    so at one lr a policy with fewer parameters moves less per update (Hopper-v5-P: mean
    KL 0.010 after compression to 64 states per part against 0.013 at 128 per layer). A
    KL target gives every size the same step in policy space (what that did to returns:
    docs/design.md §5).
    """
    low, high = ADAPTIVE_LR_BOUNDS
    if kl > 2.0 * desired_kl:
        return max(low, lr / ADAPTIVE_LR_FACTOR)
    if kl < 0.5 * desired_kl:
        return min(high, lr * ADAPTIVE_LR_FACTOR)
    return lr


def explained_variance(values: Tensor, returns: Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] (1 is perfect, <= 0 useless)."""
    var = returns.var()
    return float("nan") if var == 0 else float(1 - (returns - values).var() / var)
