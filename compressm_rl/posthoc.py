"""Post-training compression of a finished run: the baseline in-training compression is
measured against (same balanced truncation, applied once at the end, no fine-tuning)."""

from __future__ import annotations

import shutil
from pathlib import Path

from compressm_rl.compression import EVENTS, layer_system, lru_layers, reduce_layer, save_events
from compressm_rl.reduction import balanced_truncation
from compressm_rl.runs import CONFIG, METRICS, load_checkpoint, load_policy, save_checkpoint


def compress_run(
    run_dir: Path, out_dir: Path, tol: float | None = None, state_dims: list[int] | None = None
) -> list[dict]:
    """Reduce every LRU layer of ``run_dir``'s policy and save it as a new run ``out_dir``.

    Exactly one of ``tol`` (fraction of Σ HSV to drop) and ``state_dims`` (target complex
    states per layer, applied to actor and critic alike). With ``state_dims`` the real
    rank is ``2 n`` and the layer may end one or two states off (real modes).
    """
    if (tol is None) == (state_dims is None):
        raise ValueError("give exactly one of tol and state_dims")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    policy, meta = load_policy(run_dir)
    layers = lru_layers(policy)
    if not layers:
        raise ValueError(f"{run_dir} holds an MLP policy: there is no recurrent state to compress")
    if state_dims is not None and len(state_dims) != len(policy.actor.blocks):
        raise ValueError(
            f"--state-dims needs {len(policy.actor.blocks)} values (one per layer), got {state_dims}"
        )
    events = []
    for name, lru in layers.items():
        index = int(name.split(".")[1])
        kwargs = (
            {"tol": tol}
            if tol is not None
            else {"rank": min(2 * state_dims[index], 2 * lru.state_dim)}
        )
        result = balanced_truncation(*layer_system(lru), **kwargs)
        events.append(
            {
                "step": meta["global_step"],
                "layer": name,
                "n_before": lru.state_dim,
                "n_after": result.state_dim,
                "hsv": result.hsv.tolist(),
                "bound": float(result.bound),
                "status": "applied (post-training)",
            }
        )
        reduce_layer(lru, result, None)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, METRICS):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, out_dir / name)
    payload = load_checkpoint(run_dir)
    payload.update(
        architecture=policy.architecture(),
        policy=policy.state_dict(),
        optimizer={},  # moments of the old modes do not carry over
    )
    payload.pop("format_version", None)
    save_checkpoint(out_dir, payload)
    (out_dir / EVENTS).unlink(missing_ok=True)
    save_events(out_dir, events)
    return events
