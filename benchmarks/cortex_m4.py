"""The C step on an emulated Cortex-M4F (QEMU's mps2-an386 board): flash, RAM, stack and
executed instructions per step of the three Hopper-v5 policies of ``benchmarks/latency.py``,
each checked bit for bit against the x86 build over 1,000 steps.

    python benchmarks/cortex_m4.py [--steps 1000] [--seed 0] [--out-dir runs/benchmarks/cortex_m4]

Random weights (size and instruction count depend on the shapes only): ``ssm n=[128,128]``
(the uncompressed 2-layer LRU policy), ``ssm n=[25,25]`` (compressed) and ``mlp 64-64``.
Instructions are counted exactly by the emulator (``export.cortex_m4``): they are not a
device time. Writes ``cortex_m4.md``, ``cortex_m4.json`` and the C exports to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from latency import ENV_ID, POLICIES, build_policies, file_stem

from export.bench import cpu_model
from export.c_codegen import generate
from export.cortex_m4 import RESET_EVERY, markdown_table, run_cortex_m4
from export.onnx_export import build_model


def write_c_exports(out_dir: Path) -> dict[str, Path]:
    """Policy name -> C export directory (the graph ``export --format c`` writes)."""
    exports = {}
    for name, policy in build_policies(POLICIES).items():
        model = build_model(policy, ENV_ID, merged=False if policy.policy_type == "ssm" else None)
        sources = generate(model)
        c_dir = out_dir / file_stem(name)
        c_dir.mkdir(parents=True, exist_ok=True)
        (c_dir / "policy.c").write_text(sources.source)
        (c_dir / "policy.h").write_text(sources.header)
        exports[name] = c_dir
    return exports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps on the board and on x86")
    parser.add_argument("--seed", type=int, default=0, help="of the observation sequence")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmarks/cortex_m4"))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for name, c_dir in write_c_exports(args.out_dir / "exports").items():
        rows.append({**run_cortex_m4(c_dir, steps=args.steps, seed=args.seed), "policy": name})
        print(f"{name}: {rows[-1]['instructions_per_step']:,.0f} instructions/step", flush=True)
    host = {"cpu": cpu_model(), "machine": platform.machine(), "os": platform.platform()}
    table = markdown_table(rows) + (
        f"\n\nHost: {host['cpu']} ({host['machine']}), {rows[0]['emulator']}; {args.steps} "
        f"steps, seed {args.seed}, the state zeroed every {RESET_EVERY} steps."
    )
    print("\n" + table)
    (args.out_dir / "cortex_m4.md").write_text(table + "\n")
    (args.out_dir / "cortex_m4.json").write_text(
        json.dumps({"host": host, "results": rows}, indent=2)
    )
    print(f"\nwrote {args.out_dir}/cortex_m4.md, cortex_m4.json and the C exports")


if __name__ == "__main__":
    main()
