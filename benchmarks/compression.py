"""In-training compression against its baselines, side by side.

    python benchmarks/compression.py [--envs Hopper-v5,Hopper-v5-P] [--seeds 0,1]
        [--total-steps 1000000] (--compress-tol 0.1 | --compress-to N) [any other
        `compressm-rl train` compression flag: --compress-gramian data --heal-steps 50 ...]
        [--out runs/benchmarks/compression] [--reuse-from DIR] [--workers 2]
        [--without-small] [--ppo '{desired_kl: 0.01, anneal_lr: false}']

The compression flags are `compressm-rl train`'s, with its defaults (both are derived from
``CompressionConfig``).

Per env and seed, four policies:
1. uncompressed (n = 128 per layer),
2. compressed in training at the fractions ``--compress-at`` of training: by energy
   (``--compress-tol``, per layer) or to a state budget per part (``--compress-to``, with
   ``--compress-allocation``), on white-noise or data-weighted HSVs
   (``--compress-gramian``), with cut-and-heal if ``--heal-steps``, with its lr multiplied
   by ``--compress-lr-scale`` after the first cut, and each reduced mode's B/C split as
   ``--compress-mode-scale`` says,
3. small from scratch at (2)'s final actor sizes (the critic too, unless
   ``--compress-parts actor``),
4. post-training compression of (1) to those sizes (no fine-tuning).
``--without-small`` leaves (3) out, for a check of (2)/(1) alone (e.g. over longer
training) that does not pay for (3)'s training. ``--ppo`` overrides PPO settings (on top
of the task preset) for every policy alike.
Reports deterministic return (30 episodes), the training return of the last 50
iterations (the stochastic policy's episodes, ~250 of them: less noisy than 10
deterministic ones), final per-layer n, wall-clock training time and training env
steps/s after the last reduction, and plots the training curves and per-seed returns
(``compression.png`` in ``--out``), with bootstrap 90% intervals of the ratios of mean
returns (2)/(1) (paired by seed where (2) kept (1)'s trajectory up to its first cut) and
(2)/(3) (unpaired: they share only the seed of their first rollout); the intervals are
expanded for the few seeds (``bootstrap_ratio``). Runs already in
``--out`` are reused (and their evaluations, kept in ``evaluation.json``), so the script
can be stopped and restarted, with Ctrl-C or by killing the script: on Linux its training
processes get SIGTERM when it dies, save their last iteration and exit (so a restarted
script never resumes a run that an orphan is still training).

With ``--workers 2`` (the default on a machine with two or more cores) (1) and (2) of a
seed start at the same time, one process per core, so that their wall-clock ratio is
measured under the same machine load (on this shared VM one run's iteration time has
drifted by 25% between hours); when (2) ends, (3) takes its core, so (1) keeps a
neighbour to its end (at these sizes (3) outlasts (1)). Such a seed directory gets a
``side_by_side`` marker, reported with the results. Methods are compared at equal size
by giving each its own ``--out`` and the same ``--compress-to``; ``--reuse-from DIR``
links (1) and (3) from another method's directory instead of training them again (so
every method is compared with the same full and small runs; no wall-clock ratio side by
side then). Such a (1) pairs with (2) only if the same code on the same kind of CPU made
both: the report says where (2) left (1)'s trajectory before its first cut, and reads
(2)/(1) unpaired then.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from compressm_rl.compression import CompressionConfig
from compressm_rl.posthoc import compress_run
from compressm_rl.runs import (
    EventLog,
    MetricsLog,
    TorchController,
    TrainConfig,
    evaluate,
    load_checkpoint,
    load_policy,
)
from compressm_rl.runs.config import trained_with
from compressm_rl.runs.files import atomic_write_text
from compressm_rl.settings import add_flags, given_flags
from compressm_rl.stopping import TrainingStopped
from compressm_rl.train import train
from policies.actor_critic import ActorCritic

LABELS = ("1-full", "2-compressed", "3-small", "4-posthoc")
TRAIN_RETURN_ITERATIONS = 50
# A 10-episode deterministic return moved by up to 790 between two episode sets
# (Hopper-v5-P). 30 episodes of 1,000 steps cost ~15-25 s a policy with
# TorchController's frozen step (~1 min on the eager path).
EVAL_EPISODES = 30


def run_once(config: TrainConfig, run_dir: Path) -> None:
    """Train unless a finished run is already there (resume an unfinished one); one line
    of progress per run (two bars from two processes would garble each other)."""
    try:
        if not is_done(config, run_dir) and not _orphaned():
            resume = (run_dir / "checkpoint.pt").exists()
            _say(f"{run_dir}: {'resuming' if resume else 'training'}")
            train(config, run_dir, resume=resume, progress=False)
            rows = MetricsLog(run_dir).read()
            _say(f"{run_dir}: done in {float(rows[-1]['wall_time']):.0f} s")
    except TrainingStopped as stopped:  # Ctrl-C or SIGTERM: the script is stopping too
        _say(str(stopped))
        os._exit(stopped.exit_status)  # so start none of the tasks queued here
    finally:
        if _orphaned():  # the script died (its SIGTERM stopped `train`): take no more tasks
            os._exit(1)  # (an orphaned pool worker would wait on its queue forever)


_script_pid: int | None = None  # in a training process: the script's


def _stop_with_parent(script_pid: int) -> None:
    """Pool initializer: on Linux the kernel sends this worker SIGTERM when the script
    dies, however it dies (SIGKILL included); training then stops as on any SIGTERM."""
    global _script_pid
    _script_pid = script_pid  # an orphan's parent is another process (checked after prctl)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # <sys/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if _orphaned():  # the script died before the request above: no signal will come
        os._exit(1)


def _orphaned() -> bool:
    return _script_pid is not None and os.getppid() != _script_pid


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: lines from two processes stay whole
    sys.stdout.flush()


def is_done(config: TrainConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run of ``config`` trained to its last iteration (a run
    of other settings there ends the script)."""
    if not (run_dir / "checkpoint.pt").exists():
        return False
    if not trained_with(run_dir, config):  # e.g. another --ppo
        raise SystemExit(f"{run_dir} was trained with other settings: give another --out")
    last_iteration = config.ppo.total_steps - config.ppo.steps_per_iteration
    return load_checkpoint(run_dir).global_step >= last_iteration


def _link_runs(source: Path, base: Path, labels: tuple[str, ...]) -> None:
    """Symlink finished runs ``source/label`` into ``base`` (another method's baselines)."""
    base.mkdir(parents=True, exist_ok=True)
    for label in labels:
        target = (source / label).resolve()
        if not (target / "checkpoint.pt").exists():
            raise SystemExit(f"--reuse-from: {target} holds no run; train that method first")
        if not (base / label).exists():
            (base / label).symlink_to(target)


def deterministic_returns(run_dir: Path, policy: ActorCritic, env_id: str, seed: int) -> np.ndarray:
    """``EVAL_EPISODES`` deterministic returns of the run's ``policy``, kept in the run's
    ``evaluation.json`` so that a restarted script (or another method's, for runs it
    links) does not evaluate the same checkpoint again."""
    checkpoint = (run_dir / "checkpoint.pt").stat()
    first_seed = 10_000 + seed
    key = {
        "checkpoint": [checkpoint.st_size, checkpoint.st_mtime_ns],
        "env_id": env_id,
        "episodes": EVAL_EPISODES,
        "first_seed": first_seed,
        "controller": "TorchController(frozen=True)",
    }
    cache = run_dir / "evaluation.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return np.array(saved["returns"])
    controller = TorchController(policy, frozen=True)
    returns = evaluate(controller, env_id, episodes=EVAL_EPISODES, seed=first_seed)
    atomic_write_text(cache, json.dumps({"key": key, "returns": returns.tolist()}))
    return returns


def parting_step(full_rows: list[dict], rows: list[dict], first_cut: int | None) -> int | None:
    """The env step at which (2)'s metrics ``rows`` left (1)'s ``full_rows`` before (2)'s
    first cut at step ``first_cut``, or None if they had not. (1) and (2) of a seed are the
    same run up to the cut, bit for bit, when one code on one machine trains both; a (1)
    linked with ``--reuse-from`` from a run made by other code (or on another CPU) parts
    from it at once: the numba parametrisation kernels (commit 1100691, within 1.2e-7 of
    the numpy code they replaced) changed the first rollout's return in the 8th digit, and
    by 1M steps such runs are independent samples."""
    for full_row, row in zip(full_rows, rows, strict=False):
        step = int(row["global_step"])
        if first_cut is not None and step > first_cut:
            return None
        if row["episode_return"] != full_row["episode_return"]:
            return step
    return None


def run_parting_step(full_dir: Path, run_dir: Path) -> int | None:
    """``parting_step`` of two run directories, ``run_dir``'s first cut read from its
    event log (a run with no cut is compared over its whole log)."""
    return parting_step(
        MetricsLog(full_dir).read(),
        MetricsLog(run_dir).read(),
        min((e.step for e in EventLog(run_dir).read()), default=None),
    )


def summarise(run_dir: Path, env_id: str, seed: int, label: str) -> dict:
    policy, meta = load_policy(run_dir)
    returns = deterministic_returns(run_dir, policy, env_id, seed)
    rows = MetricsLog(run_dir).read()
    last_reduction = max((e.step for e in EventLog(run_dir).read()), default=0)
    after = [float(r["steps_per_s"]) for r in rows if int(r["global_step"]) > last_reduction]
    last = [r for r in rows[-TRAIN_RETURN_ITERATIONS:] if r["episode_return"]]
    episodes = sum(int(r["episodes"]) for r in last)
    train_return = sum(float(r["episode_return"]) * int(r["episodes"]) for r in last) / max(
        episodes, 1
    )
    return {
        "label": label,
        "env": env_id,
        "seed": seed,
        "return": float(returns.mean()),
        "return_std": float(returns.std()),
        # (4) was not trained: its metrics are (1)'s
        "train_return": train_return if episodes and label != "4-posthoc" else float("nan"),
        "actor_n": policy.actor.state_dims,
        "critic_n": policy.critic.state_dims,
        "wall_s": float(rows[-1]["wall_time"]) if rows else float("nan"),
        "steps_per_s_after": float(np.mean(after)) if after else float("nan"),
        "global_step": meta["global_step"],
    }


def train_all(
    pool: ProcessPoolExecutor,
    runs: list,
    compression: CompressionConfig,
    args: argparse.Namespace,
) -> None:
    """Train (1)-(3) of every ``(env_id, seed, base)`` in ``runs`` on ``pool`` and make (4)."""
    for env_id, seed, base in runs:
        settings = dict(env_id=env_id, total_steps=args.total_steps, seed=seed, ppo=args.ppo)
        full = TrainConfig.from_dict(settings)
        compressed = replace(full, compression=compression)
        # (3) is small where (2) ends small: with --parts actor the critic keeps its size.
        actor_only = "critic" not in compression.parts
        if args.reuse_from is not None:
            linked = ("1-full",) if actor_only else ("1-full", "3-small")
            _link_runs(args.reuse_from / f"{env_id}-s{seed}", base, linked)
        fresh = not any((base / label / "checkpoint.pt").exists() for label in LABELS[:2])
        if args.workers >= 2 and fresh:  # both start at step 0 now (a resumed one did not)
            base.mkdir(parents=True, exist_ok=True)
            (base / "side_by_side").write_text("(1) and (2) started at the same time\n")
        full_run = pool.submit(run_once, full, base / "1-full")
        pool.submit(run_once, compressed, base / "2-compressed").result()
        final_dims = load_policy(base / "2-compressed")[0].actor.state_dims
        small = replace(full, state_dims=final_dims)
        if actor_only:
            small = replace(small, critic_state_dims=full.initial_state_dims)
        elif args.reuse_from is not None:  # (3) is the other method's, at its sizes
            small = replace(full, state_dims=load_policy(base / "3-small")[0].actor.state_dims)
        small_run = None if args.without_small else pool.submit(run_once, small, base / "3-small")
        full_run.result()
        if small_run is not None:
            small_run.result()
        if not (base / "4-posthoc" / "checkpoint.pt").exists():
            compress_run(base / "1-full", base / "4-posthoc", state_dims=final_dims)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="Hopper-v5,Hopper-v5-P")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--total-steps", type=int, default=1_000_000)
    add_flags(
        parser.add_argument_group("(2)'s compression, as in `compressm-rl train`"),
        CompressionConfig,
    )
    parser.add_argument("--reuse-from", type=Path, help="link (1) and (3) from this --out")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/compression"))
    parser.add_argument("--without-small", action="store_true", help="leave (3) out")
    parser.add_argument(
        "--ppo", type=yaml.safe_load, default={}, help="PPO overrides, a YAML mapping"
    )
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="training processes"
    )
    return parser


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
    if compression.lr_scale != 1.0 and args.ppo.get("desired_kl") is not None:
        parser.error(
            "--compress-lr-scale scales the lr after a cut; --ppo desired_kl adapts it: give one"
        )
    try:  # every setting checked before a run directory is made
        for env_id in args.envs.split(","):
            TrainConfig.from_dict(dict(env_id=env_id, total_steps=args.total_steps, ppo=args.ppo))
    except ValueError as err:
        parser.error(str(err))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    runs = [
        (env_id, seed, args.out / f"{env_id}-s{seed}")
        for env_id in args.envs.split(",")
        for seed in (int(s) for s in args.seeds.split(","))
    ]
    # spawn, not fork: a forked child of a process that ran OpenMP regions can hang.
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(
            max_workers=args.workers,
            mp_context=context,
            initializer=_stop_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            train_all(pool, runs, compression, args)
    except (KeyboardInterrupt, BrokenProcessPool):
        raise SystemExit(
            "stopped (Ctrl-C, a signal, or a training process that died: see above); "
            "finished iterations are saved, rerun the same command to resume"
        ) from None
    labels = tuple(label for label in LABELS if not (args.without_small and label == "3-small"))
    results = []
    for env_id, seed, base in runs:
        for label in labels:
            results.append(summarise(base / label, env_id, seed, label))
            results[-1]["side_by_side"] = (base / "side_by_side").exists()
            print(json.dumps(results[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        "\n| env | policy | seeds | return (mean ± std over seeds) | training return, last 50 it. "
        "| final actor n | wall s | steps/s after last reduction |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for env_id in args.envs.split(","):
        for label in labels:
            rows = [r for r in results if r["env"] == env_id and r["label"] == label]
            rets = np.array([r["return"] for r in rows])
            print(
                f"| {env_id} | {label} | {len(rows)} | {rets.mean():.0f} ± {rets.std():.0f} | "
                f"{_fmt(np.mean([r['train_return'] for r in rows]))} | "
                f"{' / '.join(str(r['actor_n']) for r in rows)} | "
                f"{np.mean([r['wall_s'] for r in rows]):.0f} | "
                f"{_fmt(np.mean([r['steps_per_s_after'] for r in rows]))} |"
            )
    print("\n(2)/(1) wall-clock per seed (* = trained side by side):")
    for env_id, seed, _ in runs:
        wall = {r["label"]: r for r in results if r["env"] == env_id and r["seed"] == seed}
        ratio = wall["2-compressed"]["wall_s"] / wall["1-full"]["wall_s"]
        star = "*" if wall["1-full"]["side_by_side"] else ""
        print(f"  {env_id} seed {seed}: {ratio:.3f}{star}")
    # (2) and (3) share only their seed's first rollout, so that ratio is always unpaired;
    # (2)/(1) is paired where every seed's (2) kept (1)'s trajectory up to its first cut.
    parted = {
        (env_id, seed): run_parting_step(base / "1-full", base / "2-compressed")
        for env_id, seed, base in runs
    }
    for (env_id, seed), step in parted.items():
        if step is not None:
            print(
                f"\n{env_id} seed {seed}: (2) left (1)'s trajectory at step {step}, before its "
                "first cut: (1) was trained by other code or on another CPU (--reuse-from?), "
                "or one of them was resumed before the cut, so (2)/(1) is not paired; "
                "retrain (1) in this --out to pair them"
            )
    print("\nBootstrap over seeds (20,000 resamples), ratio of means [expanded 90% interval]:")
    for env_id in args.envs.split(","):
        by = {
            label: [r for r in results if r["env"] == env_id and r["label"] == label]
            for label in labels
        }
        paired_full = all(step is None for (e, _), step in parted.items() if e == env_id)
        for key, name in (("return", "deterministic"), ("train_return", "training")):
            cells = []
            for ref in ("1-full", "3-small")[: 1 if args.without_small else 2]:
                a = [r[key] for r in by["2-compressed"]]
                b = [r[key] for r in by[ref]]
                paired = ref == "1-full" and paired_full
                ratio, low, high = bootstrap_ratio(np.array(a), np.array(b), paired=paired)
                cells.append(
                    f"(2)/({ref[0]}) {ratio:.2f} [{low:.2f}, {high:.2f}]"
                    + ("" if paired else " unpaired")
                )
            print(f"  {env_id}, {name} return: " + "; ".join(cells))
    plot(results, runs, compression.at, labels, args.out / "compression.png")
    print(f"\nplot: {args.out / 'compression.png'}")


def bootstrap_ratio(
    a: np.ndarray, b: np.ndarray, paired: bool = True, resamples: int = 20_000, seed: int = 0
) -> tuple[float, float, float]:
    """``mean(a) / mean(b)`` and its 90% interval from resampling the seeds with
    replacement: pairs ``(a[i], b[i])`` together if ``paired`` (equal lengths), else ``a``
    and ``b`` each on its own (runs that share nothing but a seed number, or a pooled
    reference against one sample). No interval (nan) from fewer than two seeds.

    The interval is Hesterberg's expanded percentile interval: the plain 5th/95th
    percentiles of a bootstrap over n = 6 seeds cover the true ratio only ~82% of the time
    (they miss the small-sample t and n/(n-1) factors), so the tails are taken at
    Φ(sqrt(n/(n-1)) t_{0.05, n-1}), n the smaller sample, instead: 1.4% at n = 6, ~89%
    (paired) and ~92% (unpaired) coverage, simulated on two normal samples of one mean,
    and ~35% wider than the plain interval."""
    if paired and len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    ratio = float(a.mean() / b.mean())
    n = min(len(a), len(b))
    if n < 2:
        return ratio, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    other = picks if paired else rng.integers(0, len(b), size=(resamples, len(b)))
    ratios = a[picks].mean(1) / b[other].mean(1)
    tail = stats.norm.cdf(np.sqrt(n / (n - 1)) * stats.t.ppf(0.05, n - 1))
    low, high = np.percentile(ratios, [100 * tail, 100 * (1 - tail)])
    return ratio, float(low), float(high)


def running_returns(run_dirs: list[Path], window: int) -> tuple[np.ndarray, np.ndarray]:
    """The runs' training return as a ``window``-iteration running mean, cut to the
    shortest run: env steps ``[T]`` and returns ``[len(run_dirs), T]``. An iteration where
    no episode ended repeats the previous iteration's return."""
    smoothed = []
    for run_dir in run_dirs:
        rows = MetricsLog(run_dir).read()
        ret = np.array([float(r["episode_return"] or "nan") for r in rows])
        last_seen = np.maximum.accumulate(np.where(np.isnan(ret), 0, np.arange(len(ret))))
        smoothed.append(
            np.convolve(np.nan_to_num(ret[last_seen]), np.ones(window) / window, "valid")
        )
    length = min(len(x) for x in smoothed)
    steps = np.array([int(r["global_step"]) for r in rows])[window - 1 : window - 1 + length]
    return steps, np.array([x[:length] for x in smoothed])


def plot(
    results: list[dict], runs: list[tuple], at: list[float], labels: tuple[str, ...], path: Path
) -> None:
    """Per env: the training return over env steps (mean ± std over seeds of a
    10-iteration running mean; dotted: reduction points) and each seed's deterministic
    return under every policy in ``labels`` (grey lines join a seed's policies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(env_id for env_id, _, _ in runs))
    fig, axes = plt.subplots(len(envs), 2, figsize=(11, 3.6 * len(envs)), squeeze=False)
    for (curves, paired), env_id in zip(axes, envs, strict=True):
        seeds = [(seed, base) for e, seed, base in runs if e == env_id]
        for label in (label for label in labels if label != "4-posthoc"):
            steps, smoothed = running_returns([base / label for _, base in seeds], window=10)
            mean, std = smoothed.mean(0), smoothed.std(0)
            line = curves.plot(steps, mean, label=label)[0]
            curves.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        for fraction in at:
            curves.axvline(fraction * steps[-1], color="grey", ls=":", lw=1)
        curves.set(title=f"{env_id}: training return ({len(seeds)} seeds)", xlabel="env steps")
        curves.legend(fontsize=8)
        by_key = {(r["env"], r["seed"], r["label"]): r["return"] for r in results}
        table = np.array([[by_key[env_id, seed, label] for label in labels] for seed, _ in seeds])
        x = np.arange(len(labels))
        for row in table:
            paired.plot(x, row, color="grey", alpha=0.4, marker="o")
        paired.plot(x, table.mean(0), color="black", marker="_", ms=30, ls="none")
        paired.set_xticks(x, labels)
        paired.set_title(f"{env_id}: deterministic return per seed (bar: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(x: float) -> str:
    return "-" if np.isnan(x) else f"{x:.0f}"


if __name__ == "__main__":
    main()
