"""In-training compression of an actor-critic (CompreSSM, docs/design.md §7).

At each reduction point — between rollouts, never inside an update — ``compress_policy``
walks every LRU layer of the chosen parts once:

1. **read**: the layer as a diagonal LTI system (``LRU.system()``, float64), and the
   inputs it saw on the latest rollout;
2. **plan**: balanced truncation at the rank that keeps ``1 - tol`` of the Hankel
   singular values (at least the floor), or, with a state ``budget``, at the ranks that
   bring each part to this event's share of it (``compression.budget``: states ranked
   across layers, or equal shares); white-noise HSVs or, with ``gramian: data``, ones
   weighted by the covariance of the recorded inputs. A layer is skipped when the cut
   removes too little (< 5% of its states by ``tol``; none by budget), or when the
   re-diagonalisation is ill-conditioned. With ``mode_scale: trained`` each reduced mode
   is rescaled (exactly) to the split of its gain between B and C that training had made;
3. **guard**: the reduced layer's relative output error on the recorded inputs must stay
   under ``max_output_error`` (else the layer is skipped: its cut is never applied); for
   the actor, KL(full ‖ reduced) of the action distribution on the rollout must stay
   under ``max_kl``; above it the actor's cut is made gentler (each layer sheds half as
   many states, re-truncated at the higher rank; a gentler cut is held to
   ``max_output_error`` too) and tried again, up to ``MAX_KL_BACKOFFS`` times, before the
   actor's reductions of this event are rolled back (CompreSSM's "pragmatic" mode). The
   last event of a budget is held to it: its guards are measured, not obeyed;
4. **apply**: every carried recurrent state is mapped into the new coordinates
   (``z = W [Re h; Im h]``), the layer becomes the reduced system (``LRU.load_system``),
   and the optimiser follows the new parameters (their Adam state restarts whole,
   moments and step count: old modes do not map one to one onto new ones);
5. **heal** (``heal_steps`` > 0): the reduced actor is distilled toward the full one on
   the rollout (``heal_actor``); the KL guard then judges healed trial copies. Where
   healing does not lower the KL, the cut stays unhealed.

Each layer's decision is one ``ReductionEvent`` (a record of ``compression.json``).

Modules by job: ``plan`` (steps 1-2 and the output-error guard), ``kl_guard`` (the KL
guard and healing), ``surgery`` (step 4's state and optimiser), ``measurements`` (what
the guards measure on the rollout), ``events`` (``LayerRef``, ``ReductionEvent``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from compressm_rl.compression.config import CompressionConfig
from compressm_rl.compression.events import LayerRef, ReductionEvent
from compressm_rl.compression.kl_guard import cut_kl, fit_actor_kl
from compressm_rl.compression.lti import ReductionResult
from compressm_rl.compression.measurements import reduced_output_error
from compressm_rl.compression.plan import plan_reductions
from compressm_rl.compression.surgery import follow_parameters, map_carried_state
from policies.actor_critic import ActorCritic, RecurrentState


@torch.no_grad()
def compress_policy(
    policy: ActorCritic,
    optimizer: torch.optim.Optimizer | None,
    config: CompressionConfig,
    carried: RecurrentState | None = None,
    obs: Tensor | None = None,
    reset: Tensor | None = None,
    events_left: int = 1,
) -> tuple[RecurrentState | None, list[ReductionEvent]]:
    """Reduce the LRU layers of ``config.parts`` in place; map the ``carried`` state.

    ``decide_reductions`` then ``apply_reductions`` (a data-parallel run decides, and
    heals with cut-and-heal, on one rank and applies on every rank).

    Args:
        optimizer: follows the replaced parameters (None: no optimiser to update).
        carried: the envs' ongoing recurrent state (actor ``[B, S_actor]``, critic
            ``[B, S_critic]``), mapped into the reduced coordinates.
        obs, reset: the latest rollout as sequences ``[B, T, obs]`` (normalised) and
            ``[B, T]``, for the guards; None skips them.
        events_left: reduction events left in the schedule, this one included (a budget
            is reached over them; the last one is held to it).

    Returns:
        The mapped state (None if none was given) and one event per layer.
    """
    decision = decide_reductions(policy, config, obs, reset, events_left)
    return apply_reductions(policy, optimizer, decision, carried), decision.events


class Decision(NamedTuple):
    """``decide_reductions``' verdict: the accepted cuts by layer, one event per layer,
    and the healed actor's weights to load after the cuts (None without healing)."""

    accepted: dict[LayerRef, ReductionResult]
    events: list[ReductionEvent]
    healed_actor: dict[str, dict[str, Tensor]] | None = None


def decide_reductions(
    policy: ActorCritic,
    config: CompressionConfig,
    obs: Tensor | None = None,
    reset: Tensor | None = None,
    events_left: int = 1,
) -> Decision:
    """Plan and guard the cuts without changing ``policy`` (``compress_policy``'s
    arguments); with cut-and-heal, the healed actor comes with the verdict."""
    plan = plan_reductions(policy, config, obs, reset, events_left)
    events = {event.layer: event for event in plan.events}
    actor = {ref: r for ref, r in plan.accepted.items() if ref.part == "actor"}
    if not actor or obs is None:
        return Decision(plan.accepted, list(events.values()))
    if plan.held_to_budget:  # measured, not obeyed
        cut = cut_kl(policy, actor, config, obs, reset)
        note = f" (KL {cut.judged:.3f} > {config.max_kl})" if cut.judged > config.max_kl else ""
        for ref in actor:
            status = events[ref].status + note
            events[ref] = replace(events[ref], kl=cut.raw, kl_healed=cut.healed, status=status)
        return Decision(plan.accepted, list(events.values()), cut.weights)
    fitted, cut, halvings, dropped = fit_actor_kl(policy, plan, actor, config, obs, reset)
    for ref in actor:
        event = replace(events[ref], kl=cut.raw, kl_healed=cut.healed)
        if ref in fitted:
            result = fitted[ref]
            event = event.with_cut(result)
            if halvings:  # the gentler cut's own error, not the planned one's
                error = reduced_output_error(ref.of(policy), result, plan.recorded[ref], reset)
                status = f"applied: cut halved {halvings}x to fit KL {cut.judged:.3f}"
                event = replace(event, output_error=error, status=status)
            plan.accepted[ref] = result
        else:
            reason = f"KL {cut.judged:.3f} > {config.max_kl} after {halvings} halvings"
            status = "rolled back: " + dropped.get(ref, reason)
            event = replace(event, n_after=event.n_before, status=status)
            del plan.accepted[ref]
        events[ref] = event
    return Decision(plan.accepted, list(events.values()), cut.weights if fitted else None)


def apply_reductions(
    policy: ActorCritic,
    optimizer: torch.optim.Optimizer | None,
    decision: Decision,
    carried: RecurrentState | None = None,
) -> RecurrentState | None:
    """Write the decided reductions into ``policy`` (the optimiser follows), then the
    healed actor's weights if any, and map the ``carried`` state; returns the mapped state
    (None if none was given)."""
    mapped = None if carried is None else map_carried_state(policy, carried, decision.accepted)
    for ref, result in decision.accepted.items():
        replaced = ref.of(policy).load_system(result.system)
        if optimizer is not None:
            follow_parameters(optimizer, replaced)
    if decision.healed_actor is not None:  # in place: the optimiser keeps its parameters
        policy.actor.load_state_dict(decision.healed_actor["actor"])
        policy.actor_head.load_state_dict(decision.healed_actor["actor_head"])
    return mapped
