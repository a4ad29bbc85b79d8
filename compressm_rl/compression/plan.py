"""Planning the cuts of one reduction point (steps 1-2 of ``compression.pipeline``, and the
output-error guard of step 3): every layer read once (``ReductionPlan``), its balanced
truncation at the ``tol`` rank or at the ranks that bring each part to this event's share
of its state budget (``budget_cuts``), without changing the policy."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from torch import Tensor

from compressm_rl.compression.budget import (
    allocate_ranks,
    event_target,
    state_scores,
    uniform_shares,
    weakest_kept,
)
from compressm_rl.compression.config import CompressionConfig
from compressm_rl.compression.events import LayerRef, ReductionEvent, lru_layers
from compressm_rl.compression.gramians import hankel_singular_values, input_covariance
from compressm_rl.compression.hinf import hinf_norm
from compressm_rl.compression.lti import (
    ReductionResult,
    UnreducibleLayer,
    balanced_truncation,
    scale_modes,
)
from compressm_rl.compression.measurements import record_layers, reduced_output_error
from policies.actor_critic import ActorCritic
from policies.lti import MAX_RADIUS, DiagonalSystem

MIN_REMOVED_FRACTION = 0.05


@dataclass
class ReductionPlan:
    """The layers as read once, and the planned cuts (``plan_reductions``)."""

    systems: dict[LayerRef, DiagonalSystem]
    recorded: dict[LayerRef, tuple[Tensor, Tensor]]  # input, output [B, T, H] (empty: no guard)
    accepted: dict[LayerRef, ReductionResult]
    events: list[ReductionEvent]
    # Σ_u of each layer's recorded inputs, where the cut uses data-weighted Gramians.
    input_covariances: dict[LayerRef, np.ndarray] = field(default_factory=dict)
    held_to_budget: bool = False  # the budget's last event: guards measure, never veto


def plan_reductions(
    policy: ActorCritic,
    config: CompressionConfig,
    obs: Tensor | None,
    reset: Tensor | None,
    events_left: int = 1,
) -> ReductionPlan:
    """Read every layer of ``config.parts`` once and decide its cut (output-error guard
    included, KL guard not), without changing the policy."""
    refs = lru_layers(policy, config.parts)
    plan = ReductionPlan(
        systems={ref: ref.of(policy).system() for ref in refs},
        recorded={} if obs is None else record_layers(policy, config.parts, obs, reset),
        accepted={},
        events=[],
        held_to_budget=config.budget is not None and events_left == 1,
    )
    if config.gramian == "data":  # without a rollout, the white-noise HSVs (event says so)
        plan.input_covariances = {
            ref: input_covariance(u.double().cpu().numpy()) for ref, (u, _) in plan.recorded.items()
        }
    norms = {ref: _weighted_norm(plan, ref) for ref in refs}
    targets, cuts = {}, {}
    if config.budget is not None:
        targets, cuts = budget_cuts(plan, refs, norms, config, events_left)
    for ref in refs:
        n = ref.of(policy).state_dim
        event = ReductionEvent(
            ref,
            n_before=n,
            n_after=n,
            status="applied",
            gramian="data" if ref in plan.input_covariances else "white",
            hinf_norm=norms[ref],
            target=targets.get(ref.part),
        )
        try:
            if config.budget is not None:
                result = cuts[ref]
                if isinstance(result, UnreducibleLayer):
                    raise result
            else:
                result = cut_layer(plan, ref, config, tol=config.tol)
        except UnreducibleLayer as err:  # ill-conditioned, or a zero map
            plan.events.append(replace(event, status=f"skipped: {err}"))
            continue
        event = event.with_cut(result, applied=False)
        if config.budget is not None and result.state_dim >= n:
            plan.events.append(replace(event, status="skipped: the budget keeps every state"))
            continue
        if config.budget is None and result.state_dim > (1 - MIN_REMOVED_FRACTION) * n:
            plan.events.append(replace(event, status="skipped: removes < 5% of states"))
            continue
        status = "applied: held to the budget" if plan.held_to_budget else "applied"
        if ref in plan.recorded:
            error = reduced_output_error(ref.of(policy), result, plan.recorded[ref], reset)
            event = replace(event, output_error=error)
            if error > config.max_output_error:
                over = f"output error {error:.3f} > {config.max_output_error}"
                if not plan.held_to_budget:  # refused before it was ever applied
                    plan.events.append(replace(event, status=f"skipped: {over}"))
                    continue
                status += f" ({over})"
        plan.accepted[ref] = result
        plan.events.append(replace(event, n_after=result.state_dim, status=status))
    if plan.held_to_budget:  # say so where a part ends off its budget
        for part, target in targets.items():
            held = sum(e.n_after for e in plan.events if e.layer.part == part)
            if held != target:
                plan.events = [
                    replace(e, status=f"{e.status}; {part} holds {held} states, not {target}")
                    if e.layer.part == part
                    else e
                    for e in plan.events
                ]
    return plan


def cut_layer(
    plan: ReductionPlan, ref: LayerRef, config: CompressionConfig, **rank_or_tol
) -> ReductionResult:
    """Balanced truncation of one planned layer at ``rank=`` or ``tol=``, with the
    config's conditioning, radius, real-mode and mode-scale settings and the layer's
    Gramian."""
    full = plan.systems[ref]
    result = balanced_truncation(
        *full,
        **rank_or_tol,
        min_rank=min(2 * config.min_state, 2 * full.state_dim),
        max_cond=config.max_cond,
        max_radius=MAX_RADIUS,
        pair_real=config.pair_real,
        input_covariance=plan.input_covariances.get(ref),
    )
    if config.mode_scale == "trained":
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.sqrt(np.median(parameter_split(full)) / parameter_split(result.system))
        # A mode with no input or no output has no split to move (and no gain).
        result = scale_modes(result, np.where(np.isfinite(scale) & (scale > 0), scale, 1.0))
    return result


def parameter_split(system: DiagonalSystem) -> np.ndarray:
    """``‖B_i‖ / ‖C_i‖`` per mode ``[n]`` in the LRU's parameters (``B = B̃ / γ``,
    ``policies.lru``): how a mode's gain is split between the two tensors Adam steps on.
    A layer read from float32 can sit a rounding above ``MAX_RADIUS`` (3.7e-8 at the clamp);
    γ is taken at the clamp there."""
    radius = np.minimum(np.abs(system.lam), MAX_RADIUS)
    gamma = np.sqrt(1.0 - radius**2)  # policies.lru's γ = sqrt(1 − |λ|²)
    return np.linalg.norm(system.B, axis=1) / gamma / np.linalg.norm(system.C, axis=0)


def _weighted_norm(plan: ReductionPlan, ref: LayerRef) -> float:
    lam, B, C, _ = plan.systems[ref]
    return hinf_norm(lam, B, C, input_covariance=plan.input_covariances.get(ref))


def budget_cuts(
    plan: ReductionPlan,
    refs: list[LayerRef],
    norms: dict[LayerRef, float],
    config: CompressionConfig,
    events_left: int,
) -> tuple[dict[str, int], dict[LayerRef, ReductionResult | UnreducibleLayer]]:
    """The cuts that bring each part to this event's share of its budget: the part's
    target by part name, and per layer its cut or why there is none."""
    targets, cuts = {}, {}
    for part in config.parts:
        layers = [ref for ref in refs if ref.part == part]
        if layers:
            targets[part], results = _budget_cut_part(plan, layers, norms, config, events_left)
            cuts.update(zip(layers, results, strict=True))
    return targets, cuts


def _budget_cut_part(
    plan: ReductionPlan,
    layers: list[LayerRef],
    norms: dict[LayerRef, float],
    config: CompressionConfig,
    events_left: int,
) -> tuple[int, list[ReductionResult | UnreducibleLayer]]:
    """One part's cuts. Ranks come from ``compression.budget`` (global scores or uniform
    shares). A cut can hold more complex states than half its rank (real modes left
    unpaired), so while the part (global) or a layer (uniform) is over its target, its
    weakest kept state goes too. A layer that cannot be cut keeps its states (or its cut
    one rank up, where only the smaller cut fails), and under global allocation the others
    make up for it."""
    sizes = [plan.systems[ref].state_dim for ref in layers]
    target = event_target(sum(sizes), config.budget, events_left)
    hsv = [
        hankel_singular_values(
            *plan.systems[ref][:3], input_covariance=plan.input_covariances.get(ref)
        )
        for ref in layers
    ]
    scores = [state_scores(h, norms[ref]) for h, ref in zip(hsv, layers, strict=True)]
    floors = [2 * min(config.min_state, n) for n in sizes]
    ceilings = [max(1, int(np.count_nonzero(h > 1e-12 * h[0]))) for h in hsv]
    goals = None  # per-layer targets (uniform)
    if config.allocation == "global":
        ranks = allocate_ranks(scores, 2 * target, floors, ceilings)
    else:
        shares = uniform_shares(config.budget, sizes)
        goals = [event_target(n, s, events_left) for n, s in zip(sizes, shares, strict=True)]
        ranks = [max(lo, min(hi, 2 * g)) for lo, hi, g in zip(floors, ceilings, goals, strict=True)]

    def cut(i: int) -> ReductionResult | UnreducibleLayer:
        try:
            return cut_layer(plan, layers[i], config, rank=ranks[i])
        except UnreducibleLayer as err:
            return err

    results = [cut(i) for i in range(len(layers))]
    for i, result in enumerate(results):
        if isinstance(result, UnreducibleLayer):
            floors[i] = ranks[i]  # the layer keeps its states; the others may give more
    for _ in range(sum(ranks)):  # each pass gives up one real state
        held = [
            r.state_dim if isinstance(r, ReductionResult) else n
            for r, n in zip(results, sizes, strict=True)
        ]
        if goals is None:
            over = weakest_kept(scores, ranks, floors) if sum(held) > target else None
        else:
            layers_over = [
                i
                for i, (m, g) in enumerate(zip(held, goals, strict=True))
                if m > g and ranks[i] > floors[i]
            ]
            over = layers_over[0] if layers_over else None
        if over is None:
            break
        ranks[over] -= 1
        smaller = cut(over)
        if isinstance(smaller, UnreducibleLayer):  # keep the cut one rank up, stop there
            ranks[over] += 1
            floors[over] = ranks[over]
        else:
            results[over] = smaller
    return target, results
