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
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from compressm_rl.compression.budget import (
    allocate_ranks,
    event_target,
    state_scores,
    uniform_shares,
    weakest_kept,
)
from compressm_rl.compression.config import PARTS, CompressionConfig
from compressm_rl.compression.lti import (
    IllConditionedReduction,
    ReductionResult,
    UnreducibleLayer,
    balanced_truncation,
    hankel_singular_values,
    hinf_norm,
    input_covariance,
    scale_modes,
)
from policies.actor_critic import ActorCritic, RecurrentState
from policies.lru import LRU, LRUStack
from policies.lti import MAX_RADIUS, DiagonalSystem

MIN_REMOVED_FRACTION = 0.05
MAX_KL_BACKOFFS = 3  # halvings of the actor's cut before a rollback


@dataclass(frozen=True)
class LayerRef:
    """One LRU layer of an actor-critic: ``part`` ("actor" or "critic"), block ``index``."""

    part: str
    index: int

    def __str__(self) -> str:
        return f"{self.part}.{self.index}"

    def of(self, policy: ActorCritic) -> LRU:
        """The layer in ``policy``."""
        return getattr(policy, self.part).blocks[self.index].lru


def lru_layers(policy: ActorCritic, parts: list[str] | tuple[str, ...] = PARTS) -> list[LayerRef]:
    """Every LRU layer of the given parts, actor first (none for an MLP policy)."""
    return [
        LayerRef(part, index)
        for part in parts
        if isinstance(getattr(policy, part), LRUStack)
        for index in range(len(getattr(policy, part).blocks))
    ]


@dataclass(frozen=True)
class ReductionEvent:
    """What happened to one layer at one reduction point (a ``compression.json`` record).

    ``status`` starts with "applied", "skipped" or "rolled back" and says why: "skipped"
    where the plan accepted no cut (none worth making or possible, or its output error
    over ``max_output_error``), "rolled back" where the actor's KL guard withdrew a cut the
    plan had accepted. Neither changes the layer (``n_after == n_before``).
    ``bound`` is the H∞ error bound of the cut (``ReductionResult.bound``), ``cond_v`` the
    condition number of its re-diagonalisation, ``n_clamped`` the modes moved to the
    largest radius an LRU holds and ``n_paired`` the states holding two real modes (None
    where no cut was computed). ``gramian`` is the HSVs the cut used ("white", or "data":
    weighted by the recorded inputs' covariance); ``hinf_norm`` the full layer's H∞ norm
    with the same weighting, so that ``relative_bound`` reads in the units of
    ``output_error``. ``target`` is the part's state count the event aimed at (budget
    mode). ``output_error`` is None where no guard ran, ``kl`` None outside the actor's KL
    guard, ``kl_healed`` None without cut-and-heal (where it is not below ``kl`` the
    healing was not applied); ``step`` and the returns around the
    event are filled in by the runner.
    """

    layer: LayerRef
    n_before: int
    n_after: int
    status: str
    hsv: tuple[float, ...] = ()
    rank: int | None = None  # real states the cut keeps (2·n_after less real modes)
    bound: float = 0.0
    cond_v: float | None = None
    n_clamped: int | None = None
    n_paired: int | None = None
    gramian: str = "white"
    hinf_norm: float | None = None  # the full layer's ‖G‖_∞, weighted as ``bound`` is
    target: int | None = None  # with a budget: the part's states this event aims at
    output_error: float | None = None
    kl: float | None = None
    kl_healed: float | None = None  # KL after the cut-and-heal distillation
    step: int | None = None
    return_before: float | None = None
    return_after: float | None = None
    post_training: bool = False  # a finished run's (``compressm_rl.posthoc``)

    @property
    def applied(self) -> bool:
        return self.status.startswith("applied")

    @property
    def relative_bound(self) -> float | None:
        """``bound / ‖G‖_∞``: the worst-case relative error, in the output error's units."""
        if not self.hinf_norm:
            return None
        return self.bound / self.hinf_norm

    def with_cut(self, result: ReductionResult, applied: bool = True) -> ReductionEvent:
        """This event with ``result``'s cut described (``n_after`` its size if ``applied``)."""
        return replace(
            self,
            n_after=result.state_dim if applied else self.n_before,
            hsv=tuple(result.hsv.tolist()),
            rank=result.rank,
            bound=float(result.bound),
            cond_v=result.cond_V,
            n_clamped=result.n_clamped,
            n_paired=result.n_paired,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "layer": str(self.layer), "hsv": list(self.hsv)}

    @classmethod
    def from_dict(cls, data: dict) -> ReductionEvent:
        part, index = data["layer"].split(".")
        return cls(**{**data, "layer": LayerRef(part, int(index)), "hsv": tuple(data["hsv"])})


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


class CutKL(NamedTuple):
    """KL(full ‖ reduced) of the actions for an actor cut, mean over the rollout (nats):
    ``raw``, and with cut-and-heal the KL after healing and the healed actor's weights
    (``actor`` and ``actor_head`` state dicts); None without healing. ``weights`` is None
    too where healing did not lower the KL: the cut then stays unhealed."""

    raw: float
    healed: float | None = None
    weights: dict[str, dict[str, Tensor]] | None = None

    @property
    def judged(self) -> float:
        """What the KL guard compares with ``max_kl``: the healed KL where it is applied."""
        return self.raw if self.weights is None else self.healed


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


def fit_actor_kl(
    policy: ActorCritic,
    plan: ReductionPlan,
    planned: dict[LayerRef, ReductionResult],
    config: CompressionConfig,
    obs: Tensor,
    reset: Tensor,
) -> tuple[dict[LayerRef, ReductionResult], CutKL, int, dict[LayerRef, str]]:
    """Back the actor's cut off until KL(full ‖ reduced) fits ``max_kl``.

    Tries the planned cut, then, while the KL is over budget, cuts with half as many real
    states removed from every actor layer (re-truncated at the higher rank from the
    systems read by the plan; at most ``MAX_KL_BACKOFFS`` halvings). A layer whose gentler
    cut would remove < 5% of its states, cannot be re-diagonalised, or has an output error
    on the recorded inputs over ``max_output_error`` drops out with a reason, before the
    next KL is measured (so the KL is that of the cuts returned). Every layer backs off
    alike, also one that adds no KL. With cut-and-heal the KL judged is the healed one
    (``cut_kl``).

    Returns:
        The accepted reductions (empty if no candidate fits), the last cut's KL, the
        number of halvings, and the reason per dropped layer (also when none fits).
    """
    results = dict(planned)
    dropped: dict[LayerRef, str] = {}
    for halvings in range(MAX_KL_BACKOFFS + 1):
        cut = cut_kl(policy, results, config, obs, reset)
        kl = cut.judged
        if kl <= config.max_kl or halvings == MAX_KL_BACKOFFS:
            break
        gentler = {}
        for ref, result in results.items():
            n = plan.systems[ref].state_dim
            rank = 2 * n - (2 * n - result.rank) // 2
            try:
                candidate = cut_layer(plan, ref, config, rank=rank)
            except IllConditionedReduction as err:
                dropped[ref] = f"KL {kl:.3f} > {config.max_kl}, and the gentler cut: {err}"
                continue
            if candidate.state_dim > (1 - MIN_REMOVED_FRACTION) * n:
                dropped[ref] = (
                    f"KL {kl:.3f} > {config.max_kl}, and a gentler cut removes < 5% of states"
                )
                continue
            # The plan's output-error guard judged the planned cut only; this one is new.
            if ref in plan.recorded:
                error = reduced_output_error(ref.of(policy), candidate, plan.recorded[ref], reset)
                if error > config.max_output_error:
                    dropped[ref] = (
                        f"KL {kl:.3f} > {config.max_kl}, and the gentler cut's output error "
                        f"{error:.3f} > {config.max_output_error}"
                    )
                    continue
            gentler[ref] = candidate
        if not gentler:
            break
        results = gentler
    if kl > config.max_kl:
        return {}, cut, halvings, dropped
    return results, cut, halvings, dropped


def cut_kl(
    policy: ActorCritic,
    results: dict[LayerRef, ReductionResult],
    config: CompressionConfig,
    obs: Tensor,
    reset: Tensor,
) -> CutKL:
    """The KL of the actor cut by ``results`` (a trial copy), healed with cut-and-heal."""
    trial = trial_policy(policy, results)
    kl = action_kl(policy, trial, obs, reset)
    if not config.heal_steps:
        return CutKL(kl)
    heal_actor(trial, policy, obs, reset, config.heal_steps, config.heal_lr)
    healed = action_kl(policy, trial, obs, reset)
    # A near-exact cut gives a near-zero gradient that Adam still steps by about the lr:
    # 50 steps at 1e-3 raised a KL of 1e-14 to 2e-3 (Hopper-v5-P). Keep the better one.
    if not healed < kl:
        return CutKL(kl, healed)
    # On the CPU: a data-parallel run sends them to every rank as a pickled object.
    weights = {
        name: {k: v.cpu() for k, v in getattr(trial, name).state_dict().items()}
        for name in ("actor", "actor_head")
    }
    return CutKL(kl, healed, weights)


def heal_actor(
    student: ActorCritic,
    teacher: ActorCritic,
    obs: Tensor,
    reset: Tensor,
    steps: int,
    lr: float,
) -> list[float]:
    """Cut-and-heal: ``steps`` full-batch Adam steps of the reduced actor (encoder, LRU
    blocks and head; not the log-std) on KL(teacher ‖ student) of the actions over the
    rollout ``obs [B, T, obs]`` / ``reset [B, T]``, from zero state.

    A fresh Adam, not PPO's: the distillation's steps must not advance PPO's moments.
    Returns the KL before each step (nats, mean over the rollout's steps).
    """
    params = [*student.actor.parameters(), *student.actor_head.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        target = teacher.actor_head(teacher.actor(obs, None, reset)[0])
        inv_var = torch.exp(-2 * teacher.log_std)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            mean = student.actor_head(student.actor(obs, None, reset)[0])
            loss = 0.5 * ((mean - target).square() * inv_var).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses


# ----- measurements on recorded data ---------------------------------------------------
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
            block.lru.register_forward_hook(
                lambda _m, args, out, ref=LayerRef(part, i): recorded.__setitem__(
                    ref, (args[0], out[0])
                )
            )
            for i, block in enumerate(stack.blocks)
        ]
        try:
            stack(obs, None, reset)
        finally:
            for hook in hooks:
                hook.remove()
    return recorded


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


# ----- surgery --------------------------------------------------------------------------
@torch.no_grad()
def map_carried_state(
    policy: ActorCritic, carried: RecurrentState, accepted: dict[LayerRef, ReductionResult]
) -> RecurrentState:
    """``carried`` (flat ``[B, S]`` per part) in the reduced layers' coordinates; the
    policy must still have its old sizes (call before ``load_system``)."""
    mapped = {}
    for part in PARTS:
        state = getattr(carried, part)
        maps = {ref.index: r for ref, r in accepted.items() if ref.part == part}
        if maps:
            stack = getattr(policy, part)
            layers = stack.split_state(state)
            for i, result in maps.items():
                z = result.map_state(layers[i].to(torch.complex128).numpy())
                layers[i] = torch.as_tensor(z, dtype=torch.complex64)
            state = LRUStack.join_state(layers)
        mapped[part] = state
    return RecurrentState(**mapped)


def follow_parameters(
    optimizer: torch.optim.Optimizer, replaced: dict[torch.nn.Parameter, torch.nn.Parameter]
) -> None:
    """Put each new parameter in its old one's place in ``optimizer`` (same param group)
    with no optimiser state, so Adam starts it afresh: moments *and* step count.

    The old modes do not map onto the new ones, so the moments cannot carry over; and a
    step count kept beside zeroed moments breaks Adam's bias correction (v̂ = v / (1 − β₂ᵗ)
    then under-corrects the fresh v: the first updates came out 0.7·lr after 60 steps and
    1.8·lr after 400, against lr for a fresh start).
    """
    for old, new in replaced.items():
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        optimizer.state.pop(old, None)
