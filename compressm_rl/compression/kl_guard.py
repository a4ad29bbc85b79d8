"""The actor's KL guard (step 3 of ``compression.pipeline``) and cut-and-heal (step 5):
KL(full ‖ reduced) of the action distribution on the rollout, for a trial copy of the
actor with the planned cuts (``cut_kl``), healed by distillation toward the full actor
with cut-and-heal (``heal_actor``); above ``max_kl`` the cut is made gentler until it fits
(``fit_actor_kl``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from compressm_rl.compression.config import CompressionConfig
from compressm_rl.compression.events import LayerRef
from compressm_rl.compression.lti import IllConditionedReduction, ReductionResult
from compressm_rl.compression.measurements import action_kl, reduced_output_error, trial_policy
from compressm_rl.compression.plan import MIN_REMOVED_FRACTION, ReductionPlan, cut_layer
from policies.actor_critic import ActorCritic

MAX_KL_BACKOFFS = 3  # halvings of the actor's cut before a rollback


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
