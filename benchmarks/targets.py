"""The C step on target devices: the three Hopper-v5 policies of ``benchmarks/latency.py``
(random weights: latency depends on the shapes), each cross-built, checked against this
machine's build on 1,000 steps, and timed where it runs.

    python benchmarks/targets.py [--targets aarch64,native,cortex-m4]
        [--ssh USER@HOST [--ssh-config FILE]] [--out-dir runs/benchmarks/targets]

``aarch64`` without ``--ssh`` runs under qemu-aarch64 on this machine (emulated rows);
``native`` with ``--ssh`` runs on the device behind ssh (``--ssh root@127.0.0.1`` times
this machine through sshd: the path a board takes, end to end); ``cortex-m4`` runs on
QEMU's mps2-an386 board. Writes one Markdown table per target and ``targets.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latency import POLICIES, build_policies, file_stem

from compressm_rl.latency import BenchOptions, bench
from export.c_codegen import generate
from export.onnx_export import build_model

ENV_ID = "Hopper-v5"


def write_c_exports(out_dir: Path) -> list[Path]:
    """The three policies as C exports (the elementwise graph ``export --format c`` writes),
    named by policy."""
    paths = []
    for name, policy in build_policies(POLICIES).items():
        model = build_model(policy, ENV_ID, merged=False if policy.policy_type == "ssm" else None)
        c_dir = out_dir / file_stem(name)
        c_dir.mkdir(parents=True, exist_ok=True)
        sources = generate(model, dir_name=str(c_dir))
        for file_name, text in sources.files().items():
            (c_dir / file_name).write_text(text)
        paths.append(c_dir)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="aarch64,cortex-m4", help="comma separated")
    parser.add_argument("--ssh", help="USER@HOST for the native/aarch64 rows")
    parser.add_argument("--ssh-config", help="ssh -F FILE")
    parser.add_argument("--cpu", help="-mcpu/-march for the device build")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmarks/targets"))
    args = parser.parse_args(argv)
    exports = write_c_exports(args.out_dir / "exports")
    tables, results = [], {}
    for target in args.targets.split(","):
        device = target != "cortex-m4"
        options = BenchOptions(
            steps=args.steps,
            warmup=args.warmup,
            target=target,
            ssh=args.ssh if device else None,
            ssh_config=args.ssh_config if device else None,
            cpu=args.cpu if device else None,
            json=args.out_dir / f"{target}.json",
        )
        table = bench(exports, options)
        print(table + "\n", flush=True)
        tables.append(f"### {target}\n\n{table}\n")
        results[target] = json.loads((args.out_dir / f"{target}.json").read_text())
    (args.out_dir / "targets.md").write_text("\n".join(tables))
    (args.out_dir / "targets.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
