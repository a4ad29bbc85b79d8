"""In-training compression of LRU policies (CompreSSM, DESIGN.md §6).

At each reduction point — between rollouts, never inside an update — every LRU layer of
the actor and the critic is reduced by balanced truncation (``compressm_rl.reduction``):

1. read the layer as a discrete LTI system (float64), compute its Hankel singular
   values and the rank r that keeps ``1 - tol`` of their sum (at least the floor);
2. skip the layer unless the reduction removes at least 5% of its states, or when the
   re-diagonalisation is ill-conditioned;
3. guard: the layer's relative output error on its recorded inputs (from the latest
   rollout) must stay under ``max_output_error``; for the actor, KL(full ‖ reduced) of
   the action distribution on that rollout must stay under ``max_kl``; above it the
   actor's cut is made gentler (each layer sheds half as many states, re-truncated at
   the higher rank) and tried again, up to ``MAX_KL_BACKOFFS`` times, before the actor's
   reductions of this event are rolled back (CompreSSM's "pragmatic" mode);
4. surgery: the layer's parameter tensors are resized in place (same ``Parameter``
   objects, so the optimiser keeps tracking them), their Adam moments restart from zero
   with the step count kept (old modes do not map one to one onto new ones), and every
   carried recurrent state is mapped into the new coordinates (``z = W [Re h; Im h]``).

Every decision is recorded in ``compression.json`` with the HSVs and the H∞ bound.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from compressm_rl.reduction import (
    IllConditionedReduction,
    ReductionResult,
    balanced_truncation,
    lru_parameters,
)
from compressm_rl.runs import atomic_write_text
from policies.actor_critic import ActorCritic, RecurrentState
from policies.lru import LRU, LRUStack

EVENTS = "compression.json"
MIN_REMOVED_FRACTION = 0.05
MAX_KL_BACKOFFS = 3  # halvings of the actor's cut before a rollback


@dataclass
class CompressionConfig:
    """When and how much to reduce. ``tol`` None disables compression."""

    tol: float | None = None
    # Early: the action KL of a cut grows as the policy's σ shrinks (Hopper-v5, τ = 0.15:
    # KL 0.04 at 6% of training, 0.2-0.3 at 15-20%), and the small model trains for longer.
    at: list[float] = field(default_factory=lambda: [0.02, 0.04, 0.06, 0.08])
    min_state: int = 4  # floor on complex states per layer
    max_output_error: float = 0.5  # relative, per layer, on recorded inputs
    max_kl: float = 0.1  # KL(full ‖ reduced) of the actor, mean over the rollout
    max_cond: float = 1e3  # cond(V) of the re-diagonalisation; above it the layer is skipped
    # What to shrink: the actor is what gets deployed; the critic only speeds up training.
    parts: list[str] = field(default_factory=lambda: ["actor", "critic"])

    def __post_init__(self) -> None:
        if not self.parts or not set(self.parts) <= {"actor", "critic"}:
            raise ValueError(
                f"compression parts must be 'actor', 'critic' or both, got {self.parts}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> CompressionConfig:
        unknown = set(data) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"unknown compression setting(s) {sorted(unknown)}")
        return cls(**data)

    @property
    def enabled(self) -> bool:
        return self.tol is not None


def layer_system(lru: LRU) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(lam [n], B̃ [n, H], C [H, n], D [H])`` of a layer in float64 / complex128."""
    with torch.no_grad():
        lam = lru.eigenvalues().to(torch.complex128).numpy()
        b = lru.input_matrix().to(torch.complex128).numpy()
        c = lru.output_matrix().to(torch.complex128).numpy()
        d = lru.D.double().numpy()
    return lam, b, c, d


def lru_layers(
    policy: ActorCritic, parts: list[str] | tuple[str, ...] = ("actor", "critic")
) -> dict[str, LRU]:
    """Named LRU layers (``"actor.0"``, ...) of the given parts (empty for an MLP policy)."""
    layers = {}
    for part in parts:
        body = getattr(policy, part)
        if isinstance(body, LRUStack):
            for i, block in enumerate(body.blocks):
                layers[f"{part}.{i}"] = block.lru
    return layers


def reduce_layer(
    lru: LRU, result: ReductionResult, optimizer: torch.optim.Optimizer | None
) -> None:
    """Swap ``lru``'s parameters for the reduced layer's (D unchanged).

    New Parameter objects replace the old ones (resizing ``.data`` in place would leave
    autograd's cached shapes stale) and take their place in the optimiser's param
    groups; their Adam moments restart at zero with the step count kept.
    """
    params = lru_parameters(result.lam, result.B)
    params["C_re"], params["C_im"] = result.C.real, result.C.imag
    for name, value in params.items():
        old = getattr(lru, name)
        new = torch.nn.Parameter(
            torch.as_tensor(np.ascontiguousarray(value), dtype=old.dtype, device=old.device)
        )
        setattr(lru, name, new)
        if optimizer is not None:
            _replace_in_optimizer(optimizer, old, new)
    lru.state_dim = result.state_dim


def _replace_in_optimizer(optimizer: torch.optim.Optimizer, old: Tensor, new: Tensor) -> None:
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    old_state = optimizer.state.pop(old, {})
    new_state = {}
    for key, value in old_state.items():
        fresh_moment = torch.is_tensor(value) and value.shape == old.shape and key != "step"
        new_state[key] = torch.zeros_like(new) if fresh_moment else value
    if new_state:
        optimizer.state[new] = new_state


@torch.no_grad()
def map_layer_states(stack: LRUStack, state: Tensor, maps: dict[int, ReductionResult]) -> Tensor:
    """Map a flat stack state ``[B, S]`` into reduced coordinates for the layers in ``maps``.

    Must be called with the stack's *old* sizes still in place (before ``reduce_layer``).
    """
    parts = stack.split_state(state)
    for i, result in maps.items():
        z = result.map_state(parts[i].to(torch.complex128).numpy())
        parts[i] = torch.as_tensor(z, dtype=torch.complex64)
    return LRUStack.join_state(parts)


@torch.no_grad()
def record_layer_inputs(stack: LRUStack, obs: Tensor, reset: Tensor) -> list[Tensor]:
    """Inputs each LRU layer sees (after its LayerNorm) over sequences ``obs [B, T, obs]``."""
    inputs = []
    hooks = [
        block.lru.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
        for block in stack.blocks
    ]
    try:
        stack(obs, None, reset)
    finally:
        for h in hooks:
            h.remove()
    return inputs


@torch.no_grad()
def relative_output_error(lru: LRU, candidate: LRU, u: Tensor, reset: Tensor) -> float:
    """``‖y_candidate − y_full‖ / ‖y_full − D u‖`` on inputs ``u [B, T, H]`` (from zero state)."""
    y_full, _ = lru(u, None, reset)
    y_red, _ = candidate(u, None, reset)
    recurrent_part = y_full - lru.D * u
    return float((y_red - y_full).norm() / recurrent_part.norm().clamp(min=1e-12))


@torch.no_grad()
def action_kl(full: ActorCritic, reduced: ActorCritic, obs: Tensor, reset: Tensor) -> float:
    """Mean KL(full ‖ reduced) of the Gaussian action distributions over ``obs [B, T, obs]``.

    Both share the log-std, so the KL is ``Σ (μ_full − μ_red)² / (2σ²)``.
    """
    mean_full = full.actor_head(full.actor(obs, None, reset)[0])
    mean_red = reduced.actor_head(reduced.actor(obs, None, reset)[0])
    var = torch.exp(2 * full.log_std)
    return float(((mean_full - mean_red).square() / (2 * var)).sum(-1).mean())


def reduced_output_error(lru: LRU, result: ReductionResult, u: Tensor, reset: Tensor) -> float:
    """``relative_output_error`` of ``lru`` reduced by ``result``, on inputs ``u [B, T, H]``."""
    candidate = LRU(lru.width, lru.state_dim)
    candidate.load_state_dict(lru.state_dict())
    reduce_layer(candidate, result, None)
    return relative_output_error(lru, candidate, u, reset)


def plan_reductions(
    policy: ActorCritic, config: CompressionConfig, obs: Tensor | None, reset: Tensor | None
) -> tuple[dict[str, ReductionResult], list[dict]]:
    """Decide every layer's reduction without changing the policy.

    Returns the accepted reductions by layer name, and one event record per layer.
    """
    accepted: dict[str, ReductionResult] = {}
    events = []
    inputs = {}
    if obs is not None:
        for part in config.parts:
            for i, u in enumerate(record_layer_inputs(getattr(policy, part), obs, reset)):
                inputs[f"{part}.{i}"] = u
    for name, lru in lru_layers(policy, config.parts).items():
        n = lru.state_dim
        event = {"layer": name, "n_before": n, "n_after": n, "bound": 0.0, "hsv": []}
        try:
            result = balanced_truncation(
                *layer_system(lru),
                tol=config.tol,
                min_rank=min(2 * config.min_state, 2 * n),
                max_cond=config.max_cond,
            )
        except IllConditionedReduction as err:
            events.append({**event, "status": f"skipped: {err}"})
            continue
        event.update(hsv=result.hsv.tolist(), bound=float(result.bound), n_after=result.state_dim)
        if result.state_dim > (1 - MIN_REMOVED_FRACTION) * n:
            events.append({**event, "n_after": n, "status": "skipped: removes < 5% of states"})
            continue
        if name in inputs:
            error = reduced_output_error(lru, result, inputs[name], reset)
            event["output_error"] = error
            if error > config.max_output_error:
                events.append(
                    {
                        **event,
                        "n_after": n,
                        "status": f"rolled back: output error {error:.3f} "
                        f"> {config.max_output_error}",
                    }
                )
                continue
        accepted[name] = result
        events.append({**event, "status": "applied"})
    return accepted, events


@torch.no_grad()
def compress_policy(
    policy: ActorCritic,
    optimizer: torch.optim.Optimizer | None,
    config: CompressionConfig,
    carried: RecurrentState | None = None,
    obs: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[RecurrentState | None, list[dict]]:
    """Reduce every LRU layer of ``policy`` in place; map the ``carried`` state.

    Args:
        carried: the envs' ongoing recurrent state (actor ``[B, S_actor]``, critic
            ``[B, S_critic]``), mapped into the reduced coordinates.
        obs, reset: the latest rollout as sequences ``[B, T, obs]`` (normalised) and
            ``[B, T]``, for the guards; None skips them.

    Returns:
        The mapped state (None if none was given) and the event records.
    """
    accepted, events = plan_reductions(policy, config, obs, reset)
    layers = lru_layers(policy)
    actor_names = [k for k in accepted if k.startswith("actor.")]
    if actor_names and obs is not None:
        planned = {k: accepted.pop(k) for k in actor_names}
        fitted, kl, halvings, dropped = fit_actor_kl(policy, planned, config, obs, reset)
        accepted.update(fitted)
        inputs = record_layer_inputs(policy.actor, obs, reset) if halvings and fitted else []
        for e in events:
            name = e["layer"]
            if name not in actor_names:
                continue
            e["kl"] = kl
            if name in fitted:
                result = fitted[name]
                e.update(n_after=result.state_dim, bound=float(result.bound))
                if halvings:  # the gentler cut's own error, not the planned one's
                    u = inputs[int(name.split(".")[1])]
                    e["output_error"] = reduced_output_error(layers[name], result, u, reset)
                    e["status"] = f"applied: cut halved {halvings}x to fit KL {kl:.3f}"
            else:
                e["n_after"] = e["n_before"]
                e["status"] = "rolled back: " + dropped.get(
                    name, f"KL {kl:.3f} > {config.max_kl} after {halvings} halvings"
                )

    mapped = None
    if carried is not None:
        parts = {}
        for part in ("actor", "critic"):
            prefix = part + "."
            maps = {int(k[len(prefix) :]): r for k, r in accepted.items() if k.startswith(prefix)}
            state = getattr(carried, part)
            parts[part] = map_layer_states(getattr(policy, part), state, maps) if maps else state
        mapped = RecurrentState(**parts)
    for name, result in accepted.items():
        reduce_layer(layers[name], result, optimizer)
    return mapped, events


def _trial_policy(policy: ActorCritic, results: dict[str, ReductionResult]) -> ActorCritic:
    """A copy of ``policy`` with the given layers reduced (for the KL guard)."""
    import copy

    trial = copy.deepcopy(policy)
    layers = lru_layers(trial)
    for name, result in results.items():
        reduce_layer(layers[name], result, None)
    return trial


def fit_actor_kl(
    policy: ActorCritic,
    planned: dict[str, ReductionResult],
    config: CompressionConfig,
    obs: Tensor,
    reset: Tensor,
) -> tuple[dict[str, ReductionResult], float, int, dict[str, str]]:
    """Back the actor's cut off until KL(full ‖ reduced) fits ``max_kl``.

    Tries the planned cut, then, while the KL is over budget, cuts with half as many real
    states removed from every actor layer (re-truncated at the higher rank; at most
    ``MAX_KL_BACKOFFS`` halvings, so the planned cut and up to 3 gentler ones). A layer
    whose gentler cut would remove < 5% of its states, or cannot be re-diagonalised,
    drops out with a reason. Every layer backs off alike, also one that adds no KL.

    Returns:
        The accepted reductions (empty if no candidate fits), the last KL measured, the
        number of halvings, and the reason per dropped layer.
    """
    layers = lru_layers(policy)
    results = dict(planned)
    dropped: dict[str, str] = {}
    for halvings in range(MAX_KL_BACKOFFS + 1):
        kl = action_kl(policy, _trial_policy(policy, results), obs, reset)
        if kl <= config.max_kl or halvings == MAX_KL_BACKOFFS:
            break
        gentler = {}
        for name, result in results.items():
            lru = layers[name]
            full_rank = 2 * lru.state_dim
            rank = full_rank - (full_rank - result.rank) // 2
            try:
                candidate = balanced_truncation(
                    *layer_system(lru), rank=rank, max_cond=config.max_cond
                )
            except IllConditionedReduction as err:
                dropped[name] = f"KL {kl:.3f} > {config.max_kl}, and the gentler cut: {err}"
                continue
            if candidate.state_dim <= (1 - MIN_REMOVED_FRACTION) * lru.state_dim:
                gentler[name] = candidate
            else:
                dropped[name] = (
                    f"KL {kl:.3f} > {config.max_kl}, and a gentler cut removes < 5% of states"
                )
        if not gentler:
            break
        results = gentler
    if kl > config.max_kl:
        return {}, kl, halvings, {}
    return results, kl, halvings, dropped


def save_events(run_dir: Path, events: list[dict]) -> None:
    """Append events to ``compression.json`` (a list of records), atomically."""
    path = Path(run_dir) / EVENTS
    old = json.loads(path.read_text()) if path.exists() else []
    atomic_write_text(path, json.dumps(old + events, indent=1))


def drop_events_from(run_dir: Path, step: int) -> None:
    """Forget the events at ``step`` or later: a run resumed from a checkpoint at
    ``step`` redoes those reductions and records them again."""
    path = Path(run_dir) / EVENTS
    if path.exists():
        kept = [e for e in json.loads(path.read_text()) if e["step"] < step]
        atomic_write_text(path, json.dumps(kept, indent=1))


def plot_hsv(path: Path, events: list[dict], title: str) -> None:
    """HSV spectra (normalised to σ₁) of one reduction event, the cut marked per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for e in events:
        if not e["hsv"]:
            continue
        hsv = np.asarray(e["hsv"])
        line = ax.semilogy(np.arange(1, len(hsv) + 1), hsv / hsv[0], label=f"{e['layer']}")[0]
        if e["status"].startswith("applied"):
            ax.axvline(2 * e["n_after"], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("index (real states; dotted: kept ≈ 2 n_after)")
    ax.set_ylabel("σ_j / σ_1")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
