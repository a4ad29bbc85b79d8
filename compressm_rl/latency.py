"""The ``bench`` command: per-step latency rows of exported policies on this machine, or of
C exports on a target device, and the files they are written to.

On this machine (no ``target``): ONNX Runtime's identity floors, each ``.onnx`` file through
``OnnxPolicy.act``, each C export timed inside C, optionally the run's torch policy
(``export.bench``). On a target (``aarch64`` or ``native`` through ``--ssh``/``--runner``,
or the emulated ``cortex-m4`` board): C exports only, cross-built and run there
(``export.targets``, ``export.cortex_m4``). Every row carries ``target`` and ``emulated``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from compressm_rl.runs.files import atomic_write, atomic_write_text
from export.bench import machine_info, markdown_table, run_benchmarks, save_histogram, to_json
from export.c_build import is_c_export


@dataclass
class BenchOptions:
    """What ``compressm-rl bench`` was asked (its flags, one field each)."""

    steps: int = 5000
    warmup: int = 500
    provider: str = "CPUExecutionProvider"
    native: bool = False
    target: str | None = None  # None: this machine, every kind of row
    ssh: str | None = None
    ssh_config: str | None = None
    runner: str | None = None
    cpu: str | None = None
    run: Path | None = None  # add torch rows for this run
    json: Path | None = None
    out_dir: Path | None = None


def check_options(models: list[Path], options: BenchOptions) -> None:
    """ValueError naming the flag, before anything is built or timed."""
    if options.steps < 1 or options.warmup < 0:
        raise ValueError(
            f"--steps {options.steps} --warmup {options.warmup} is out of range: at least 1 "
            "timed step and 0 warm-up steps"
        )
    if options.ssh_config and not options.ssh:
        raise ValueError("--ssh-config is for --ssh: give the destination too")
    device = options.ssh or options.runner
    if options.target is None and not device and options.cpu is None:
        return
    if options.run is not None:
        raise ValueError("--run (torch rows) times this machine only: leave out --target/--ssh")
    if options.native:
        raise ValueError(
            "--native builds for this machine's CPU only; for a target name its core with "
            "--cpu (e.g. --cpu cortex-a72)"
        )
    not_c = [str(m) for m in models if not is_c_export(m)]
    if not_c:
        raise ValueError(
            f"{', '.join(not_c)}: only C exports run on a target (ONNX Runtime rows time this "
            "machine: run `compressm-rl bench` on the device, or export with --format c)"
        )
    if options.target == "cortex-m4" and (device or options.cpu):
        raise ValueError(
            "--target cortex-m4 runs on QEMU's emulated mps2-an386 board here: leave out "
            "--ssh, --runner and --cpu"
        )


def target_rows(models: list[Path], options: BenchOptions) -> list[dict]:
    """Rows of each C export on the target: the clock's floor (from the last run) first."""
    if options.target == "cortex-m4":
        from export.cortex_m4 import run_cortex_m4

        # The board runs the fixed 1,000-step parity sequence and counts every step.
        return [run_cortex_m4(model) for model in models]
    from export.targets import bench_on_target, runner_command

    runner = runner_command(options.ssh, options.runner, options.ssh_config)
    target = options.target or "native"
    rows, floor = [], None
    for model in models:
        row, floor = bench_on_target(
            model, target, runner, options.cpu, options.steps, options.warmup
        )
        rows.append(row)
    return [floor, *rows]


def target_table(rows: list[dict], host: dict) -> str:
    """The rows as ``export.bench.markdown_table`` does, captioned with the device, the
    build and its parity with this machine's build."""
    policy = next(r for r in rows if r["kind"] == "c")
    device = f"{policy['device_machine']} ({policy['device_cpu'] or 'CPU model not reported'})"
    note = (
        " Emulated: an emulated time says how the build behaves, not how fast a device is."
        if policy["emulated"]
        else ""
    )
    caption = (
        f"target {policy['target']} on {device}, built on {host['cpu']} with "
        f"{policy['c_compiler']} {policy['c_flags']}; each build checked against this "
        f"machine's over {policy['parity_vs_host']['steps']} steps, batch 1.{note}\n\n"
    )
    return caption + markdown_table(rows)


def bench(models: list[Path], options: BenchOptions) -> str:
    """Time ``models`` as ``options`` say, write the files asked for; returns the table."""
    check_options(models, options)
    host = machine_info(options.provider)
    on_target = options.target is not None or options.ssh or options.runner or options.cpu
    if options.target == "cortex-m4":
        from export.cortex_m4 import markdown_table as m4_table

        results = target_rows(models, options)
        table = m4_table(results)
    elif on_target:
        results = target_rows(models, options)
        table = target_table(results, host)
    else:
        results = host_rows(models, options)
        table = markdown_table(results, host)
    write_outputs(results, table, host, options)
    return table


def host_rows(models: list[Path], options: BenchOptions) -> list[dict]:
    """This machine's rows: floors, each model, the run's torch policy if asked."""
    results = run_benchmarks(
        models, options.steps, options.warmup, options.provider, native=options.native
    )
    if options.run:
        from compressm_rl.deploy import bench_torch
        from compressm_rl.runs import load_policy

        policy, _ = load_policy(options.run)
        for frozen, kind in ((False, "eager"), (True, "frozen")):
            name = f"torch {kind} ({options.run.name})"
            results.append(bench_torch(policy, name, options.steps, options.warmup, frozen=frozen))
    for row in results:
        row.setdefault("target", "native")
        row.setdefault("emulated", False)
    return results


def write_outputs(results: list[dict], table: str, host: dict, options: BenchOptions) -> None:
    """``--json`` and ``--out-dir`` (latency.md, latency.json, latency_hist.png)."""
    if options.json:
        atomic_write_text(Path(options.json), to_json(results, host))
    if not options.out_dir:
        return
    options.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(options.out_dir / "latency.md", table + "\n")
    atomic_write_text(options.out_dir / "latency.json", to_json(results, host))
    if not any("_times_us" in row for row in results):
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no histogram written", file=sys.stderr)
    else:
        atomic_write(options.out_dir / "latency_hist.png", lambda f: save_histogram(results, f))
