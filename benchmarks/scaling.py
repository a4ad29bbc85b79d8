"""Data-parallel scaling: env steps/s of 1 vs K ranks, same per-rank settings, side by side.

    python benchmarks/scaling.py [--env Hopper-v5] [--ranks 1,2] [--iterations 6] [--rounds 3]

Each round trains every rank count once, in turn (``compressm-rl train --nproc K``, the
task preset per rank: Hopper-v5 8 envs × 256 steps, SSM n = 128, one torch thread a rank),
for ``--iterations`` iterations of K rollouts each. A row's env steps/s is the median over
the iterations after the first (start-up, numba compilation) of ``metrics.csv``'s
``steps_per_s``, which counts every rank's steps; the speed-up is the median over rounds of
the per-round ratio to one rank. Needs a core per rank.

Each round also runs K independent one-rank trainings at the same time (no process group,
nothing exchanged; the row "K apart" sums their env steps/s): the most K processes get
from this machine, so about the ceiling for any data-parallel scheme on it (a sum of
medians: it reads high if one run ends well before the other).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from compressm_rl.rl.config import preset_for
from compressm_rl.runs import MetricsLog
from export.bench import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def train_command(env_id: str, total_steps: int, out: Path) -> list[str]:
    """``compressm-rl train`` of ``env_id`` for ``total_steps`` into ``out``, quietly."""
    command = [sys.executable, "-m", "compressm_rl.cli", "train", "--env", env_id]
    command += ["--total-steps", str(total_steps), "--out", str(out)]
    return command + ["--overwrite", "--no-progress"]


def median_rate(run: Path) -> float:
    """Median ``steps_per_s`` of a finished run's iterations after the first."""
    return float(np.median([float(r["steps_per_s"]) for r in MetricsLog(run).read()[1:]]))


def steps_per_second(env_id: str, ranks: int, iterations: int, out: Path) -> float:
    per_rank = preset_for(env_id).steps_per_iteration
    command = train_command(env_id, per_rank * ranks * iterations, out) + ["--nproc", str(ranks)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return median_rate(out)


def steps_per_second_apart(env_id: str, copies: int, iterations: int, out: Path) -> float:
    """Summed env steps/s of ``copies`` one-rank runs started together (seeds 0, 1, ...)."""
    per_rank = preset_for(env_id).steps_per_iteration
    procs = []
    for copy in range(copies):
        command = train_command(env_id, per_rank * iterations, out / str(copy))
        command += ["--seed", str(copy)]
        procs.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL))
    if any([proc.wait() for proc in procs]):  # a list: wait for every one
        raise RuntimeError("an independent run failed; run one by hand to see why")
    return sum(median_rate(out / str(copy)) for copy in range(copies))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    counts = [int(k) for k in args.ranks.split(",")]
    rates: dict[int | str, list[float]] = {k: [] for k in counts}
    rates |= {f"{k} apart": [] for k in counts if k > 1}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for k in counts:
                rates[k].append(steps_per_second(args.env, k, args.iterations, Path(tmp) / "run"))
                print(f"round {r + 1}: {k} rank(s) {rates[k][-1]:,.0f} env steps/s", flush=True)
                if k > 1:
                    apart = steps_per_second_apart(
                        args.env, k, args.iterations, Path(tmp) / "apart"
                    )
                    rates[f"{k} apart"].append(apart)
                    print(f"round {r + 1}: {k} apart {apart:,.0f} env steps/s", flush=True)
    base = np.array(rates[counts[0]])
    print(f"\n{cpu_model()}, {args.env}, preset settings per rank, {args.rounds} rounds\n")
    print(f"| ranks | env steps/s (median) | × {counts[0]} rank(s) (median of rounds) |")
    print("|---:|---:|---:|")
    for k in rates:
        ratio = float(np.median(np.array(rates[k]) / base))
        print(f"| {k} | {np.median(rates[k]):,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
