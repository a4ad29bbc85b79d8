"""The statistics a sweep reports with: returns read from a run's metrics, bootstrap
intervals over seeds, and where two runs of one seed parted.

Each seed is one sample (a run's return is one number per seed), so every interval here
resamples seeds, with Hesterberg's expanded percentile interval for the few seeds a
sweep affords (``expanded_tail``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats

from compressm_rl.runs import EventLog, MetricsLog

# The training return: the last 50 iterations' episodes (~250 of the stochastic policy's
# episodes on Hopper): less noisy than 10 deterministic episodes.
TRAIN_RETURN_ITERATIONS = 50
RESAMPLES = 20_000


def training_return(run_dir: Path, iterations: int = TRAIN_RETURN_ITERATIONS) -> float | None:
    """Mean return of the episodes that ended in the run's last ``iterations`` PPO
    iterations (each iteration's mean weighted by its episode count); None if none did."""
    rows = MetricsLog(run_dir).read()
    last = [r for r in rows[-iterations:] if r["episode_return"]]
    episodes = sum(int(r["episodes"]) for r in last)
    if not episodes:
        return None
    return sum(float(r["episode_return"]) * int(r["episodes"]) for r in last) / episodes


def expanded_tail(n: int) -> float:
    """The lower tail probability of a 90% interval from ``n`` seeds: the plain 5th/95th
    bootstrap percentiles over n = 6 seeds cover only ~82% (they miss the small-sample t
    and n/(n-1) factors), so the tails are taken at Φ(sqrt(n/(n-1)) t_{0.05, n-1})
    instead: 1.4% at n = 6."""
    return float(stats.norm.cdf(np.sqrt(n / (n - 1)) * stats.t.ppf(0.05, n - 1)))


def bootstrap_ratio(
    a: np.ndarray, b: np.ndarray, paired: bool = True, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """``mean(a) / mean(b)`` and its 90% interval from resampling the seeds with
    replacement: pairs ``(a[i], b[i])`` together if ``paired`` (equal lengths), else ``a``
    and ``b`` each on its own (runs that share nothing but a seed number, or a pooled
    reference against one sample). No interval (nan) from fewer than two seeds.

    The interval is the expanded percentile interval (``expanded_tail``): ~89% (paired)
    and ~92% (unpaired) coverage, simulated on two normal samples of one mean, and ~35%
    wider than the plain interval."""
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
    tail = expanded_tail(n)
    low, high = np.percentile(ratios, [100 * tail, 100 * (1 - tail)])
    return ratio, float(low), float(high)


def bootstrap_mean(
    a: np.ndarray, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """``mean(a)`` over seeds ``[n]`` and its expanded 90% bootstrap interval (nan from
    fewer than two seeds)."""
    a = np.asarray(a, dtype=np.float64)
    mean = float(a.mean())
    if len(a) < 2:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(1)
    tail = expanded_tail(len(a))
    low, high = np.percentile(means, [100 * tail, 100 * (1 - tail)])
    return mean, float(low), float(high)


def parting_step(full_rows: list[dict], rows: list[dict], first_cut: int | None) -> int | None:
    """The env step at which a compressed run's metrics ``rows`` left the full run's
    ``full_rows`` before the compressed run's first cut at step ``first_cut``, or None if
    they had not. The two runs of a seed are the same run up to the cut, bit for bit, when
    one code on one machine trains both; a full run made by other code (or on another CPU)
    parts from it at once, and by 1M steps such runs are independent samples."""
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
