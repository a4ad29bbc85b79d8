"""One trial of a sweep: train its run (or resume it, or wait for the worker training
it), evaluate it deterministically, export it to C and time the C step on this machine.

A trial's results are kept in its run directory (``trial.json``, keyed by the checkpoint
and the measuring settings), so a trial that runs again on a finished run directory (a
retry, a duplicate) re-reads them instead of measuring again; the runs themselves are
trained once: a finished run is never trained again, an unfinished one is resumed from
its checkpoint, and one that another process is training is waited for (its lock).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from compressm_rl.runs import (
    MetricsLog,
    RunDirectoryBusy,
    TorchController,
    TrainConfig,
    evaluate,
    load_checkpoint,
    load_policy,
    locked_run_dir,
)
from compressm_rl.runs.checkpoint import CHECKPOINT
from compressm_rl.runs.config import CONFIG, MACHINE_SETTINGS, trained_with
from compressm_rl.runs.files import checkpoint_stamp, keep, read_kept
from compressm_rl.sweep import plan
from compressm_rl.sweep.stats import training_return

RESULT = "trial.json"
C_EXPORT = "policy_c"
EVAL_SEED = 10_000  # episode k of seed s starts at reset(seed=EVAL_SEED + s + k)
BUSY_POLL_S = 2.0  # how often a trial waiting for another worker's run looks again

Say = Callable[[str], None]


def run_trial(spec: plan.SweepSpec, params: dict, out: Path, say: Say) -> dict:
    """Make the policy of ``params`` (training what it needs that is not trained yet) and
    measure it; returns its results (``measure``) with ``trained_from``: the env step
    this trial started training its own run at (None: it trained nothing of it)."""
    kind, run = params["kind"], plan.run_dir(out, params)
    cached = read_result(run, spec)
    if cached is not None:
        say(f"{run.name}: finished before, results re-read")
        return {**cached, "trained_from": None}
    if kind == "full":
        trained_from = ensure_trained(plan.full_config(spec, params["seed"]), run, say)
    elif kind == "compressed":
        trained_from = ensure_trained(plan.compressed_config(spec, params), run, say)
    elif kind == "mlp":
        trained_from = ensure_trained(plan.mlp_config(spec, params["seed"]), run, say)
    elif kind == "tuned":
        trained_from = ensure_trained(plan.tuned_config(spec, params), run, say)
    else:  # small and posthoc take the compressed run's final sizes
        compressed = plan.with_kind(params, "compressed")
        source = plan.run_dir(out, compressed)
        ensure_trained(plan.compressed_config(spec, compressed), source, say)
        dims = load_policy(source)[0].actor.state_dims
        if kind == "small":
            trained_from = ensure_trained(plan.small_config(spec, params, dims), run, say)
        else:
            full = plan.with_kind(params, "full")
            full_dir = plan.run_dir(out, full)
            ensure_trained(plan.full_config(spec, params["seed"]), full_dir, say)
            make_posthoc(full_dir, run, dims, say)
            trained_from = None
    with holding(run):  # a duplicate of this trial measuring too: one at a time
        result = read_result(run, spec)
        if result is None:
            result = measure(spec, run, params["seed"], trained=kind != "posthoc")
            write_result(run, spec, result)
    return {**result, "trained_from": trained_from}


@contextmanager
def holding(run: Path) -> Iterator[None]:
    """Hold ``run``'s lock for the ``with`` block, waiting while another process holds it."""
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(locked_run_dir(run))
                break
            except RunDirectoryBusy:
                time.sleep(BUSY_POLL_S)
        yield


def is_trained(config: TrainConfig, run: Path) -> bool:
    """Whether ``run`` holds a run of ``config`` trained to its last iteration (a run of
    other settings there is a ``ValueError``: the sweep's directory holds another sweep)."""
    if not (run / CHECKPOINT).exists():
        return False
    if not trained_with(run, config):
        raise ValueError(
            f"{run} holds a run of other settings than this sweep's: give the sweep "
            "another --out, or remove that run"
        )
    iterations = max(1, config.ppo.total_steps // config.ppo.steps_per_iteration)
    return load_checkpoint(run).iteration >= iterations


def ensure_trained(config: TrainConfig, run: Path, say: Say) -> int | None:
    """Train ``run`` to its end unless it is there: resume it from its checkpoint if it
    has one, wait while another process trains it. Returns the env step this call started
    training at, or None if it trained nothing."""
    from compressm_rl.train import train

    waiting = False
    while not is_trained(config, run):
        if _busy(run):  # another worker trains it (e.g. a trial that depends on it)
            if not waiting:
                say(f"{run.name}: another process is training it; waiting")
                waiting = True
            time.sleep(BUSY_POLL_S)
            continue
        step = load_checkpoint(run).global_step if (run / CHECKPOINT).exists() else 0
        say(f"{run.name}: " + (f"resuming at step {step}" if step else "training from step 0"))
        try:
            # A directory with a config.yaml is a run: resume it (from step 0 if it has no
            # checkpoint yet); train() holds its lock, so one process trains it at a time.
            train(config, run, resume=(run / CONFIG).exists(), progress=False)
        except RunDirectoryBusy:  # taken between the look and the lock
            continue
        return step
    return None


def _busy(run: Path) -> bool:
    """Whether another process holds ``run``'s training lock."""
    if not run.is_dir():
        return False
    try:
        with locked_run_dir(run):
            return False
    except RunDirectoryBusy:
        return True


def make_posthoc(full_dir: Path, run: Path, actor_dims: list[int], say: Say) -> None:
    """Balanced truncation of the finished full run to ``actor_dims`` per layer, saved as
    the run ``run`` (once: a finished one is kept)."""
    from compressm_rl.posthoc import compress_run

    while not (run / CHECKPOINT).exists():
        try:
            # A directory without a checkpoint holds a truncation killed mid-write.
            compress_run(full_dir, run, state_dims=list(actor_dims), overwrite=True)
            say(f"{run.name}: truncated {full_dir.name} to {list(actor_dims)}")
        except RunDirectoryBusy:
            time.sleep(BUSY_POLL_S)


def measure(spec: plan.SweepSpec, run: Path, seed: int, trained: bool) -> dict:
    """A finished run's numbers: training return (None where it was not trained:
    ``posthoc``), deterministic return over ``spec.eval_episodes`` episodes, final actor
    sizes, the C step's median latency on this machine (µs, batch 1) and the training's
    wall-clock (s). The deterministic return is taken on the sweep's training dynamics."""
    from compressm_rl.deploy import export_c_run
    from export.bench import cpu_model
    from export.c_bench import bench_c

    policy, meta = load_policy(run)
    controller = TorchController(policy, frozen=True)
    # On the dynamics the sweep trains on (the plain task unless --dynamics was given).
    dynamics = spec.config.get("dynamics") or None
    returns = evaluate(controller, spec.env_id, spec.eval_episodes, EVAL_SEED + seed, dynamics)
    export_c_run(run, run / C_EXPORT, parity_steps=spec.parity_steps)
    timing = bench_c(run / C_EXPORT, steps=spec.bench_steps, warmup=spec.bench_steps // 10)
    rows = MetricsLog(run).read()
    dims = [int(n) for n in policy.actor.state_dims]
    return {
        "train_return": training_return(run) if trained else None,
        "det_return": float(returns.mean()),
        "det_return_std": float(returns.std()),
        "actor_dims": dims,
        "critic_dims": [int(n) for n in policy.critic.state_dims],
        "total_states": sum(dims),
        "c_p50_us": float(np.percentile(timing.times_ns, 50) / 1e3),
        "cpu": cpu_model(),
        "global_step": int(meta["global_step"]),
        "train_wall_s": float(rows[-1]["wall_time"]) if rows and trained else None,
    }


def _result_key(run: Path, spec: plan.SweepSpec) -> dict:
    """What a kept result must match to be re-read: the checkpoint it measured, the
    measuring settings, and the sweep's run settings (another sweep's results in the same
    directory are not this one's; a machine's own settings may differ between workers)."""
    measuring = {k: getattr(spec, k) for k in ("eval_episodes", "parity_steps", "bench_steps")}
    runs = {k: v for k, v in spec.config.items() if k not in MACHINE_SETTINGS}
    sweep = {"env_id": spec.env_id, "config": runs, "recipe": spec.recipe}
    return {"checkpoint": checkpoint_stamp(run), **measuring, **sweep}


def read_result(run: Path, spec: plan.SweepSpec) -> dict | None:
    """The results a trial kept in ``run``, if they are of its present checkpoint and
    this sweep's measuring settings."""
    if not (run / CHECKPOINT).exists():
        return None
    return read_kept(run / RESULT, _result_key(run, spec))


def write_result(run: Path, spec: plan.SweepSpec, result: dict) -> None:
    keep(run / RESULT, _result_key(run, spec), result)
