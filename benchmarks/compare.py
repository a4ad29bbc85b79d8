"""Runs from several ``benchmarks/compression.py --out`` directories against one reference.

    python benchmarks/compare.py --env Hopper-v5-P --seeds 0,1,2,3,4,5 \\
        --reference runs/benchmarks/full-a:1-full+runs/benchmarks/full-b:1-full \\
        --row "lr x 1.4" runs/benchmarks/lr14:2-compressed ... \\
        [--plot benchmarks/figures/NAME.png]

A sample is ``OUT:LABEL`` (``LABEL`` one of ``compression.py``'s ``1-full`` ... ``4-posthoc``,
the seeds read from ``OUT/ENV-sSEED/LABEL``); samples joined with ``+`` are pooled (two
six-seed samples of one recipe are a twelve-seed one). Each ``--row NAME SAMPLE`` gets its
training return (last 50 iterations) and deterministic return (30 episodes, the evaluation
``compression.py`` caches in the run) and their ratios to the reference's, with expanded
90% bootstrap intervals. A row is paired with the reference, run by run, where each of its
runs kept the trajectory of the reference's run up to its first cut (``run_parting_step``:
one code trained both, from one seed); otherwise the interval is unpaired: runs made by
other code share no steps with the reference (two six-seed samples of the full Hopper-v5-P
policy by different code read 1.19 [0.99, 1.45] of each other). ``--plot`` draws the
ratios, and the reference samples' training curves beside them. A row that is part of the
reference is not an independent sample of it; its ratio is left out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from compression import (
    TRAIN_RETURN_ITERATIONS,
    bootstrap_ratio,
    is_done,
    run_parting_step,
    running_returns,
    summarise,
)

from compressm_rl.runs import load_config


def runs_of(sample: str, env_id: str, seeds: list[int]) -> list[Path]:
    """The finished run directories of ``OUT:LABEL[+OUT:LABEL...]``, every seed of every
    part; a missing or unfinished run ends the script with its path."""
    dirs = []
    for part in sample.split("+"):
        out, sep, label = part.rpartition(":")
        if not sep or not out:
            raise SystemExit(f"{part!r}: a sample is OUT:LABEL, e.g. runs/benchmarks/x:1-full")
        dirs += [Path(out) / f"{env_id}-s{seed}" / label for seed in seeds]
    for d in dirs:
        if not (d / "checkpoint.pt").exists():
            raise SystemExit(f"no run in {d}")
        if not is_done(load_config(d), d):
            raise SystemExit(f"{d} has not finished training: resume it first")
    return dirs


def kept_trajectories(dirs: list[Path], ref_dirs: list[Path]) -> bool:
    """Whether run ``i`` of ``dirs`` kept run ``i`` of ``ref_dirs``'s trajectory up to its
    first cut, for every ``i``: then the two samples are paired by seed."""
    return len(dirs) == len(ref_dirs) and all(
        run_parting_step(ref, d) is None for ref, d in zip(ref_dirs, dirs, strict=True)
    )


def returns(dirs: list[Path], env_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Training and deterministic return of each run (``compression.summarise``)."""
    rows = [summarise(d, env_id, load_config(d).seed, d.name) for d in dirs]
    return np.array([r["train_return"] for r in rows]), np.array([r["return"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", required=True)
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--reference", required=True, help="OUT:LABEL[+OUT:LABEL...]")
    parser.add_argument(
        "--row",
        nargs=2,
        action="append",
        required=True,
        metavar=("NAME", "SAMPLE"),
        help="a row: its name and OUT:LABEL[+OUT:LABEL...]",
    )
    parser.add_argument("--plot", type=Path, help="PNG of the ratios and reference curves")
    args = parser.parse_args()
    names = [name for name, _ in args.row]
    if len(set(names)) < len(names):
        parser.error(f"two rows share a name: {sorted({n for n in names if names.count(n) > 1})}")
    if args.plot is not None and not args.plot.parent.is_dir():
        parser.error(f"--plot: no directory {args.plot.parent}")
    seeds = [int(s) for s in args.seeds.split(",")]
    samples = {name: runs_of(sample, args.env, seeds) for name, sample in args.row}
    ref_dirs = runs_of(args.reference, args.env, seeds)  # all checked before evaluating

    ref_train, ref_det = returns(ref_dirs, args.env)
    print(
        f"reference {args.reference}: {len(ref_dirs)} runs, training return "
        f"{ref_train.mean():.0f}, deterministic {ref_det.mean():.0f}\n"
    )
    print(
        "| row | runs | training / deterministic return | training / reference | deterministic / reference |"
    )
    print("|---|---:|---:|---:|---:|")
    ratios = {}
    for name, dirs in samples.items():
        train_return, det_return = returns(dirs, args.env)
        inside = {d.resolve() for d in dirs} & {d.resolve() for d in ref_dirs}
        no_ratio = (float("nan"),) * 3
        paired = not inside and kept_trajectories(dirs, ref_dirs)
        row = f"{name} (paired)" if paired else name
        ratios[row] = (
            no_ratio if inside else bootstrap_ratio(train_return, ref_train, paired=paired)
        )
        det = no_ratio if inside else bootstrap_ratio(det_return, ref_det, paired=paired)
        print(
            f"| {row} | {len(dirs)} | {_mean(train_return)} / {_mean(det_return)} | "
            f"{_interval(ratios[row])} | {_interval(det)} |"
        )
    print(
        "\n(ratio of means [expanded 90% bootstrap interval], unpaired unless the row says "
        "paired: its runs kept the reference's trajectories up to their first cut)"
    )
    if args.plot is not None:
        plot(args.env, args.reference, ref_dirs, ratios, args.plot)
        print(f"plot: {args.plot}")


def _interval(ratio: tuple[float, float, float]) -> str:
    return "–" if np.isnan(ratio[0]) else f"{ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}]"


def _mean(x: np.ndarray) -> str:
    return "–" if np.isnan(x).any() else f"{x.mean():.0f}"  # post-training: no training


def plot(env_id: str, reference: str, ref_dirs: list[Path], ratios: dict, path: Path) -> None:
    """Left: each reference sample's training curves (thin: seeds, thick: mean of a
    20-iteration running mean); right: every row's training-return ratio and interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, forest) = plt.subplots(
        1, 2, figsize=(13, 0.6 + 0.35 * max(8, len(ratios))), width_ratios=[1, 1.25]
    )
    per_sample = len(ref_dirs) // len(reference.split("+"))
    for i, sample in enumerate(reference.split("+")):
        dirs = ref_dirs[i * per_sample : (i + 1) * per_sample]
        steps, smoothed = running_returns(dirs, window=20)
        for x in smoothed:
            curves.plot(steps, x, color=f"C{i}", alpha=0.25, lw=0.8)
        mean = smoothed.mean(0)
        curves.plot(steps, mean, color=f"C{i}", lw=2, label=f"{sample} ({len(dirs)} seeds)")
    curves.set(xlabel="env steps", ylabel="training return (20-iteration mean)")
    curves.set_title(f"{env_id}: the reference's samples", fontsize=10)
    curves.legend(fontsize=7)
    y = np.arange(len(ratios))[::-1]
    for yi, (ratio, low, high) in zip(y, ratios.values(), strict=True):
        forest.errorbar(
            ratio, yi, xerr=[[ratio - low], [high - ratio]], fmt="o", color="k", capsize=3
        )
    forest.axvline(1.0, color="grey", lw=1)
    forest.axvline(0.95, color="grey", ls=":", lw=1)
    forest.set_yticks(y, list(ratios), fontsize=8)
    forest.set_xlabel(
        f"training return (last {TRAIN_RETURN_ITERATIONS} iterations) / the reference's\n"
        "(expanded 90% interval, unpaired unless marked; dotted: 0.95)"
    )
    forest.set_title("each row against the reference", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
