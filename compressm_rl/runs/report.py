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
            "| step | layer | n before | n after | H∞ bound | output error | status |",
            "|---:|---|---:|---:|---:|---:|---|",
        ]
        for e in events:
            error = "-" if e.output_error is None else f"{e.output_error:.3f}"
            lines.append(
                f"| {e.step} | {e.layer} | {e.n_before} | {e.n_after} | "
                f"{e.bound:.3g} | {error} | {e.status} |"
            )
        plots = sorted(run_dir.glob("hsv_*.png"))
        lines += [""] + [f"![HSV spectra]({p.name})" for p in plots] + [""]
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
