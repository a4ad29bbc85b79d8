"""In-training compression against its baselines, side by side: `compressm-rl sweep` per env.

    python benchmarks/compression.py [--envs Hopper-v5,Hopper-v5-P] [--seeds 0,1]
        [--total-steps 1000000] (--compress-tol 0.1 | --compress-to N) [any other
        `compressm-rl train` compression flag: --compress-gramian data --heal-steps 50 ...]
        [--out runs/benchmarks/compression] [--reuse-from DIR] [--workers 2]
        [--without-small] [--ppo '{desired_kl: 0.01, anneal_lr: false}']

The compression flags are `compressm-rl train`'s, with its defaults (both are derived from
``CompressionConfig``).

Per env, one sweep (``compressm-rl sweep``, in ``OUT/ENV``) of one target over the seeds:
1. uncompressed (n = 128 per layer),
2. compressed in training to ``--compress-to`` (``--budgets`` of the sweep) or by
   ``--compress-tol`` (its ``--tols``), with every other compression flag given here,
3. small from scratch at (2)'s final actor sizes (the critic too, unless
   ``--compress-parts actor``),
4. post-training compression of (1) to those sizes (no fine-tuning).
``--without-small`` leaves (3) out. ``--ppo`` overrides PPO settings (on top of the task
preset) for every policy alike. ``--workers`` sweep workers share each env's trials
(``compressm-rl sweep`` in as many processes); the sweep reports the deterministic return
(30 episodes), the training return of the last 50 iterations, the final sizes, the
training wall-clock and the C step's latency, with expanded 90% bootstrap intervals over seeds (``OUT/ENV/pareto.md``,
printed at the end, and ``pareto.png``). Finished runs are kept, so the script can be
stopped and run again: the workers resume where they stopped (each worker is a process of
its own: one still running when the script is killed goes on with the sweep's trials, and
a new run of the script joins it).

``OUT/ENV-sSEED/{1-full,2-compressed,3-small,4-posthoc}`` link each seed's runs (for
``benchmarks/compare.py`` and ``benchmarks/action_noise.py``, which read that layout and
this module's ``summarise``). ``--reuse-from DIR`` links the full runs (1) of another
``--out`` instead of training them again (so every method is compared with the same full
runs); (2)/(1) then pairs only where one code on one kind of CPU made both
(``run_parting_step``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from compressm_rl.compression import CompressionConfig
from compressm_rl.runs import TorchController, evaluate, load_policy
from compressm_rl.runs.files import atomic_write_text, checkpoint_stamp, kept
from compressm_rl.settings import add_flags, flagged_fields, given_flags, int_list
from compressm_rl.sweep.plan import TRIALS
from compressm_rl.sweep.stats import (  # noqa: F401  (benchmarks/compare.py imports them here)
    TRAIN_RETURN_ITERATIONS,
    bootstrap_ratio,
    parting_step,
    run_parting_step,
    running_returns,
    training_return,
)
from compressm_rl.sweep.trials import is_trained as is_done  # noqa: F401  (compare.py)

LABELS = {
    "1-full": "full",
    "2-compressed": "compressed",
    "3-small": "small",
    "4-posthoc": "posthoc",
}
# A 10-episode deterministic return moved by up to 790 between two episode sets
# (Hopper-v5-P); the sweep evaluates each policy on 30.
EVAL_EPISODES = 30


def deterministic_returns(run_dir: Path, policy, env_id: str, seed: int) -> np.ndarray:
    """``EVAL_EPISODES`` deterministic returns of the run's ``policy`` (episode k starts at
    ``reset(seed=10_000 + seed + k)``, as the sweep's evaluation), kept in the run's
    ``evaluation.json`` so that the same checkpoint is not evaluated twice."""
    first_seed = 10_000 + seed
    key = {
        "checkpoint": checkpoint_stamp(run_dir),
        "env_id": env_id,
        "episodes": EVAL_EPISODES,
        "first_seed": first_seed,
        "controller": "TorchController(frozen=True)",
    }
    controller = TorchController(policy, frozen=True)
    returns = kept(
        run_dir / "evaluation.json",
        key,
        lambda: evaluate(controller, env_id, EVAL_EPISODES, first_seed).tolist(),
    )
    return np.array(returns)


def summarise(run_dir: Path, env_id: str, seed: int, label: str) -> dict:
    """One run's numbers as ``benchmarks/compare.py`` reads them."""
    from compressm_rl.runs import MetricsLog

    policy, meta = load_policy(run_dir)
    returns = deterministic_returns(run_dir, policy, env_id, seed)
    rows = MetricsLog(run_dir).read()
    train_return = training_return(run_dir) if label != "4-posthoc" else None
    return {
        "label": label,
        "env": env_id,
        "seed": seed,
        "return": float(returns.mean()),
        "return_std": float(returns.std()),
        # (4) was not trained: its metrics are (1)'s
        "train_return": float("nan") if train_return is None else train_return,
        "actor_n": policy.actor.state_dims,
        "critic_n": policy.critic.state_dims,
        "wall_s": float(rows[-1]["wall_time"]) if rows else float("nan"),
        "global_step": meta["global_step"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="Hopper-v5,Hopper-v5-P")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--total-steps", type=int, default=1_000_000)
    add_flags(
        parser.add_argument_group("(2)'s compression, as in `compressm-rl train`"),
        CompressionConfig,
    )
    parser.add_argument("--reuse-from", type=Path, help="link the full runs (1) of this --out")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/compression"))
    parser.add_argument("--without-small", action="store_true", help="leave (3) out")
    parser.add_argument(
        "--ppo", type=yaml.safe_load, default={}, help="PPO overrides, a YAML mapping"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="sweep workers (processes) per env",
    )
    return parser


def sweep_argv(args: argparse.Namespace, env_id: str, compression: dict) -> list[str]:
    """`compressm-rl sweep`'s command line for one env: the target as its grid, every
    other compression flag given here passed on."""
    out = args.out / env_id
    argv = ["sweep", "--env", env_id, "--out", str(out), "--seeds", args.seeds]
    argv += ["--total-steps", str(args.total_steps)]
    argv += [
        "--methods",
        "compressed,posthoc" if args.without_small else "compressed,small,posthoc",
    ]
    argv += ["--budgets", str(compression["budget"])] if compression.get("budget") else []
    argv += ["--tols", str(compression["tol"])] if compression.get("tol") else []
    for f in flagged_fields(CompressionConfig):
        if f.name in compression and f.name not in ("budget", "tol"):
            value = compression[f.name]
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            argv += [f.metadata["flag"], text]
    if args.ppo:  # the sweep takes PPO overrides in its --config file
        config = out / "ppo.yaml"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config, yaml.safe_dump({"ppo": args.ppo}))
        argv += ["--config", str(config)]
    return argv


def run_sweep_workers(argv: list[str], workers: int, env_id: str) -> None:
    """``compressm-rl sweep`` with ``argv`` in ``workers`` processes, waited for; a worker's
    failure or a Ctrl-C (which the workers get too: each saves its run and stops) ends
    the script with the way to resume."""
    command = [sys.executable, "-m", "compressm_rl.cli", *argv]
    processes = [subprocess.Popen(command) for _ in range(max(1, workers))]
    try:
        statuses = [process.wait() for process in processes]
    except KeyboardInterrupt:
        [process.wait() for process in processes]
        raise SystemExit("stopped (Ctrl-C); run the same command again to resume") from None
    if any(statuses):
        raise SystemExit(f"{env_id}: a sweep worker exited with {max(statuses)} (see above)")


def link(path: Path, target: Path) -> None:
    """``path`` a relative symbolic link to ``target`` (kept if it is one already)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_symlink() and not path.exists():
        path.symlink_to(os.path.relpath(target, path.parent))


def reuse_full_runs(source: Path, out: Path, env_id: str, seeds: list[int]) -> None:
    """Link the finished full runs of another ``--out`` (either layout) into this one's."""
    for seed in seeds:
        name = f"full-b0-s{seed}"
        target = source / env_id / TRIALS / name
        if not (target / "checkpoint.pt").exists():
            target = source / f"{env_id}-s{seed}" / "1-full"
        if not (target / "checkpoint.pt").exists():
            raise SystemExit(f"--reuse-from: {source} holds no full run of {env_id} seed {seed}")
        link(out / env_id / TRIALS / name, target.resolve())


def link_labels(out: Path, env_id: str, seeds: list[int], target: str) -> None:
    """``OUT/ENV-sSEED/LABEL`` -> the sweep's run of that method, target and seed."""
    for seed in seeds:
        for label, kind in LABELS.items():
            name = f"full-b0-s{seed}" if kind == "full" else f"{kind}-{target}-s{seed}"
            if (out / env_id / TRIALS / name).exists():
                link(out / f"{env_id}-s{seed}" / label, out / env_id / TRIALS / name)


def wall_clock_ratios(out: Path, env_id: str, seeds: list[int]) -> str:
    """(2)/(1) training wall-clock per seed, from each run's last logged ``wall_time``
    (comparable where both trained under one load: with ``--workers 2`` a seed's (1) and
    (2) are taken together, the first seed's at once)."""
    from compressm_rl.runs import MetricsLog

    lines = [f"{env_id}: (2)/(1) training wall-clock per seed"]
    for seed in seeds:
        runs = [out / f"{env_id}-s{seed}" / label for label in ("2-compressed", "1-full")]
        if all((run / "metrics.csv").exists() for run in runs):
            compressed, full = (float(MetricsLog(r).read()[-1]["wall_time"]) for r in runs)
            lines.append(
                f"  seed {seed}: {compressed / full:.3f} ({compressed:.0f} s / {full:.0f} s)"
            )
    return "\n".join(lines)


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    try:
        compression = CompressionConfig.from_dict(given_flags(args, CompressionConfig))
    except ValueError as err:
        parser.error(str(err))
    if not compression.enabled:
        parser.error("give --compress-tol or --compress-to: how far (2) is compressed")
    if not isinstance(args.ppo, dict):
        parser.error(f"--ppo takes a YAML mapping such as '{{lr: 1.0e-3}}', not {args.ppo!r}")
    given = given_flags(args, CompressionConfig)
    target = f"b{compression.budget}" if compression.budget else f"t{compression.tol:g}"
    seeds = int_list(args.seeds)
    for env_id in args.envs.split(","):
        if args.reuse_from is not None:
            reuse_full_runs(args.reuse_from, args.out, env_id, seeds)
        run_sweep_workers(sweep_argv(args, env_id, given), args.workers, env_id)
        link_labels(args.out, env_id, seeds, target)
        print((args.out / env_id / "pareto.md").read_text(), flush=True)
        print(wall_clock_ratios(args.out, env_id, seeds), flush=True)


if __name__ == "__main__":
    main()
