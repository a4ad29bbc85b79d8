"""A tune's report: ``OUT/tune.md`` (the settings tried, ranked by deterministic return,
each with its seeds' returns, and the best as the task's ``presets.yaml`` entry) and
``OUT/tune.png`` (each trial's return in the order the sampler asked for them, with the
best so far)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from compressm_rl.rl.config import preset_entries
from compressm_rl.runs.files import atomic_write_text, save_figure
from compressm_rl.sweep import plan
from compressm_rl.sweep.stats import bootstrap_mean
from compressm_rl.sweep.study import results_of
from envs.tasks import split_env_id

MARKDOWN, FIGURE = "tune.md", "tune.png"


def tuned_rows(study: optuna.Study) -> list[dict]:
    """One row per finished trial: its number, its settings (as its run has them) and its
    results."""
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        settings = {k: v for k, v in trial.params.items() if k in plan.TUNE_SPACE}
        if "lr" in settings:
            settings["lr"] = plan.round_sampled(settings["lr"])
        rows.append({"number": trial.number, "settings": settings, **results_of(trial)})
    return sorted(rows, key=lambda r: r["number"])


def settings_label(settings: dict) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in sorted(settings.items()))


def ranked(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The settings tried (their seeds' rows together), best mean deterministic return
    first."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(settings_label(row["settings"]), []).append(row)
    return sorted(groups.items(), key=lambda g: -np.mean([r["det_return"] for r in g[1]]))


def preset_entry(env_id: str, settings: dict) -> str:
    """``settings`` as the task's ``presets.yaml`` entry (YAML): its present entries with
    ``settings`` on top, so that pasting it over the old entry makes them the preset."""
    base, _ = split_env_id(env_id)
    return yaml.safe_dump({base: {**preset_entries(env_id), **settings}}, sort_keys=False)


def markdown(name: str, spec: plan.SweepSpec, rows: list[dict]) -> str:
    steps = spec.config["ppo"]["total_steps"]
    lines = [
        f"# Tune {name}: {spec.env_id}",
        "",
        f"{len(rows)} of {spec.trials} trials finished; TPE over "
        f"{', '.join(spec.search_space)}; seeds {','.join(map(str, spec.seeds))} in turn; "
        f"{steps:,} env steps per run; deterministic return over {spec.eval_episodes} "
        "episodes (mean over a setting's seeds [expanded 90% bootstrap interval]). The "
        "other settings are the task preset's.",
        "",
        "| rank | settings | seeds | deterministic return | training return | training s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    ranking = ranked(rows)
    for rank, (label, group) in enumerate(ranking, start=1):
        det = bootstrap_mean(np.array([r["det_return"] for r in group]))
        interval = "" if np.isnan(det[1]) else f" [{det[1]:.0f}, {det[2]:.0f}]"
        train, seconds = (_mean(group, key) for key in ("train_return", "train_wall_s"))
        lines.append(
            f"| {rank} | {label} | {len(group)} | {det[0]:.0f}{interval} | {train} | {seconds} |"
        )
    if ranking:
        best = ranking[0][1][0]["settings"]
        entry = preset_entry(spec.env_id, best)
        lines += ["", "The best as the task's `compressm_rl/rl/presets.yaml` entry:", "", "```yaml"]
        lines += [entry.rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def _mean(rows: list[dict], key: str) -> str:
    """The rows' mean ``key``, or ``-`` where a run has none (no episode ended in its
    last iterations)."""
    values = [r.get(key) for r in rows]
    return "-" if any(v is None for v in values) else f"{np.mean(values):.0f}"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [r["number"] for r in rows]
    returns = np.array([r["det_return"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(numbers, returns, "o", label="trial")
    ax.plot(numbers, np.maximum.accumulate(returns), "k-", drawstyle="steps-post", label="best")
    ax.set(xlabel="trial", ylabel="deterministic return", title=f"{title}: tune")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_tune_report(out: Path, name: str, spec: plan.SweepSpec, study: optuna.Study) -> Path:
    """Write ``OUT/tune.md`` and ``OUT/tune.png``; returns the Markdown file's path."""
    rows = tuned_rows(study)
    path = Path(out) / MARKDOWN
    atomic_write_text(path, markdown(name, spec, rows))
    if rows:
        plot(rows, Path(out) / FIGURE, name)
    return path
