"""Run reports: PNG plots (learning curve, HSV spectra) and a Markdown summary next to
the run's files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressm_rl.compression import ReductionEvent
from compressm_rl.runs.config import load_config
from compressm_rl.runs.events import EventLog
from compressm_rl.runs.files import atomic_write_text, save_figure
from compressm_rl.runs.metrics import METRICS, MetricsLog


def _pyplot():
    """matplotlib on its file backend, imported when a plot is drawn (0.5 s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(run_dir: Path, out: Path | None = None) -> Path:
    """Plot episode return against env steps (and the state size when it changes)."""
    rows = [r for r in MetricsLog(run_dir).read() if r["episode_return"]]
    if not rows:
        raise ValueError(f"{run_dir} has no finished episodes in {METRICS} yet")
    steps = [int(r["global_step"]) for r in rows]
    returns = [float(r["episode_return"]) for r in rows]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, returns, color="tab:blue", label="episode return (training, stochastic)")
    ax.set_xlabel("env steps")
    ax.set_ylabel("return")
    ax.grid(alpha=0.3)
    sizes = [sum(int(n) for n in r["state_dims"].split()) for r in rows]
    if len(set(sizes)) > 1:
        twin = ax.twinx()
        twin.step(steps, sizes, color="tab:orange", where="post", label="actor state (Σ n)")
        twin.set_ylabel("actor recurrent states")
        twin.legend(loc="lower right")
    ax.legend(loc="upper left")
    ax.set_title(load_config(run_dir).env_id)
    out = Path(out or Path(run_dir) / "learning_curve.png")
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def write_report(run_dir: Path, eval_returns=None, onnx_returns=None) -> Path:
    """``report.md`` with settings, final figures, the learning curve, compression events,
    and the exported policy's evaluation and latency when ``policy.onnx`` / ``latency.md``
    are in the run directory."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    rows = MetricsLog(run_dir).read()
    if not rows:
        raise ValueError(f"{run_dir} has no metrics yet: train first")
    last = rows[-1]
    curve = learning_curve(run_dir)
    lines = [
        f"# Run report: {config.env_id}",
        "",
        f"- policy: `{config.policy}`, width {config.width}, {config.layers} layers, "
        f"initial n = {config.state_dim} per layer",
        f"- env steps: {int(last['global_step']):,} in {float(last['wall_time']):.0f} s "
        f"({int(last['global_step']) / max(float(last['wall_time']), 1e-9):,.0f} steps/s overall)",
        f"- final actor state sizes per layer: {last['state_dims']}",
    ]
    finished = [float(r["episode_return"]) for r in rows if r["episode_return"]]
    if finished:
        lines.append(f"- training return (last iteration with episodes): {finished[-1]:.1f}")
    if eval_returns is not None:
        lines.append(
            f"- deterministic evaluation: {eval_returns.mean():.1f} ± {eval_returns.std():.1f} "
            f"over {len(eval_returns)} episodes"
        )
    if onnx_returns is not None:
        lines.append(
            f"- `policy.onnx` through onnxruntime only: {onnx_returns.mean():.1f} ± "
            f"{onnx_returns.std():.1f} over {len(onnx_returns)} episodes (same seeds)"
        )
    lines += ["", f"![learning curve]({curve.name})", ""]
    events = EventLog(run_dir).read()
    if events:
        lines += [
            "## Compression events",
            "",
            "| step | layer | n before | n after | H∞ bound | bound / ‖G‖∞ | output error "
            "| status |",
            "|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for e in events:
            error = "-" if e.output_error is None else f"{e.output_error:.3f}"
            relative = "-" if e.relative_bound is None else f"{e.relative_bound:.3g}"  # older logs
            lines.append(
                f"| {e.step} | {e.layer} | {e.n_before} | {e.n_after} | "
                f"{e.bound:.3g} | {relative} | {error} | {e.status} |"
            )
        errors = run_dir / "compression_errors.png"
        plot_event_errors(errors, events)
        plots = sorted(run_dir.glob("hsv_*.png"))
        lines += ["", f"![cut errors per event]({errors.name})", ""]
        lines += [f"![HSV spectra]({p.name})" for p in plots] + [""]
    latency = run_dir / "latency.md"
    if latency.exists():
        lines += ["## Inference latency (batch 1, one thread)", "", latency.read_text().strip(), ""]
        if (run_dir / "latency_hist.png").exists():
            lines += ["![latency histogram](latency_hist.png)", ""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def plot_hsv(path: Path, events: list[ReductionEvent], title: str) -> None:
    """HSV spectra (normalised to σ₁) of one reduction point, the cut marked per layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for e in events:
        if not e.hsv:
            continue
        hsv = np.asarray(e.hsv)
        line = ax.semilogy(np.arange(1, len(hsv) + 1), hsv / hsv[0], label=str(e.layer))[0]
        if e.applied:
            kept = e.rank if e.rank is not None else 2 * e.n_after  # older event logs
            ax.axvline(kept, color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("index (real states; dotted: the rank kept)")
    ax.set_ylabel("σ_j / σ_1")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# Layer markers of ``plot_event_errors`` (cycled); colours tell the two quantities apart.
_LAYER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_MEASURED, _BOUND = "tab:blue", "tab:red"


def plot_event_errors(path: Path, events: list[ReductionEvent]) -> None:
    """Each cut's measured relative output error against its relative H∞ bound.

    Per event (x: its env step, events at one step side by side by layer; one marker per
    layer): ``output_error`` (‖y_red − y_full‖ / ‖y_full − D u‖ on the rollout) and
    ``relative_bound`` (``bound / ‖G‖_∞``, the worst case over inputs of the same
    weighting), both relative, on a log axis, joined by a line. Applied cuts are filled,
    rolled back or skipped ones hollow. Events without a value (no guard, an older log
    without ``hinf_norm``, or a zero error a log axis cannot show) leave that marker out.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    layers = sorted({str(e.layer) for e in events})
    steps = [e.step for e in events if e.step is not None]
    # Events at one step sit side by side, a layer apart by ~1% of the steps' span.
    span = max(steps) - min(steps) if steps else 0
    dodge = 0.012 * (span or max(abs(s) for s in [*steps, 1]))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    plotted = False
    for e in events:
        if e.step is None:
            continue
        k = layers.index(str(e.layer))
        x = e.step + (k - (len(layers) - 1) / 2) * dodge
        marker = _LAYER_MARKERS[k % len(_LAYER_MARKERS)]
        values = [
            (v, colour)
            for v, colour in ((e.output_error, _MEASURED), (e.relative_bound, _BOUND))
            if v is not None and v > 0
        ]
        if len(values) == 2:
            ax.plot([x, x], [values[0][0], values[1][0]], color="0.75", lw=0.8, zorder=1)
        for v, colour in values:
            ax.plot(
                [x],
                [v],
                ls="none",
                marker=marker,
                ms=7,
                mec=colour,
                mew=1.4,
                zorder=2,
                mfc=colour if e.applied else "none",
            )
            plotted = True
    if plotted:
        ax.set_yscale("log")
    else:
        ax.text(
            0.5, 0.5, "no cut errors recorded", ha="center", va="center", transform=ax.transAxes
        )

    def key(label: str, marker: str = "o", **style) -> Line2D:
        return Line2D([], [], ls="none", marker=marker, label=label, **style)

    # Two legends: what the colour and fill say, and which layer each marker is.
    grey = dict(mec="0.3", mfc="0.3")
    meaning = [
        key("output error (measured)", color=_MEASURED),
        key("H∞ bound / ‖G‖∞", color=_BOUND),
        key("filled: applied", marker="s", **grey),
        key("hollow: rolled back / skipped", marker="s", mec="0.3", mfc="none"),
    ]
    which = [
        key(layer, _LAYER_MARKERS[k % len(_LAYER_MARKERS)], **grey)
        for k, layer in enumerate(layers)
    ]
    outside = dict(fontsize=8, loc="upper left")
    ax.add_artist(ax.legend(handles=meaning, bbox_to_anchor=(1.01, 1.0), **outside))
    ax.legend(handles=which, title="layer", bbox_to_anchor=(1.01, 0.6), **outside)
    ax.set_xlabel("env steps (events of one step side by side, by layer)")
    ax.set_ylabel("relative error of the cut")
    ax.set_title("Cut error per reduction event: measured vs worst case")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout(rect=(0.0, 0.0, 0.78, 1.0))  # the legends sit right of the axes
    save_figure(fig, path)
    plt.close(fig)
