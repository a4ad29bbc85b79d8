"""Measurements of an actor-critic on a rollout, for the compression guards: what each
LRU layer sees and says (``record_layers``), a reduced layer's output error on that
(``reduced_output_error``), and the actions' KL between a policy and a trial copy with
some layers reduced (``trial_policy``, ``action_kl``)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from compressm_rl.compression.events import LayerRef
from compressm_rl.compression.lti import ReductionResult
from policies.actor_critic import ActorCritic
from policies.lru import LRU, LRUStack


@torch.no_grad()
def record_layers(
    policy: ActorCritic, parts: list[str] | tuple[str, ...], obs: Tensor, reset: Tensor
) -> dict[LayerRef, tuple[Tensor, Tensor]]:
    """What each LRU layer sees and says over sequences ``obs [B, T, obs]`` from zero
    state: its input (after its LayerNorm) and its output, each ``[B, T, H]``."""
    recorded: dict[LayerRef, tuple[Tensor, Tensor]] = {}
    for part in parts:
        stack = getattr(policy, part)
        if not isinstance(stack, LRUStack):
            continue
        hooks = [
            block.lru.register_forward_hook(_record_into(recorded, LayerRef(part, i)))
            for i, block in enumerate(stack.blocks)
        ]
        try:
            stack(obs, None, reset)
        finally:
            for hook in hooks:
                hook.remove()
    return recorded


def _record_into(recorded: dict[LayerRef, tuple[Tensor, Tensor]], ref: LayerRef):
    """A forward hook that stores its layer's input and output in ``recorded[ref]``."""

    def hook(_module, args, out) -> None:
        recorded[ref] = (args[0], out[0])

    return hook


@torch.no_grad()
def reduced_output_error(
    lru: LRU, result: ReductionResult, recorded: tuple[Tensor, Tensor], reset: Tensor
) -> float:
    """``‖y_reduced − y_full‖ / ‖y_full − D u‖`` of ``lru`` reduced by ``result``, on the
    layer's recorded input ``u`` and output ``y_full`` (``record_layers``)."""
    u, y_full = recorded
    candidate = copy.deepcopy(lru)  # not LRU(...): that would draw from the training RNG
    candidate.load_system(result.system)
    y_red, _ = candidate(u, None, reset)
    recurrent_part = y_full - lru.D * u
    return float((y_red - y_full).norm() / recurrent_part.norm().clamp(min=1e-12))


def trial_policy(policy: ActorCritic, results: dict[LayerRef, ReductionResult]) -> ActorCritic:
    """A copy of ``policy`` with the given layers reduced (for the KL guard)."""
    trial = copy.deepcopy(policy)
    for ref, result in results.items():
        ref.of(trial).load_system(result.system)
    return trial


@torch.no_grad()
def action_kl(full: ActorCritic, reduced: ActorCritic, obs: Tensor, reset: Tensor) -> float:
    """Mean KL(full ‖ reduced) of the Gaussian action distributions over ``obs [B, T, obs]``.

    Both share the log-std, so the KL is ``Σ (μ_full − μ_red)² / (2σ²)``.
    """
    mean_full = full.actor_head(full.actor(obs, None, reset)[0])
    mean_red = reduced.actor_head(reduced.actor(obs, None, reset)[0])
    var = torch.exp(2 * full.log_std)
    return float(((mean_full - mean_red).square() / (2 * var)).sum(-1).mean())
