"""Returns at 1M steps on the MuJoCo tasks, beside published PPO figures.

    python benchmarks/tasks.py [--envs Ant-v5,Humanoid-v5,HalfCheetah-v5] [--seeds 0,1,2]
        [--total-steps 1000000] [--policy ssm] [--workers 1] [--worker K]
        [--out runs/benchmarks/tasks] [--report]

Trains each task's preset (``compressm_rl/rl/presets.yaml``) for every seed in
``OUT/ENV-sSEED`` (resumed from its checkpoint when stopped; a finished run is kept),
seed by seed across the tasks, so that every task has a first seed early. ``--workers
N`` with ``--worker K`` (0 ≤ K < N) takes every N-th run from the K-th: start one process
per K, on one machine or several sharing OUT. Then evaluates each finished policy over 30
deterministic episodes (episode k of seed s from ``reset(seed=10_000 + s + k)``, as the
sweep does; ``benchmarks/compression.py``'s evaluation, kept in the run's
``evaluation.json``) and writes ``OUT/tasks.md``: means over
seeds with expanded 90% bootstrap intervals, the training return (the last 50
iterations' episodes), and the published PPO returns at 1M steps, and ``OUT/tasks.png``:
each task's training curves beside those figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from compression import EVAL_EPISODES, deterministic_returns

from compressm_rl.runs import TrainConfig, load_policy
from compressm_rl.runs.files import atomic_write_text, save_figure
from compressm_rl.settings import int_list
from compressm_rl.sweep.stats import bootstrap_mean, running_returns, training_return
from compressm_rl.sweep.trials import ensure_trained, is_trained

# Published PPO (MLP) returns at 1M steps: RL Zoo (SB3, tuned per task), CleanRL
# (ppo_continuous_action, one setting for all), Tianshou (its MuJoCo PPO benchmark).
PUBLISHED = {
    "Ant-v5": {"RL Zoo": 1327, "Tianshou": 3258},
    "Humanoid-v5": {"CleanRL": 716, "Tianshou": 787},
    "HalfCheetah-v5": {"RL Zoo": 5819, "CleanRL": 1443, "Tianshou": 5784},
    "Hopper-v5": {"CleanRL": 2383},
    "Walker2d-v5": {"CleanRL": 2288},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="Ant-v5,Humanoid-v5,HalfCheetah-v5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--total-steps", type=int, default=1_000_000)
    parser.add_argument("--policy", choices=("ssm", "mlp"), default="ssm")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the runs")
    parser.add_argument("--worker", type=int, default=0, help="this process's index")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/tasks"))
    parser.add_argument("--report", action="store_true", help="only evaluate and report")
    return parser


def runs(args: argparse.Namespace) -> list[tuple[str, int, Path]]:
    """``(env, seed, run directory)``, seed by seed across the tasks."""
    return [
        (env, seed, args.out / f"{env}-s{seed}")
        for seed in int_list(args.seeds)
        for env in args.envs.split(",")
    ]


def config_of(args: argparse.Namespace, env_id: str, seed: int) -> TrainConfig:
    data = {"env_id": env_id, "seed": seed, "policy": args.policy}
    return TrainConfig.from_dict({**data, "ppo": {"total_steps": args.total_steps}})


def _cell(values: list[float]) -> str:
    mean, low, high = bootstrap_mean(np.array(values))
    return f"{mean:.0f}" if np.isnan(low) else f"{mean:.0f} [{low:.0f}, {high:.0f}]"


def finished(args: argparse.Namespace, env_id: str) -> list[tuple[int, Path]]:
    """``(seed, run directory)`` of ``env_id``'s finished runs."""
    return [
        (seed, run)
        for env, seed, run in runs(args)
        if env == env_id and is_trained(config_of(args, env, seed), run)
    ]


def plot(args: argparse.Namespace, path: Path) -> None:
    """One panel a task: each seed's training return (20-iteration running mean) against
    env steps, the published PPO returns at the run length as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = args.envs.split(",")
    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 3.4), squeeze=False)
    for ax, env_id in zip(axes[0], envs, strict=True):
        done = finished(args, env_id)
        if done:
            steps, curves = running_returns([run for _, run in done], window=20)
            for (seed, _), curve in zip(done, curves, strict=True):
                ax.plot(steps, curve, lw=1, label=f"seed {seed}")
        for i, (source, value) in enumerate(PUBLISHED.get(env_id, {}).items()):
            ax.axhline(
                value, color="grey", ls=("--", ":", "-.")[i % 3], lw=1, label=f"{source} PPO"
            )
        ax.set(title=env_id, xlabel="env steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training return (20-iteration mean)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def report(args: argparse.Namespace) -> str:
    lines = [
        f"# Returns at {args.total_steps:,} steps ({args.policy.upper()} policy, task presets)",
        "",
        f"Deterministic return over {EVAL_EPISODES} episodes per seed, training return over "
        "the last 50 iterations; means over seeds [expanded 90% bootstrap interval].",
        "",
        "| task | seeds | deterministic return | per seed | training return | published PPO |",
        "|---|---:|---:|---|---:|---|",
    ]
    for env_id in args.envs.split(","):
        done = finished(args, env_id)
        published = ", ".join(f"{k} {v}" for k, v in PUBLISHED.get(env_id, {}).items()) or "–"
        if not done:
            lines.append(f"| {env_id} | 0 | – | – | – | {published} |")
            continue
        det = [
            float(deterministic_returns(run, load_policy(run)[0], env_id, seed).mean())
            for seed, run in done
        ]
        train = [training_return(run) for _, run in done]
        per_seed = ", ".join(f"{d:.0f}" for d in det)
        lines.append(
            f"| {env_id} | {len(done)} | {_cell(det)} | {per_seed} | {_cell(train)} | {published} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if not 0 <= args.worker < args.workers:
        parser.error(f"--worker {args.worker} is out of range: 0 to --workers - 1")
    todo = runs(args)
    for env_id, seed, _ in todo:  # every config checked before anything trains
        config_of(args, env_id, seed)
    if not args.report:
        for env_id, seed, run in todo[args.worker :: args.workers]:
            ensure_trained(config_of(args, env_id, seed), run, lambda line: print(line, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(args)
    atomic_write_text(args.out / "tasks.md", text)
    plot(args, args.out / "tasks.png")
    print(text, flush=True)


if __name__ == "__main__":
    main()
