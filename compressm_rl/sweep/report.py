"""A sweep's report: ``pareto.md`` and ``pareto.png`` in its directory, from the study's
finished trials.

Each method at each target (compressed in training, small from scratch, post-training
truncation; a search's settings) is one point: its mean over seeds, with expanded 90%
bootstrap intervals (``stats``), of the training return (the last iterations' episodes)
and of the deterministic return, against the actor's total states and against the C
step's median latency on the machine that measured it. The full policy is the reference
line; the Pareto front (most return for the fewest states, or the fastest step) is marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from compressm_rl.runs.files import atomic_write_text, save_figure
from compressm_rl.sweep import plan
from compressm_rl.sweep.stats import bootstrap_mean, bootstrap_ratio, run_parting_step
from compressm_rl.sweep.study import SET_ASIDE, describe, results_of

MARKDOWN, FIGURE = "pareto.md", "pareto.png"
RETURNS = (("det_return", "deterministic return"), ("train_return", "training return"))
AXES = (("total_states", "actor states (complex, all layers)"), ("c_p50_us", "C step p50 (µs)"))
FRONTS = (("states", "total_states"), ("p50", "c_p50_us"))
STYLE = {
    "full": ("black", "*"),
    "compressed": ("C0", "o"),
    "small": ("C1", "s"),
    "posthoc": ("C2", "^"),
}
# References drawn as a line with its interval: the full policy (its point is in the
# legend already), and the MLP (no state, so no place on a states axis).
LINES = {"full": ("black", "-", None), "mlp": ("C3", ":", "MLP (no memory)")}


@dataclass
class Point:
    """One method at one target, over its seeds."""

    label: str  # the run name without its seed, e.g. compressed-b16
    kind: str
    rows: list[dict]  # one per seed: the trial's parameters and results

    def mean(self, key: str) -> float:
        return float(np.mean([r[key] for r in self.rows]))

    def interval(self, key: str) -> tuple[float, float, float] | None:
        values = [r[key] for r in self.rows if r.get(key) is not None]
        return bootstrap_mean(np.array(values)) if len(values) == len(self.rows) else None


def finished_rows(studies: list[optuna.Study]) -> list[dict]:
    """One row per run (the last finished trial of each): its parameters and results."""
    by_run: dict[str, dict] = {}
    for study in studies:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            attrs = results_of(trial)
            params = {**trial.params, "seed": attrs.get("seed", trial.params.get("seed"))}
            params.setdefault("kind", "compressed")
            by_run[attrs["run"]] = {**params, **attrs, "number": trial.number}
    return list(by_run.values())


def points(rows: list[dict]) -> list[Point]:
    groups: dict[str, list[dict]] = {}

    def order(row: dict) -> tuple:  # by method, then by target: 8 before 16
        return (
            plan.KINDS.index(row["kind"]),
            row.get("budget") or 0,
            row.get("tol") or 0,
            row["run"],
        )

    for row in sorted(rows, key=order):
        groups.setdefault(row["run"].rsplit("-s", 1)[0], []).append(row)
    return [Point(label, group[0]["kind"], group) for label, group in groups.items()]


def pareto_front(xs: list[float], ys: list[float]) -> list[bool]:
    """Which points no other point beats: at most as large an x (states, µs) with at
    least as high a y (return), better in one of them."""
    return [
        not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in zip(xs, ys, strict=True))
        for x, y in zip(xs, ys, strict=True)
    ]


def ratio_to_full(point: Point, full: Point | None, key: str, out: Path):
    """``(ratio, low, high, paired)`` of the point's mean ``key`` to the full policy's,
    over the seeds both have: paired by seed where the runs share the full run's start
    (post-training truncation of it; a compressed run that kept its trajectory up to its
    first cut), else unpaired. None without a full run or a value per seed."""
    if full is None or any(r.get(key) is None for r in point.rows + full.rows):
        return None
    ref = {r["seed"]: r[key] for r in full.rows}
    rows = [r for r in point.rows if r["seed"] in ref]
    if not rows:
        return None
    a = np.array([r[key] for r in rows])
    paired = point.kind == "posthoc" or (
        point.kind == "compressed"
        and all(
            run_parting_step(_run(out, ref_row), _run(out, r)) is None
            for r in rows
            for ref_row in full.rows
            if ref_row["seed"] == r["seed"]
        )
    )
    b = np.array([ref[r["seed"]] for r in rows]) if paired else np.array(list(ref.values()))
    return (*bootstrap_ratio(a, b, paired=paired), paired)


def _run(out: Path, row: dict) -> Path:
    return Path(out) / plan.TRIALS / row["run"]


def _mean_cell(stat: tuple[float, float, float] | None) -> str:
    """A mean and its interval, e.g. ``1523 [1310, 1702]``, 3 significant digits."""
    if stat is None:
        return "-"
    mean, low, high = (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}" for v in stat)
    return mean if low == "nan" else f"{mean} [{low}, {high}]"


def _ratio_cell(stat: tuple[float, float, float, bool] | None) -> str:
    """A ratio and its interval, e.g. ``0.94 [0.80, 1.11] unpaired``."""
    if stat is None:
        return "-"
    ratio, low, high, paired = stat
    text = f"{ratio:.2f}" if np.isnan(low) else f"{ratio:.2f} [{low:.2f}, {high:.2f}]"
    return text + ("" if paired else " unpaired")


def _seconds(point: Point) -> str:
    """Mean training wall-clock over seeds (not trained: -)."""
    seconds = [r.get("train_wall_s") for r in point.rows]
    if None in seconds:
        return "-"
    return f"{np.mean(seconds):.3g}" if np.mean(seconds) < 100 else f"{np.mean(seconds):.0f}"


def _label(point: Point) -> str:
    return point.kind if point.kind in LINES else point.label


HEADER = [
    "| policy | seeds | actor n per seed | states | C p50 µs | training s | training return | "
    "deterministic return | det. / full | training / full | front |",
    "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
]


def table(pts: list[Point], out: Path) -> list[str]:
    """One row per point; front: on the Pareto front of deterministic return against
    states (``states``) and against the C step's p50 (``p50``)."""
    full = next((p for p in pts if p.kind == "full"), None)
    det = [p.mean("det_return") for p in pts]
    fronts = {name: pareto_front([p.mean(x) for p in pts], det) for name, x in FRONTS}
    lines = list(HEADER)
    for i, p in enumerate(pts):
        ratios = [
            _ratio_cell(ratio_to_full(p, full, key, out) if p is not full else None)
            for key in ("det_return", "train_return")
        ]
        lines.append(
            f"| {_label(p)} | {len(p.rows)} | "
            f"{' '.join(str(r['actor_dims']).replace(' ', '') for r in p.rows)} | "
            f"{p.mean('total_states'):.0f} | {p.mean('c_p50_us'):.3g} | {_seconds(p)} | "
            f"{_mean_cell(p.interval('train_return'))} | {_mean_cell(p.interval('det_return'))} | "
            f"{' | '.join(ratios)} | {', '.join(n for n, _ in FRONTS if fronts[n][i])} |"
        )
    return lines


def markdown(name: str, spec: plan.SweepSpec, pts: list[Point], studies, out: Path) -> str:
    """The report's text: the points' table, unfinished trials and the overhead."""
    steps = spec.config["ppo"]["total_steps"]
    lines = [
        f"# Sweep {name}: {spec.env_id}",
        "",
        f"{spec.mode}, seeds {','.join(map(str, spec.seeds))}, {steps:,} env steps per run; "
        f"deterministic return over {spec.eval_episodes} episodes; C step p50 at batch 1 on "
        f"{_cpus(pts)}. Means over seeds [expanded 90% bootstrap interval]; ratios to the "
        "full policy paired by seed where the runs share its start (unpaired otherwise).",
        "",
    ]
    lines += table(pts, out) if pts else ["No trial has finished yet."]
    return "\n".join(lines + _status(studies) + _wall_clock(studies) + _overhead(pts)) + "\n"


def _cpus(pts: list[Point]) -> str:
    return ", ".join(sorted({r.get("cpu", "?") for p in pts for r in p.rows})) or "-"


def _status(studies) -> list[str]:
    """Trials not finished: failed (with their error, unless a later trial finished the
    same run), waiting, running; trials set aside unrun are counted apart."""
    lines, done = ["", "## Trials", "", f"{describe(studies)}."], set()
    failed = []
    for study in studies:
        for t in study.get_trials(deepcopy=False):
            if SET_ASIDE in t.user_attrs:  # taken but never run (a copy, past the search)
                continue
            if t.state == TrialState.COMPLETE:
                done.add(t.user_attrs.get("run"))
            elif t.state == TrialState.FAIL:
                failed.append(t)
    for t in failed:
        name = t.user_attrs.get("run", f"trial {t.number}")
        if name not in done:
            lines.append(f"- {name}: {t.user_attrs.get('error', 'its worker stopped')}")
    return lines


def active_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals (seconds): the time at least
    one of them ran, so that a sweep stopped and resumed days later is not charged the
    days in between."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _wall_clock(studies) -> list[str]:
    """The finished trials' summed time against the time any of them ran, and by how
    many workers (trials that a stopped worker left and another finished count once, from
    the finishing trial's start)."""
    trials = [
        t
        for study in studies
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.datetime_start is not None and t.datetime_complete is not None
    ]
    if not trials:
        return []
    spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials]
    summed, active = sum(end - start for start, end in spans), active_seconds(spans)
    workers = len({t.user_attrs.get("worker") for t in trials})
    return [
        "",
        "## Wall-clock",
        "",
        f"{len(trials)} finished trials took {summed / 3600:.2f} h of trial time in "
        f"{active / 3600:.2f} h while any ran ({summed / active:.2f} trials at once on "
        f"average, at most {most_at_once(spans)}), by {workers} worker processes in all.",
    ]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most ``(start, end)`` intervals that overlap at one moment (an end before a
    start at the same instant: a worker's next trial does not overlap its last)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def _overhead(pts: list[Point]) -> list[str]:
    """The storage's share of the trials' wall-clock (pop, parameters, attributes; each
    trial's last attribute write and its tell are timed in its progress line only), for
    the trials that trained and for those that only measured (post-training truncation,
    a run another trial had trained)."""
    lines = ["", "## Sweep overhead", ""]
    for label, trained in (("training", True), ("measuring only", False)):
        rows = [
            r
            for p in pts
            for r in p.rows
            if r.get("storage_s") is not None
            and r.get("wall_s")
            and (r.get("trained_from") is not None) == trained
        ]
        if not rows:
            continue
        share = np.array([r["storage_s"] / r["wall_s"] for r in rows])
        seconds = np.array([r["storage_s"] for r in rows])
        lines.append(
            f"- Storage round trips per {label} trial ({len(rows)}, median wall-clock "
            f"{np.median([r['wall_s'] for r in rows]):.0f} s): median "
            f"{1e3 * np.median(seconds):.0f} ms, {100 * np.median(share):.2f}% of the trial's "
            f"wall-clock (max {100 * share.max():.2f}%)."
        )
    return lines if len(lines) > 3 else []


def write_report(out: Path, name: str, spec: plan.SweepSpec, studies: list[optuna.Study]) -> Path:
    """Write ``OUT/pareto.md`` and ``OUT/pareto.png`` (a tune: ``OUT/tune.md`` and
    ``tune.png``); returns the Markdown file's path."""
    if spec.mode == "tune":
        from compressm_rl.sweep.tune_report import write_tune_report

        return write_tune_report(out, name, spec, studies[0])
    pts = points(finished_rows(studies))
    path = Path(out) / MARKDOWN
    atomic_write_text(path, markdown(name, spec, pts, studies, out))
    if pts:
        plot(pts, Path(out) / FIGURE, name)
    return path


def plot(pts: list[Point], path: Path, title: str) -> None:
    """Return against states and against the C step's p50 (columns), deterministic and
    training return (rows); the full policy and the MLP lines with their intervals, the
    front dashed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {kind: next((p for p in pts if p.kind == kind), None) for kind in LINES}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for row, (ret, ret_name) in enumerate(RETURNS):
        for col, (x, x_name) in enumerate(AXES):
            ax = axes[row][col]
            shown = [p for p in pts if p.interval(ret) is not None and p.kind != "mlp"]
            for kind, (color, marker) in STYLE.items():
                _errorbars(ax, [p for p in shown if p.kind == kind], x, ret, color, marker, kind)
            for kind, point in lines.items():
                if point is not None and point.interval(ret) is not None:
                    _reference(ax, point, ret, *LINES[kind])
            _front(ax, shown, x, ret)
            xs = [p.mean(x) for p in shown]
            if xs and max(xs) > 4 * min(xs):  # sizes from 8 to 256 states: log
                ax.set_xscale("log")
                ticker = matplotlib.ticker  # ticks at 1, 2, 5 × 10^k, written 2, not 2×10⁰
                ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set(xlabel=x_name, ylabel=ret_name)
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: return against size and latency (mean over seeds, 90% intervals)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _errorbars(ax, pts: list[Point], x: str, ret: str, color: str, marker: str, label: str):
    if not pts:
        return
    stats = [p.interval(ret) for p in pts]
    mean = np.array([s[0] for s in stats])
    low = np.nan_to_num(mean - np.array([s[1] for s in stats]))
    high = np.nan_to_num(np.array([s[2] for s in stats]) - mean)
    xs = [p.mean(x) for p in pts]
    ax.errorbar(xs, mean, yerr=[low, high], fmt=marker, color=color, label=label, capsize=3)


def _reference(ax, point: Point, ret: str, color: str, style: str, label: str | None) -> None:
    mean, low, high = point.interval(ret)
    ax.axhline(mean, color=color, ls=style, lw=1, label=label)
    if not np.isnan(low):
        ax.axhspan(low, high, color=color, alpha=0.08)


def _front(ax, pts: list[Point], x: str, ret: str) -> None:
    xs, ys = [p.mean(x) for p in pts], [p.mean(ret) for p in pts]
    on = sorted((a, b) for a, b, f in zip(xs, ys, pareto_front(xs, ys), strict=True) if f)
    if on:
        ax.plot(*zip(*on, strict=True), "k--", lw=1, drawstyle="steps-post", label="Pareto front")
        ax.scatter(*zip(*on, strict=True), s=140, facecolors="none", edgecolors="black")
