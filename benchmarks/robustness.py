"""Does memory buy robustness, and does a compressed policy keep it? Randomized dynamics
in training, held-out dynamics in evaluation, four policies per seed, on each task.

    python benchmarks/robustness.py [--envs Hopper-v5,Walker2d-v5] [--seeds 0,1,2,3,4,5]
        [--dynamics wide] [--budget 32] [--total-steps 1000000] [--workers 2]
        [--grid mass=0.5:1.5:3,friction=0.3:2.0:3] [--episodes 10]
        [--out runs/benchmarks/robustness] [--sweep-dir ENV=DIR ...] [--report]

Per env one `compressm-rl sweep` (in ``OUT/ENV``, or ``DIR`` for ``--sweep-dir ENV=DIR``,
e.g. a compression sweep of the same task and dynamics whose runs it then shares) trains,
with ``--dynamics`` drawn per episode, per seed:

- full: the SSM (n = 128 per layer),
- compressed: the SSM compressed in training to ``--budget`` complex states per part
  (≤ ``--budget`` per layer),
- small: an SSM trained from scratch at the compressed run's final sizes,
- mlp: an MLP with the same settings (no memory),

and evaluates one more policy, no training needed:

- stateless: the full SSM with its recurrent state reset before every step, which shows
  how much of the SSM's return its memory carries.

Each policy is evaluated deterministically on the training distribution (the sweep's 30
episodes; the stateless SSM's own, same seeds) and on a grid of fixed dynamics (``--grid``:
masses and frictions unless told, e.g. ``gain=0.6:1.4:3,delay=0:4:3``; each point on top of
``--dynamics``' other draws), ``--episodes`` episodes a point; the points outside the
training ranges are the held-out set. Kept per run and grid in ``robustness-HASH.json``
(keyed by the checkpoint), so the script can be stopped and run again. Writes
``OUT/robustness.md`` (means over seeds with expanded 90% bootstrap intervals; SSM / MLP,
compressed / full, small / full, compressed / small and stateless / full paired by seed;
each policy's mean at every grid point) and ``OUT/robustness.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
from compression import run_sweep_workers

from compressm_rl.runs import TorchController, load_policy
from compressm_rl.runs.evaluate import evaluate, evaluate_grid, parse_grid_spec
from compressm_rl.runs.files import atomic_write_text, checkpoint_stamp, kept, save_figure
from compressm_rl.settings import int_list
from compressm_rl.sweep.plan import TRIALS, SweepSpec
from compressm_rl.sweep.stats import bootstrap_mean, bootstrap_ratio
from compressm_rl.sweep.trials import EVAL_SEED, RESULT
from envs import parse_dynamics

METHODS = {
    "full": "SSM",
    "compressed": "SSM compressed",
    "small": "SSM small",
    "mlp": "MLP",
    "stateless": "SSM, state reset every step",
}
RATIOS = (
    ("full", "mlp"),
    ("compressed", "full"),
    ("small", "full"),
    ("compressed", "small"),
    ("stateless", "full"),
)


class StatelessController(TorchController):
    """The SSM with its memory taken away: the recurrent state is zero at every step."""

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.reset()
        return super().act(obs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="Hopper-v5,Walker2d-v5")
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--dynamics", default="wide", help="training dynamics (a spec)")
    parser.add_argument("--budget", type=int, default=32, help="complex states per part")
    parser.add_argument("--total-steps", type=int, default=1_000_000)
    parser.add_argument("--grid", default="mass=0.5:1.5:3,friction=0.3:2.0:3")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per grid point")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/robustness"))
    parser.add_argument(
        "--sweep-dir",
        action="append",
        default=[],
        metavar="ENV=DIR",
        help="run ENV's sweep in DIR (its finished runs of the same settings are reused)",
    )
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="sweep workers per env"
    )
    parser.add_argument("--report", action="store_true", help="only evaluate and report")
    return parser


def sweep_dirs(args: argparse.Namespace, envs: list[str]) -> dict[str, Path]:
    given = dict(item.split("=", 1) for item in args.sweep_dir)
    unknown = set(given) - set(envs)
    if unknown:
        raise SystemExit(f"--sweep-dir names {', '.join(sorted(unknown))}, not in --envs")
    return {env: Path(given[env]) if env in given else args.out / env for env in envs}


def run_sweep(args: argparse.Namespace, env_id: str, out: Path) -> None:
    """Train (or join, or resume) the env's sweep with ``--workers`` processes."""
    argv = ["sweep", "--env", env_id, "--out", str(out), "--study", "robustness"]
    argv += ["--dynamics", args.dynamics, "--budgets", str(args.budget), "--seeds", args.seeds]
    argv += ["--methods", "compressed,small,mlp", "--total-steps", str(args.total_steps)]
    run_sweep_workers(argv, args.workers, env_id)


def held_out(grid: dict[str, list[float]], dynamics: str) -> list[bool]:
    """Per grid point (first key outermost): whether a value lies outside the training
    range of its key (a key the training does not randomize: outside its nominal 1)."""
    ranges = parse_dynamics(dynamics).ranges()
    bounds = [ranges.get(key, (1.0, 1.0)) for key in grid]
    return [
        any(not low <= v <= high for v, (low, high) in zip(point, bounds, strict=True))
        for point in grid_points(grid)
    ]


def evaluate_run(
    run: Path, env_id: str, seed: int, args: argparse.Namespace, stateless: bool = False
) -> dict:
    """The run's training-distribution return (the sweep's) and its held-out grid
    returns, evaluated once per checkpoint and grid (``robustness-HASH.json``);
    ``stateless``: those of the run's policy with its state reset every step."""
    key = {
        "checkpoint": checkpoint_stamp(run),
        "grid": args.grid,
        "episodes": args.episodes,
        "dynamics": args.dynamics,
        "seed": EVAL_SEED + seed,
    }
    # One file per grid, so a second grid (e.g. delay x motor gain) keeps the first's results.
    digest = hashlib.sha1(args.grid.encode()).hexdigest()[:8]
    cache = run / f"robustness-{'stateless-' if stateless else ''}{digest}.json"
    return kept(cache, key, lambda: _evaluate_run(run, env_id, seed, args, stateless))


def _evaluate_run(
    run: Path, env_id: str, seed: int, args: argparse.Namespace, stateless: bool
) -> dict:
    policy, _ = load_policy(run)
    controller = (StatelessController if stateless else TorchController)(policy, frozen=True)
    grid = evaluate_grid(
        controller, env_id, args.grid, args.episodes, EVAL_SEED + seed, args.dynamics
    )
    trial = json.loads((run / RESULT).read_text())["result"]
    train_dist, train_return = trial["det_return"], trial["train_return"]
    if stateless:  # the sweep's evaluation, repeated without memory; nothing was trained
        returns = evaluate(
            controller, env_id, SweepSpec.eval_episodes, EVAL_SEED + seed, args.dynamics
        )
        train_dist, train_return = float(returns.mean()), None
    return {
        "train_dist": train_dist,
        "train_return": train_return,
        "actor_dims": trial["actor_dims"],
        "grid_means": [float(r.mean()) for r in grid.returns],
    }


def collect(args: argparse.Namespace, dirs: dict[str, Path]) -> dict:
    """``{env: {method: [result per seed]}}`` over the seeds every method has finished."""
    seeds = int_list(args.seeds)
    table: dict = {}
    for env_id, out in dirs.items():
        names = {
            "full": "full-b0",
            "compressed": f"compressed-b{args.budget}",
            "small": f"small-b{args.budget}",
            "mlp": "mlp-b0",
        }
        done = [
            s
            for s in seeds
            if all((out / TRIALS / f"{n}-s{s}" / RESULT).exists() for n in names.values())
        ]
        table[env_id] = {
            method: [evaluate_run(out / TRIALS / f"{name}-s{s}", env_id, s, args) for s in done]
            for method, name in names.items()
        }
        table[env_id]["stateless"] = [
            evaluate_run(out / TRIALS / f"{names['full']}-s{s}", env_id, s, args, stateless=True)
            for s in done
        ]
        table[env_id]["seeds"] = done
    return table


def _cell(stats: tuple[float, float, float], digits: str = ".0f") -> str:
    mean, low, high = stats
    if np.isnan(mean):
        return "–"
    return (
        f"{mean:{digits}}"
        if np.isnan(low)
        else f"{mean:{digits}} [{low:{digits}}, {high:{digits}}]"
    )


def report(args: argparse.Namespace, table: dict, outside: list[bool]) -> str:
    grid = parse_grid_spec(args.grid)
    lines = [
        "# Robustness: randomized dynamics in training, held-out dynamics in evaluation",
        "",
        f"Training dynamics `{args.dynamics}`; {args.total_steps:,} env steps per run; "
        f"compressed to {args.budget} complex states per part. Training distribution: the "
        "deterministic return over 30 episodes drawn from the training dynamics. Held out: "
        f"the mean over the {sum(outside)} of {len(outside)} points of `{args.grid}` "
        "outside the training ranges (each point on top of the training dynamics' other "
        f"draws), {args.episodes} episodes a point. Means over seeds [expanded 90% bootstrap "
        "interval]; ratios paired by seed.",
        "",
        "| task | seeds | policy | training distribution | held out | held out / training "
        "distribution | training return |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for env_id, methods in table.items():
        for method, label in METHODS.items():
            rows = methods[method]
            if not rows:
                continue
            train, held, train_return = (
                _values(rows, outside, k) for k in ("train_dist", "held_out", "train_return")
            )
            # How much of its own return a policy keeps off the training distribution.
            kept_off = _cell(bootstrap_ratio(held, train), ".2f")
            cells = [_cell(bootstrap_mean(train)), _cell(bootstrap_mean(held)), kept_off]
            cells.append(_cell(bootstrap_mean(train_return)))
            lines.append(f"| {env_id} | {len(rows)} | {label} | {' | '.join(cells)} |")
    lines += ["", "| task | ratio | training distribution | held out |", "|---|---|---:|---:|"]
    for env_id, methods in table.items():
        if not methods["seeds"]:
            continue
        for a, b in RATIOS:
            cells = [
                _cell(
                    bootstrap_ratio(
                        _values(methods[a], outside, k), _values(methods[b], outside, k)
                    ),
                    ".2f",
                )
                for k in ("train_dist", "held_out")
            ]
            lines.append(f"| {env_id} | {METHODS[a]} / {METHODS[b]} | {' | '.join(cells)} |")
    lines += ["", *point_table(table, grid, outside)]
    return "\n".join(lines) + "\n"


def point_table(table: dict, grid: dict[str, list[float]], outside: list[bool]) -> list[str]:
    """Each policy's mean return over seeds at every grid point: where it breaks."""
    heads = [
        ", ".join(f"{v:g}" for v in point) + ("" if out else " (in)")
        for point, out in zip(grid_points(grid), outside, strict=True)
    ]
    lines = [
        f"Mean return at each grid point ({', '.join(grid)}); (in): inside the training ranges.",
        "",
        "| task | policy | " + " | ".join(heads) + " |",
        "|---|---|" + "---:|" * len(heads),
    ]
    for env_id, methods in table.items():
        for method, label in METHODS.items():
            if methods[method]:
                means = np.mean([r["grid_means"] for r in methods[method]], axis=0)
                lines.append(
                    f"| {env_id} | {label} | " + " | ".join(f"{m:.0f}" for m in means) + " |"
                )
    return lines


def grid_points(grid: dict[str, list[float]]) -> list[tuple]:
    """The grid's points in ``evaluate_grid``'s order (first key outermost)."""
    return list(itertools.product(*grid.values()))


def _values(rows: list[dict], outside: list[bool], key: str) -> np.ndarray:
    if key == "held_out":
        return np.array([np.mean(np.array(r["grid_means"])[outside]) for r in rows])
    return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=np.float64)


def plot(table: dict, outside: list[bool], path: Path) -> None:
    """Bars per task: each policy's mean return on the training distribution and held
    out, with the intervals over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = [env for env in table if table[env]["seeds"]]
    fig, axes = plt.subplots(
        1, max(1, len(envs)), figsize=(6.5 * max(1, len(envs)), 4), squeeze=False
    )
    for ax, env_id in zip(axes[0], envs, strict=False):
        for offset, (key, name) in enumerate(
            (("train_dist", "training distribution"), ("held_out", "held out"))
        ):
            stats = [bootstrap_mean(_values(table[env_id][m], outside, key)) for m in METHODS]
            mean = np.array([s[0] for s in stats])
            err = np.nan_to_num(
                np.array([[m - s[1], s[2] - m] for m, s in zip(mean, stats, strict=True)]).T
            )
            ax.bar(
                np.arange(len(METHODS)) + 0.4 * offset, mean, 0.4, yerr=err, capsize=3, label=name
            )
        ax.set_xticks(
            np.arange(len(METHODS)) + 0.2,
            [m.replace(", ", ",\n") for m in METHODS.values()],
            fontsize=8,
        )
        ax.set(
            title=f"{env_id} ({len(table[env_id]['seeds'])} seeds)", ylabel="deterministic return"
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    args = build_parser().parse_args()
    envs = args.envs.split(",")
    grid = parse_grid_spec(args.grid)  # bad specs fail before anything runs
    parse_dynamics(args.dynamics)
    dirs = sweep_dirs(args, envs)
    if not args.report:
        for env_id, out in dirs.items():
            run_sweep(args, env_id, out)
    outside = held_out(grid, args.dynamics)
    if not any(outside):
        raise SystemExit(f"--grid {args.grid}: no point lies outside the training ranges")
    table = collect(args, dirs)
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(args, table, outside)
    atomic_write_text(args.out / "robustness.md", text)
    plot(table, outside, args.out / "robustness.png")
    print(text, flush=True)


if __name__ == "__main__":
    main()
