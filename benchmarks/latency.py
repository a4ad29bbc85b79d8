"""Per-step inference latency at batch 1: generated C, ONNX Runtime and torch (eager and
frozen), side by side in one process, and the C step's size on a Cortex-M4.

    python benchmarks/latency.py [--steps 5000] [--sweep 4,8,16,32,64,128]
        [--out-dir runs/benchmarks/latency]

Hopper-v5 sizes (obs 11, act 3), width H = 64. Policies carry random weights: latency
depends on the shapes only, not on training (a "compressed" policy here is one built at the
compressed sizes, n = [25, 25], not one reduced by balanced truncation).

- ``ssm n=[128,128]``: the uncompressed 2-layer LRU policy.
- ``ssm n=[25,25]``: the same after compression to about a fifth of the states.
- ``mlp 64-64``: the feed-forward baseline.

Rows: the floors (ONNX Runtime's identity graph; the C timer's clock_gettime pair); each
policy as generated C (``compressm-rl export --format c``: the elementwise graph, built
with ``export.c_build.HOST_FLAGS``, the portable build, and again with ``NATIVE_FLAGS``,
``-march=native``, timed inside C); the compressed policy through
emmtrix's general ONNX-to-C compiler ``emx-onnx-cgen`` (same graph, same flags, same
harness: why the C export has its own emitter); each policy through ``OnnxPolicy.act``
(IOBinding) and ``session.run``; each policy in torch, eager and with its weights read
once (``TorchController``'s frozen step, what ``evaluate`` runs). Then a sweep of p50 over the
per-layer state size n (2 layers), ORT and C, which separates the cost that shrinks with n
from the fixed per-call cost. Writes ``latency.md``, ``latency.json``, ``latency_hist.png``,
``latency_vs_n.png``, the ``.onnx`` files and the C directories to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnx
import torch

from compressm_rl.deploy import bench_torch
from export.bench import (
    c_row_info,
    identity_step,
    latency_stats,
    machine_info,
    markdown_table,
    onnx_row_info,
    save_histogram,
    time_steps,
    to_json,
)
from export.c_bench import CBenchmark
from export.c_build import (
    HOST_FLAGS,
    METADATA_TAG,
    NATIVE_FLAGS,
    ToolchainError,
    cortex_m4_size,
)
from export.c_codegen import generate
from export.onnx_export import build_model
from export.runtime import OnnxPolicy
from policies.actor_critic import ActorCritic

ENV_ID = "Hopper-v5"
POLICIES = {
    "ssm n=[128,128]": dict(policy="ssm", state_dims=[128, 128]),
    "ssm n=[25,25]": dict(policy="ssm", state_dims=[25, 25]),
    "mlp 64-64": dict(policy="mlp", mlp_layers=2),
}


def build_policies(policies: dict[str, dict]) -> dict[str, ActorCritic]:
    env = gym.make(ENV_ID)
    obs_dim, space = env.observation_space.shape[0], env.action_space
    env.close()
    torch.manual_seed(0)
    return {
        name: ActorCritic(obs_dim, space.shape[0], space.low, space.high, width=64, **kwargs)
        for name, kwargs in policies.items()
    }


def file_stem(name: str) -> str:
    return name.replace(" ", "_").replace("=", "").strip("[]").replace("[", "").replace("]", "")


def write_exports(policy: ActorCritic, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """The ONNX file ORT runs (``build_model``'s choice) and the C directory (the export's
    elementwise graph, as ``compressm-rl export --format c`` writes it)."""
    onnx_path = out_dir / f"{stem}.onnx"
    onnx.save(build_model(policy, ENV_ID), str(onnx_path))
    c_model = build_model(policy, ENV_ID, merged=False if policy.policy_type == "ssm" else None)
    c_dir = out_dir / f"{stem}_c"
    c_dir.mkdir(exist_ok=True)
    sources = generate(c_model)
    (c_dir / "policy.c").write_text(sources.source)
    (c_dir / "policy.h").write_text(sources.header)
    onnx.save(c_model, str(c_dir / "policy.onnx"))
    return onnx_path, c_dir


def emx_export(c_dir: Path, out_dir: Path) -> Path | None:
    """``c_dir/policy.onnx`` through ``emx-onnx-cgen`` (no heap, weights inline), behind a
    ``policy_step`` wrapper so the same timing harness runs it; None if it is not installed."""
    emx = shutil.which("emx-onnx-cgen") or str(Path(sys.executable).parent / "emx-onnx-cgen")
    if not Path(emx).exists():
        return None
    out_dir.mkdir(exist_ok=True)
    flags = ["--input-dim", "batch=1", "--large-temp-threshold", "0"]
    flags += ["--large-weight-threshold", "0", "--model-name", "emx_step"]
    command = [emx, "compile", *flags, str(c_dir / "policy.onnx"), str(out_dir / "emx.c")]
    subprocess.run(command, check=True, capture_output=True)
    header = (c_dir / "policy.h").read_text()
    source = (c_dir / "policy.c").read_text()
    meta_line = next(line for line in source.splitlines() if METADATA_TAG in line)
    (out_dir / "policy.h").write_text(header)
    wrapper = (
        f'{meta_line}\n#include "emx.c"\n#include "policy.h"\n'
        "int policy_step(const float *obs, const float *state, float *action, float *state_out)\n"
        "{\n    emx_step((const void *)obs, (const void *)state, (void *)action, (void *)state_out);\n"
        "    return 0;\n}\n"
    )
    (out_dir / "policy.c").write_text(wrapper)
    return out_dir


class Rows:
    """Timed rows run in rounds: every round times every row once, in a new random order,
    and a row's statistics pool its samples over the rounds (this VM's speed drifts by
    tens of percent within minutes; interleaving spreads the drift over all rows alike)."""

    def __init__(self, stack: ExitStack, steps: int, warmup: int) -> None:
        self.stack, self.steps, self.warmup = stack, steps, warmup
        self.rows: list[tuple[str, Callable[[], np.ndarray], dict]] = []
        self.samples: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, run: Callable[[], np.ndarray], **info) -> None:
        self.rows.append((name, run, info))
        self.samples[name] = []

    def add_step(self, name: str, step: Callable, obs_dim: int, **info) -> None:
        """A Python-timed step (ORT): ``time_steps`` per round."""
        self.add(name, lambda: time_steps(step, obs_dim, self.steps, self.warmup), **info)

    def add_onnx(self, name: str, path: Path, io_binding: bool = True) -> None:
        policy = OnnxPolicy(path, io_binding=io_binding)
        self.add_step(name, policy.act, policy.obs_dim, **onnx_row_info(policy))

    def add_c(
        self, name: str, c_dir: Path, floor: bool = False, flags: list[str] = HOST_FLAGS
    ) -> None:
        """A C export timed inside C, built with ``flags``; ``floor`` also adds the clock's
        floor row."""
        benchmark = CBenchmark(c_dir, self.steps, self.warmup, flags=flags)
        benchmark = self.stack.enter_context(benchmark)
        results: list = []

        def run() -> np.ndarray:
            results.append(benchmark.run())
            return results[-1].times_ns

        self.add(name, run, **c_row_info(c_dir, flags))
        if floor:
            self.add(
                "C clock floor (clock_gettime pair)", lambda: results[-1].floor_ns, kind="floor"
            )

    def run(self, rounds: int) -> dict[str, dict]:
        rng = random.Random(0)
        for _ in range(rounds):
            order = list(self.rows)
            rng.shuffle(order)
            order.sort(key=lambda row: row[0].startswith("C clock"))  # after its C row
            for name, run, _ in order:
                self.samples[name].append(run())
        return {
            name: latency_stats(name, np.concatenate(self.samples[name]), **info)
            for name, _, info in self.rows
        }


def plot_sweep(rows: list[dict], floors: dict[str, dict], mlp: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, colour in (("onnx", "tab:blue"), ("c", "tab:orange")):
        part = [r for r in rows if r["kind"] == kind]
        label = {"onnx": "ONNX Runtime", "c": "generated C"}[kind]
        ax.plot(
            [r["n"] for r in part],
            [r["p50_us"] for r in part],
            "o-",
            color=colour,
            label=f"{label}, SSM 2 layers, H = 64 (p50)",
        )
        ax.axhline(
            mlp[kind]["p50_us"],
            color=colour,
            ls="--",
            lw=1,
            label=f"{label}, MLP 64-64 ({mlp[kind]['p50_us']:.2f})",
        )
    ax.axhline(
        floors["onnx"]["p50_us"],
        color="grey",
        ls=":",
        label=f"ORT identity floor ({floors['onnx']['p50_us']:.1f})",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("complex states per layer n")
    ax.set_ylabel("µs per step (batch 1, log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def size_table(c_dirs: dict[str, Path]) -> str:
    """Cortex-M4 bytes of each C export (needs arm-none-eabi-gcc)."""
    lines = [
        "| policy | code B | weights B | RAM B | stack B | needs at link |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, c_dir in c_dirs.items():
        size = cortex_m4_size(c_dir)
        needs = ", ".join(size["undefined"]) or "-"
        lines.append(
            f"| {name} | {size['code']:,} | {size['weights']:,} | {size['ram']} | "
            f"{size['stack']:,} | {needs} |"
        )
    return "\n".join(lines) + f"\n\nFlags: `arm-none-eabi-gcc {size['flags']} -c policy.c`."


def ratio_lines(results: list[dict]) -> str:
    p50 = {r["name"]: r["p50_us"] for r in results}

    def ratio(a: str, b: str) -> str:
        return f"{p50[a] / p50[b]:.2f}" if a in p50 and b in p50 else "n/a"

    small, full, mlp = "ssm n=[25,25]", "ssm n=[128,128]", "mlp 64-64"
    return "\n".join(
        [
            f"- C n=25 / C n=128: {ratio(f'C {small}', f'C {full}')}",
            f"- ORT / C, n=25: {ratio(f'ORT {small}', f'C {small}')}; n=128: "
            f"{ratio(f'ORT {full}', f'C {full}')}",
            f"- ORT n=25 / ORT MLP: {ratio(f'ORT {small}', f'ORT {mlp}')}; C n=25 / C MLP: "
            f"{ratio(f'C {small}', f'C {mlp}')}",
            f"- emx-onnx-cgen / ours, n=25: {ratio(f'emx-onnx-cgen {small}', f'C {small}')}",
            f"- portable / -march=native C: n=25 {ratio(f'C {small}', f'C {small} -march=native')}"
            f"; n=128 {ratio(f'C {full}', f'C {full} -march=native')}"
            f"; MLP {ratio(f'C {mlp}', f'C {mlp} -march=native')}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="timed steps per row and round")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per row")
    parser.add_argument("--sweep", default="4,8,16,32,64,128", help="n per layer ('' skips)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmarks/latency"))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    steps, warmup = args.steps, args.warmup

    policies = build_policies(POLICIES)
    exports = {
        name: write_exports(p, args.out_dir, file_stem(name)) for name, p in policies.items()
    }
    sizes = [int(n) for n in args.sweep.split(",")] if args.sweep else []
    sweep_policies = build_policies(
        {f"ssm n=[{n},{n}]": dict(policy="ssm", state_dims=[n, n]) for n in sizes}
    )
    sweep_exports = {
        name: write_exports(p, args.out_dir, f"sweep_n{n}")
        for (name, p), n in zip(sweep_policies.items(), sizes, strict=True)
    }
    emx_dir = emx_export(exports["ssm n=[25,25]"][1], args.out_dir / "ssm_n25-25_emx")

    with ExitStack() as stack:
        rows = Rows(stack, steps, warmup)
        for io_binding in (True, False):
            name, step = identity_step(io_binding=io_binding)
            rows.add_step(name, step, 16, kind="floor", nodes=1)
        for i, (name, (_, c_dir)) in enumerate(exports.items()):
            rows.add_c(f"C {name}", c_dir, floor=i == 0)
            rows.add_c(f"C {name} -march=native", c_dir, flags=NATIVE_FLAGS)
        if emx_dir is not None:
            rows.add_c("emx-onnx-cgen ssm n=[25,25]", emx_dir)
        for name, (onnx_path, _) in exports.items():
            rows.add_onnx(f"ORT {name}", onnx_path)
            rows.add_onnx(f"ORT {name} (run)", onnx_path, io_binding=False)
        for name, (onnx_path, c_dir) in sweep_exports.items():
            rows.add_onnx(f"sweep ORT {name}", onnx_path)
            rows.add_c(f"sweep C {name}", c_dir)
        stats = rows.run(args.rounds)
    results = [r for name, r in stats.items() if not name.startswith("sweep")]
    for name, policy in policies.items():  # ~1 ms a step: one pass, outside the rounds
        results.append(bench_torch(policy, f"torch eager {name}", steps, warmup))
        results.append(bench_torch(policy, f"torch frozen {name}", steps, warmup, frozen=True))

    machine = machine_info()
    machine.update(torch=torch.__version__, c_flags=" ".join(HOST_FLAGS), rounds=args.rounds)
    table = markdown_table(results, machine)
    table += (
        f"\n\n{args.rounds} interleaved rounds of {steps} steps per row (torch: one pass); C "
        f"built with `gcc {' '.join(HOST_FLAGS)}`, timed inside C.\n\n" + ratio_lines(results)
    )
    save_histogram(results, args.out_dir / "latency_hist.png")
    if sizes:
        sweep = []
        for name, n in zip(sweep_exports, sizes, strict=True):
            sweep += [{**stats[f"sweep ORT {name}"], "n": n}, {**stats[f"sweep C {name}"], "n": n}]
        floors = {"onnx": stats["ORT identity floor (IOBinding)"]}
        mlp = {"onnx": stats["ORT mlp 64-64"], "c": stats["C mlp 64-64"]}
        plot_sweep(sweep, floors, mlp, args.out_dir / "latency_vs_n.png")
        table += (
            "\n\nState-size sweep (2 layers, H = 64; ORT with IOBinding, C timed inside C):\n\n"
        )
        table += "| n per layer | ORT nodes | ORT p50 µs | C p50 µs | ORT / C |\n|---:|---:|---:|---:|---:|\n"
        for onnx_row, c_row in zip(sweep[::2], sweep[1::2], strict=True):
            table += (
                f"| {onnx_row['n']} | {onnx_row['nodes']} | {onnx_row['p50_us']:.2f} | "
                f"{c_row['p50_us']:.2f} | {onnx_row['p50_us'] / c_row['p50_us']:.1f} |\n"
            )
        results += sweep
    try:
        c_dirs = {name: c_dir for name, (_, c_dir) in exports.items()}
        table += "\n\nCortex-M4 (object file of policy.c):\n\n" + size_table(c_dirs)
    except ToolchainError as err:
        table += f"\n\nCortex-M4 size: not measured ({err})"
    print(table)
    (args.out_dir / "latency.md").write_text(table + "\n")
    (args.out_dir / "latency.json").write_text(to_json(results, machine))
    print(f"\nwrote {args.out_dir}/latency.md, latency.json, the PNGs, .onnx files and C dirs")


if __name__ == "__main__":
    main()
