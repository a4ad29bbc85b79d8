"""Post-training compression of a finished run: the baseline in-training compression is
measured against (same balanced truncation, applied once at the end, no fine-tuning)."""

from __future__ import annotations

from pathlib import Path

from compressm_rl.compression import ReductionEvent, lru_layers
from compressm_rl.compression.lti import (
    ReductionResult,
    UnreducibleLayer,
    balanced_truncation,
)
from compressm_rl.rl import make_optimizer
from compressm_rl.runs import EventLog, load_checkpoint, save_checkpoint
from compressm_rl.runs.config import CONFIG, check_replaceable
from compressm_rl.runs.files import atomic_write, clear_run_dir, locked_run_dir
from compressm_rl.runs.metrics import METRICS
from policies.lti import MAX_RADIUS, DiagonalSystem


def compress_run(
    run_dir: Path,
    out_dir: Path,
    tol: float | None = None,
    state_dims: list[int] | None = None,
    overwrite: bool = False,
) -> list[ReductionEvent]:
    """Reduce every LRU layer of ``run_dir``'s policy and save it as a new run ``out_dir``.

    Exactly one of ``tol`` (fraction of Σ HSV to drop) and ``state_dims`` (target complex
    states per layer, applied to actor and critic alike; a layer ends at most at its
    target unless no rank that fits can be re-diagonalised, so methods compare at equal
    sizes). The new run's optimiser starts afresh (moments of the old modes do not carry
    over).

    ``out_dir`` follows ``train``'s rules (``runs.config.check_replaceable``): a run
    there is replaced only with ``overwrite``, under its lock, and never ``run_dir`` itself.
    """
    if (tol is None) == (state_dims is None):
        raise ValueError("give exactly one of tol and state_dims")
    if tol is not None and not 0.0 < tol < 1.0:
        raise ValueError(f"tol = {tol} is out of range: a fraction of the HSV sum in (0, 1)")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out_dir} is the run being compressed: choose a new directory")
    check_replaceable(out_dir, overwrite)  # before any work: nothing of another run lost
    state = load_checkpoint(run_dir)
    policy = state.policy
    layers = lru_layers(policy)
    if not layers:
        raise ValueError(f"{run_dir} holds an MLP policy: there is no recurrent state to compress")
    if state_dims is not None and (
        len(state_dims) != len(policy.actor.blocks) or min(state_dims) < 1
    ):
        raise ValueError(
            f"--state-dims needs {len(policy.actor.blocks)} sizes >= 1 (one per layer), "
            f"got {state_dims}"
        )
    events = []
    for ref in layers:
        lru = ref.of(policy)
        n = lru.state_dim
        try:
            target = None if state_dims is None else state_dims[ref.index]
            result = _truncate(lru.system(), tol, target)
        except UnreducibleLayer as err:  # ill-conditioned, or a zero map
            status = f"skipped: {err}"
            events.append(
                ReductionEvent(ref, n, n, status, step=state.global_step, post_training=True)
            )
            continue
        status = "applied (post-training)"
        event = ReductionEvent(ref, n, n, status, step=state.global_step, post_training=True)
        events.append(event.with_cut(result))
        lru.load_system(result.system)

    out_dir.mkdir(parents=True, exist_ok=True)  # after every layer is cut: no half-made run
    with locked_run_dir(out_dir):  # a run being trained there is never written under it
        check_replaceable(out_dir, overwrite)  # again, now that nobody else can write it
        if overwrite:
            clear_run_dir(out_dir)
        for name in (CONFIG, METRICS):
            if (run_dir / name).exists():
                atomic_write(
                    out_dir / name, lambda f, name=name: f.write((run_dir / name).read_bytes())
                )
        state.optimizer = make_optimizer(policy, state.config.ppo.lr)
        save_checkpoint(out_dir, state)
        log = EventLog(out_dir)
        log.clear()
        log.append(events)
    return events


def _truncate(system: DiagonalSystem, tol: float | None, states: int | None) -> ReductionResult:
    """Balanced truncation at ``tol``, or to at most ``states`` complex states: from real
    rank ``2 · states`` down, since each real mode left unpaired takes a whole state.
    Raises ``UnreducibleLayer`` only if the first rank cannot be cut; a lower rank that
    cannot (ill-conditioned where it splits a pair) is passed over."""
    if tol is not None:
        return balanced_truncation(*system, tol=tol, max_radius=MAX_RADIUS)
    rank = min(2 * states, 2 * system.state_dim)
    result = balanced_truncation(*system, rank=rank, max_radius=MAX_RADIUS)
    while result.system.state_dim > states and rank > 1:
        rank -= 1
        try:
            result = balanced_truncation(*system, rank=rank, max_radius=MAX_RADIUS)
        except UnreducibleLayer:
            continue
    return result
