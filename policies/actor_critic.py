"""Actor-critic policies with an explicit recurrent state: SSM (LRU stacks) and MLP.

Both share one interface, so PPO, export and evaluation never ask which one they hold.

- Observations are normalised inside the policy (``obs_norm``, running statistics as
  buffers); the caller passes raw observations to ``predict``/``act`` and already
  normalised ones to the sequence methods used by PPO (they were stored that way).
- The recurrent state is a pair of flat float tensors ``RecurrentState(actor, critic)``,
  ``[B, S_actor]`` and ``[B, S_critic]`` (``S = 0`` for the MLP). Zeros = episode start.
  ``episode_start`` flags zero a row's state before the step, as in SB3's RecurrentPPO.
- Actions: a Gaussian with state-independent log-std over unbounded actions; the env
  receives them clipped to ``[action_low, action_high]``; the deterministic action is
  the clipped mean.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from policies.lru import LRUStack, grouped_forward
from policies.normalizer import RunningNormalizer


class RecurrentState(NamedTuple):
    """Per-env recurrent state: ``actor`` ``[B, S_actor]``, ``critic`` ``[B, S_critic]``."""

    actor: Tensor
    critic: Tensor


class MLPBody(nn.Module):
    """Feed-forward body with the recurrent interface and a zero-size state."""

    def __init__(self, in_dim: int, width: int, layers: int = 2) -> None:
        super().__init__()
        dims = [in_dim] + [width] * layers
        mods: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            mods += [nn.Linear(d_in, d_out), nn.Tanh()]
        self.net = nn.Sequential(*mods)
        self.width = width
        self.state_dims: list[int] = []
        self.state_size = 0

    def initial_state(self, batch: int, device: torch.device | None = None) -> Tensor:
        return torch.zeros(batch, 0, device=device)

    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        reset: Tensor | None = None,
        return_state: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        if state is None and return_state:
            state = self.initial_state(x.shape[0], x.device)
        return self.net(x), state if return_state else None

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x), state

    def frozen_step(self) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``step`` itself: an MLP has nothing to precompute (so it reads live weights)."""
        return self.step


def _zero_where(state: Tensor, episode_start: Tensor | None) -> Tensor:
    if episode_start is None:
        return state
    return state * (~episode_start.bool()).to(state.dtype)[:, None]


class ActorCritic(nn.Module):
    """Gaussian actor and value critic, each with its own body (LRU stack or MLP).

    Args:
        obs_dim, act_dim: sizes of the env's observation and action vectors.
        action_low, action_high: the action space bounds ``[act_dim]``.
        policy: ``"ssm"`` (LRU stacks) or ``"mlp"``.
        width: H, features per layer.
        state_dims: n per LRU layer (``"ssm"`` only), e.g. ``[128, 128]``.
        critic_state_dims: the critic's n per layer if it differs (compression shrinks
            actor and critic layers separately); defaults to ``state_dims``.
        mlp_layers: hidden layers for ``"mlp"``.
        init_log_std: initial log standard deviation of the action noise.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        action_low: np.ndarray | Tensor,
        action_high: np.ndarray | Tensor,
        policy: str = "ssm",
        width: int = 64,
        state_dims: list[int] | tuple[int, ...] = (128, 128),
        critic_state_dims: list[int] | tuple[int, ...] | None = None,
        mlp_layers: int = 2,
        init_log_std: float = 0.0,
    ) -> None:
        super().__init__()
        if policy not in ("ssm", "mlp"):
            raise ValueError(f"policy must be 'ssm' or 'mlp', got {policy!r}")
        self.policy_type = policy
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.obs_norm = RunningNormalizer(obs_dim)
        if policy == "ssm":
            self.actor = LRUStack(obs_dim, width, list(state_dims))
            self.critic = LRUStack(obs_dim, width, list(critic_state_dims or state_dims))
        else:
            self.actor = MLPBody(obs_dim, width, mlp_layers)
            self.critic = MLPBody(obs_dim, width, mlp_layers)
        self.actor_head = nn.Linear(width, act_dim)
        self.critic_head = nn.Linear(width, 1)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))
        # Small last layers (CleanRL's orthogonal 0.01 / 1.0 gains): near-zero initial actions.
        nn.init.orthogonal_(self.actor_head.weight, gain=0.01)
        nn.init.zeros_(self.actor_head.bias)
        nn.init.orthogonal_(self.critic_head.weight, gain=1.0)
        nn.init.zeros_(self.critic_head.bias)
        self.register_buffer("action_low", torch.as_tensor(action_low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(action_high, dtype=torch.float32))

    # ----- state -------------------------------------------------------------------
    def initial_state(self, batch: int, device: torch.device | None = None) -> RecurrentState:
        """Zero state for ``batch`` envs (every episode at its start)."""
        return RecurrentState(
            self.actor.initial_state(batch, device), self.critic.initial_state(batch, device)
        )

    def architecture(self) -> dict:
        """What is needed to rebuild this module before ``load_state_dict``
        (``from_architecture``)."""
        return {
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "policy": self.policy_type,
            "width": self.actor.width,
            "actor_state_dims": list(self.actor.state_dims),
            "critic_state_dims": list(self.critic.state_dims),
            "mlp_layers": len(self.actor.net) // 2 if self.policy_type == "mlp" else None,
        }

    @classmethod
    def from_architecture(
        cls, arch: dict, action_low: np.ndarray | Tensor, action_high: np.ndarray | Tensor
    ) -> ActorCritic:
        """An untrained module shaped as ``architecture()`` described; load its weights next."""
        return cls(
            arch["obs_dim"],
            arch["act_dim"],
            action_low,
            action_high,
            policy=arch["policy"],
            width=arch["width"],
            state_dims=arch["actor_state_dims"] or [1],
            critic_state_dims=arch["critic_state_dims"] or None,
            mlp_layers=arch.get("mlp_layers") or 2,
        )

    # ----- step mode (rollouts, deployment) ----------------------------------------
    def act(
        self,
        obs_norm: Tensor,
        actor_state: Tensor,
        episode_start: Tensor | None = None,
        deterministic: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One actor step on normalised observations.

        Args:
            obs_norm: ``[B, obs_dim]`` normalised observations.
            actor_state: ``[B, S_actor]`` state after the previous step.
            episode_start: bool ``[B]``; True zeroes that row's state first.
            deterministic: return the mean instead of a sample.

        Returns:
            ``action`` ``[B, act_dim]`` (unclipped sample, or clipped mean when
            deterministic), its ``log_prob`` ``[B]``, and the new actor state.
        """
        features, actor_state = self.actor.step(obs_norm, _zero_where(actor_state, episode_start))
        mean = self.actor_head(features)
        std = self.log_std.exp().expand_as(mean)
        if deterministic:
            action = torch.maximum(torch.minimum(mean, self.action_high), self.action_low)
            return action, torch.zeros(mean.shape[0], device=mean.device), actor_state
        action = mean + std * torch.randn_like(mean)
        return action, gaussian_log_prob(action, mean, self.log_std), actor_state

    @torch.no_grad()
    def rollout_actor(
        self, deterministic: bool = False
    ) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
        """``act(obs_norm, actor_state, episode_start)`` with the weights read once (the
        SSM's; an MLP's are read live), stochastic or ``deterministic`` (then the clipped
        mean, and log-probs 0, as ``act``): for a rollout or an evaluation, during which
        the weights are fixed (PPO updates only between rollouts). Same outputs as ``act``
        up to float32 rounding, no autograd; stale after an update.

        Always a CPU step: a policy on another device (the learner on CUDA) is copied
        to the CPU once here. A rollout steps 8 envs at a time, and at batch 8 a step on
        the CPU (37-86 µs, one fused kernel call; design.md §10) costs less than
        the GPU round trips it would replace.
        """
        if self.log_std.device.type != "cpu":
            return copy.deepcopy(self).cpu().rollout_actor(deterministic)
        step = self.actor.frozen_step()
        head_w, head_b = self.actor_head.weight.T.clone(), self.actor_head.bias.clone()
        low, high = self.action_low.clone(), self.action_high.clone()
        std = self.log_std.exp()
        log_norm = (self.log_std + 0.5 * math.log(2 * math.pi)).sum()

        @torch.no_grad()
        def act(
            obs_norm: Tensor, actor_state: Tensor, episode_start: Tensor | None = None
        ) -> tuple[Tensor, Tensor, Tensor]:
            features, actor_state = step(obs_norm, _zero_where(actor_state, episode_start))
            mean = torch.addmm(head_b, features, head_w)
            if deterministic:
                action = torch.maximum(torch.minimum(mean, high), low)
                return action, torch.zeros(mean.shape[0]), actor_state
            noise = torch.randn_like(mean)
            # log N(mean + std·ε; mean, std) = -ε²/2 - log std - log √(2π), summed
            return (
                torch.addcmul(mean, std, noise),
                -0.5 * noise.square().sum(-1) - log_norm,
                actor_state,
            )

        return act

    @torch.no_grad()
    def predict(
        self,
        obs: np.ndarray,
        state: RecurrentState | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, RecurrentState]:
        """SB3-style inference on raw observations ``[B, obs_dim]`` (or ``[obs_dim]``).

        ``state`` None means every row starts an episode. Returns actions within the action
        bounds and the state to pass to the next call. The critic state is passed through.
        """
        single = np.ndim(obs) == 1
        obs_t = torch.as_tensor(np.atleast_2d(obs), dtype=torch.float32)
        if state is None:
            state = self.initial_state(obs_t.shape[0])
        start = None if episode_start is None else torch.as_tensor(episode_start, dtype=torch.bool)
        action, _, actor_state = self.act(self.obs_norm(obs_t), state.actor, start, deterministic)
        action = torch.maximum(torch.minimum(action, self.action_high), self.action_low)
        out = action.numpy()
        return (out[0] if single else out), RecurrentState(actor_state, state.critic)

    # ----- sequence mode (PPO update) ----------------------------------------------
    def evaluate_actions(
        self, obs_norm: Tensor, actor_state: Tensor, reset: Tensor, actions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Log-probs ``[B, T]`` and entropy ``[B, T]`` of ``actions`` ``[B, T, act_dim]``,
        replaying the actor over ``obs_norm`` ``[B, T, obs_dim]`` from ``actor_state``
        ``[B, S_actor]`` with ``reset`` bool ``[B, T]`` marking episode starts."""
        features, _ = self.actor(obs_norm, actor_state, reset, return_state=False)
        return self._action_log_prob(features, actions)

    def _action_log_prob(self, features: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.actor_head(features)
        log_prob = gaussian_log_prob(actions, mean, self.log_std)
        entropy = (0.5 + 0.5 * math.log(2 * math.pi) + self.log_std).sum().expand(log_prob.shape)
        return log_prob, entropy

    def evaluate(
        self,
        obs_norm: Tensor,
        actor_state: Tensor,
        critic_state: Tensor,
        reset: Tensor,
        actions: Tensor,
        grouped: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``evaluate_actions`` and ``values`` at once (a PPO gradient step needs both):
        log-probs, entropy and values, each ``[B, T]``. With ``grouped`` (and two LRU
        stacks) actor and critic run as one batched pass (``policies.lru.grouped_forward``);
        ``grouped=False`` is the reference path, one stack after the other."""
        if grouped and _groupable(self.actor, self.critic):
            actor_features, critic_features = grouped_forward(
                [self.actor, self.critic], obs_norm, [actor_state, critic_state], reset
            )
            log_prob, entropy = self._action_log_prob(actor_features, actions)
            return log_prob, entropy, self.critic_head(critic_features).squeeze(-1)
        log_prob, entropy = self.evaluate_actions(obs_norm, actor_state, reset, actions)
        values, _ = self.values(obs_norm, critic_state, reset, return_state=False)
        return log_prob, entropy, values

    def values(
        self, obs_norm: Tensor, critic_state: Tensor, reset: Tensor, return_state: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Values ``[B, T]`` over a sequence, and the critic state after its last step
        (None with ``return_state=False``)."""
        features, critic_state = self.critic(obs_norm, critic_state, reset, return_state)
        return self.critic_head(features).squeeze(-1), critic_state


def _groupable(actor: nn.Module, critic: nn.Module) -> bool:
    """Whether ``grouped_forward`` can run the two bodies in one pass."""
    return (
        isinstance(actor, LRUStack)
        and isinstance(critic, LRUStack)
        and len(actor.blocks) == len(critic.blocks)
        and actor.width == critic.width
    )


def gaussian_log_prob(action: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Log-density of a diagonal Gaussian, summed over the last axis."""
    z = (action - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
