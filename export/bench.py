"""Per-step latency of exported policies (ONNX Runtime and generated C), side by side.

    python -m export.bench a.onnx c_dir/ [--steps 5000] [--provider P] [--json OUT] [--hist PNG]

Needs only numpy and onnxruntime, and gcc for C exports (no torch, gymnasium or mujoco: it
runs on the target device). Each ``.onnx`` model is timed through ``OnnxPolicy.act`` at
batch 1 on random observations, one call at a time, as a controller would call it:
p50/p90/p99/max in µs and steps/s. Two floor rows time an Identity graph, the least ORT can
do per call (through IOBinding, the path ``OnnxPolicy`` uses, and through ``session.run``).
A C export (its directory or ``policy.c``) is compiled with ``bench.c`` (``export.c_bench``)
and timed inside C, on standard-normal observations drawn in C, with the clock's own floor
as a row. It is built with the portable ``export.c_build.HOST_FLAGS``, the build the
export's README documents for a deployment target; ``--native`` adds ``-march=native``
(this machine's full instruction set: faster where FMA/AVX pay, and only valid here). The
identity model is embedded as serialised bytes so the ``onnx`` package is not needed.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnxruntime as ort

from export.c_bench import bench_c
from export.c_build import (
    HOST_FLAGS,
    NATIVE_FLAGS,
    ToolchainError,
    is_c_export,
    read_header_dims,
    read_metadata,
    source_dir,
)
from export.runtime import OnnxPolicy, make_session

# Identity graph, x [batch, n] float32 -> y, opset 13, IR 7 (written once with onnx.helper).
_IDENTITY_MODEL = base64.b64decode(
    "CAcSDGNvbXByZXNzbS1ybDpSChAKAXgSAXkiCElkZW50aXR5EghpZGVudGl0eVoZCgF4EhQKEggBEg4KBxIFYmF0"
    "Y2gKAxIBbmIZCgF5EhQKEggBEg4KBxIFYmF0Y2gKAxIBbkIECgAQDQ=="
)
DEFAULT_STEPS = 5000
DEFAULT_WARMUP = 500


def time_steps(
    step: Callable[[np.ndarray], object],
    obs_dim: int,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    seed: int = 0,
) -> np.ndarray:
    """Nanoseconds of each of ``steps`` calls ``step(obs)``, obs float32 ``[obs_dim]``.

    Observations are drawn beforehand (standard normal), so only the call is timed. The
    garbage collector is paused during the timed loop: its pauses are not the policy's.
    """
    rng = np.random.default_rng(seed)
    observations = rng.standard_normal((warmup + steps, obs_dim)).astype(np.float32)
    for obs in observations[:warmup]:
        step(obs)
    times = np.empty(steps, np.int64)
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i, obs in enumerate(observations[warmup:]):
            start = clock()
            step(obs)
            times[i] = clock() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def latency_stats(name: str, times_ns: np.ndarray, **info) -> dict:
    """Summary of per-step times: p50/p90/p99/max µs, mean steps/s, plus ``info``.

    The raw samples stay under ``"_times_us"`` (dropped from JSON, used for histograms).
    """
    us = np.asarray(times_ns, np.float64) / 1e3
    return {
        "name": name,
        **info,
        "steps": int(us.size),
        "p50_us": float(np.percentile(us, 50)),
        "p90_us": float(np.percentile(us, 90)),
        "p99_us": float(np.percentile(us, 99)),
        "max_us": float(us.max()),
        "steps_per_s": float(1e6 / us.mean()),
        "_times_us": us,
    }


def bench_callable(
    name: str,
    step: Callable[[np.ndarray], object],
    obs_dim: int,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    seed: int = 0,
    **info,
) -> dict:
    """Time any per-step callable (e.g. a torch policy) the same way as the ONNX rows."""
    return latency_stats(name, time_steps(step, obs_dim, steps, warmup, seed), **info)


def bench_session(
    path: str | os.PathLike,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    provider: str = "CPUExecutionProvider",
    io_binding: bool = True,
    seed: int = 0,
    name: str | None = None,
) -> dict:
    """Latency of ``OnnxPolicy(path).act`` at batch 1 (validation and output copy included)."""
    policy = OnnxPolicy(path, provider=provider, batch_size=1, io_binding=io_binding)
    info = onnx_row_info(policy)
    return bench_callable(
        name or Path(path).name, policy.act, policy.obs_dim, steps, warmup, seed, **info
    )


def onnx_row_info(policy: OnnxPolicy) -> dict:
    """What a latency row says of an ONNX policy besides its times."""
    meta = policy.metadata
    return dict(
        kind="onnx",
        policy_type=policy.policy_type,
        state_dims=policy.layer_state_dims,
        nodes=int(meta["num_nodes"]) if "num_nodes" in meta else None,
        provider=policy.provider,
    )


def c_row_info(sources: Path, flags: list[str] | None = None) -> dict:
    """What a latency row says of a C export (``source_dir``) besides its times, with the
    compiler flags it was built with (``HOST_FLAGS`` if None)."""
    meta = read_metadata(sources)
    return dict(
        kind="c",
        policy_type=meta.get("policy_type", ""),
        state_dims=json.loads(meta.get("layer_state_dims", "[]")),
        nodes=int(meta["num_nodes"]) if "num_nodes" in meta else None,
        obs_dim=read_header_dims(sources)[0],
        c_flags=" ".join(HOST_FLAGS if flags is None else flags),
    )


def identity_step(
    provider: str = "CPUExecutionProvider", width: int = 16, io_binding: bool = True
) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """ORT's own floor as a step: one Identity node on ``[1, width]``, same session options
    as policies; returns the row's name and the step."""
    session = make_session(_IDENTITY_MODEL, provider)
    x = np.zeros((1, width), np.float32)
    y = np.zeros((1, width), np.float32)
    if io_binding:
        binding = session.io_binding()
        x_value, y_value = ort.OrtValue.ortvalue_from_numpy(x), ort.OrtValue.ortvalue_from_numpy(y)
        binding.bind_ortvalue_input("x", x_value)
        binding.bind_ortvalue_output("y", y_value)

        def step(obs: np.ndarray) -> np.ndarray:
            x[0] = obs
            session.run_with_iobinding(binding)
            return y[0].copy()

        return "ORT identity floor (IOBinding)", step

    def step(obs: np.ndarray) -> np.ndarray:
        return session.run(None, {"x": obs[None]})[0][0]

    return "ORT identity floor (run)", step


def bench_identity(
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    provider: str = "CPUExecutionProvider",
    width: int = 16,
    io_binding: bool = True,
) -> dict:
    """Latency row of ORT's floor (``identity_step``)."""
    name, step = identity_step(provider, width, io_binding)
    return bench_callable(
        name, step, width, steps, warmup, kind="floor", nodes=1, provider=provider
    )


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(provider: str = "CPUExecutionProvider") -> dict:
    """CPU model, core counts, OS, and library versions for the table's caption."""
    cpu = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "provider": provider,
        "ort_threads": 1,
    }


def _us(value: float) -> str:
    """Microseconds: 3 significant digits below 10 µs (C steps, floors), else 0.1 µs."""
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def markdown_table(results: list[dict], machine: dict | None = None) -> str:
    """Results side by side as a Markdown table, with the machine as a caption line."""
    lines = []
    if machine:
        lines.append(
            f"{machine['cpu']}, {machine['usable_cores']}/{machine['logical_cores']} cores usable, "
            f"onnxruntime {machine['onnxruntime']} ({machine['provider']}, 1 thread), "
            f"Python {machine['python']}, batch 1\n"
        )
    # Rows timed on a target say how far the target's build is from this machine's.
    parity = any("parity_vs_host" in r for r in results)
    lines.append(
        "| model | kind | state dims | nodes | p50 µs | p90 µs | p99 µs | max µs | steps/s |"
        + (" max abs Δaction vs host |" if parity else "")
    )
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if parity else ""))
    for r in results:
        dims = r.get("state_dims")
        nodes = r.get("nodes")
        line = (
            f"| {r['name']} | {r.get('kind', '')} | {dims if dims else '-'} | "
            f"{nodes if nodes is not None else '-'} | {_us(r['p50_us'])} | {_us(r['p90_us'])} | "
            f"{_us(r['p99_us'])} | {_us(r['max_us'])} | {r['steps_per_s']:,.0f} |"
        )
        if parity:
            check = r.get("parity_vs_host") if r.get("kind") == "c" else None
            line += f" {check['max_abs_action']:.2g} |" if check else " - |"
        lines.append(line)
    return "\n".join(lines)


def to_json(results: list[dict], machine: dict) -> str:
    """JSON text of the results (raw samples dropped) and the machine."""
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    return json.dumps({"machine": machine, "results": clean}, indent=2)


def save_histogram(results: list[dict], path: str | os.PathLike | BinaryIO) -> bool:
    """Latency histograms (log-x) of every row into one PNG (a path or a binary file);
    False if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples = [r["_times_us"] for r in results if "_times_us" in r]
    lo = max(min(float(s.min()) for s in samples), 0.1)
    hi = max(float(np.percentile(s, 99.9)) for s in samples)
    bins = np.geomspace(lo, hi * 1.05, 120)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = [r for r in results if "_times_us" in r]
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: rows never share one
    for i, r in enumerate(rows):
        label = f"{r['name']} (p50 {_us(r['p50_us'])})"
        ax.hist(r["_times_us"], bins=bins, histtype="step", color=colors[i % 20], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("µs per step (batch 1, log scale; top 0.1% clipped)")
    ax.set_ylabel("steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return True


def bench_c_export(
    path: str | os.PathLike,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    seed: int = 0,
    name: str | None = None,
    native: bool = False,
) -> tuple[dict, dict]:
    """Latency of a C export's ``policy_step`` timed inside C, and the timer's floor row
    (two ``clock_gettime`` calls with nothing between). Built with the portable
    ``HOST_FLAGS``, or with ``native`` ``NATIVE_FLAGS`` (``-march=native``: this machine
    only). Raises ``ToolchainError`` (one line: the file and the compiler's first error)
    when it does not build."""
    sources = source_dir(path)
    flags = NATIVE_FLAGS if native else HOST_FLAGS
    result = bench_c(sources, steps, warmup, seed, flags=flags)
    row = latency_stats(name or f"C {sources.name}", result.times_ns, **c_row_info(sources, flags))
    floor = latency_stats("C clock floor (clock_gettime pair)", result.floor_ns, kind="floor")
    return row, floor


def run_benchmarks(
    paths: list[str | os.PathLike],
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    provider: str = "CPUExecutionProvider",
    io_binding: bool = True,
    native: bool = False,
) -> list[dict]:
    """Identity floors first, then each model (ONNX or C export), all in this process
    (``native``: C exports built with ``-march=native``, see ``bench_c_export``)."""
    results = [
        bench_identity(steps, warmup, provider, io_binding=True),
        bench_identity(steps, warmup, provider, io_binding=False),
    ]
    c_floor = None
    for path in paths:
        if is_c_export(path):
            row, c_floor = bench_c_export(path, steps, warmup, native=native)
            results.append(row)
        else:
            results.append(bench_session(path, steps, warmup, provider, io_binding))
    if c_floor is not None:
        results.insert(2, c_floor)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("models", nargs="+", help="exported .onnx files or C export directories")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed first steps")
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--no-io-binding", action="store_true", help="time session.run instead")
    parser.add_argument(
        "--native",
        action="store_true",
        help="build C exports with -march=native (this machine's instruction set; the "
        "default is the portable build a deployment target gets)",
    )
    parser.add_argument("--json", metavar="OUT", help="write results and machine info here")
    parser.add_argument("--hist", metavar="PNG", help="latency histogram (needs matplotlib)")
    args = parser.parse_args(argv)
    try:
        results = run_benchmarks(
            args.models,
            args.steps,
            args.warmup,
            args.provider,
            not args.no_io_binding,
            native=args.native,
        )
    except (ValueError, FileNotFoundError, ToolchainError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    machine = machine_info(args.provider)
    print(markdown_table(results, machine))
    if args.json:
        Path(args.json).write_text(to_json(results, machine))
    if args.hist and not save_histogram(results, args.hist):
        print("matplotlib is not installed: no histogram written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
