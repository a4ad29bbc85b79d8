"""Per-step inference latency at batch 1: ONNX Runtime vs torch eager, side by side.

    python benchmarks/latency.py [--steps 5000] [--out-dir benchmarks/out/latency]

Hopper-v5 sizes (obs 11, act 3), width H = 64. Policies carry random weights: latency
depends on the shapes only, not on training (a "compressed" policy here is one built at the
compressed sizes, n = [32, 32], not one reduced by balanced truncation).

- ``ssm n=[128,128]``: the uncompressed 2-layer LRU policy.
- ``ssm n=[32,32]``: the same after compression to a quarter of the states.
- ``mlp 64-64``: the feed-forward baseline.

Rows: ONNX Runtime's identity-graph floor; each policy through ``OnnxPolicy.act``
(IOBinding, the default) and through ``session.run`` (``io_binding=False``); each policy
in torch eager (``ActorCritic.predict`` under no_grad, one torch thread). Writes the ONNX
files (reusable with ``python -m export.bench`` on a target device), ``latency.md``,
``latency.json`` and ``latency_hist.png`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gymnasium as gym
import torch

from compressm_rl.deploy import bench_torch
from export.bench import (
    bench_identity,
    bench_session,
    machine_info,
    markdown_table,
    save_histogram,
    to_json,
)
from export.onnx_export import to_onnx
from policies.actor_critic import ActorCritic

ENV_ID = "Hopper-v5"
POLICIES = {
    "ssm n=[128,128]": dict(policy="ssm", state_dims=[128, 128]),
    "ssm n=[32,32]": dict(policy="ssm", state_dims=[32, 32]),
    "mlp 64-64": dict(policy="mlp", mlp_layers=2),
}


def build_policies() -> dict[str, ActorCritic]:
    env = gym.make(ENV_ID)
    obs_dim, space = env.observation_space.shape[0], env.action_space
    env.close()
    torch.manual_seed(0)
    return {
        name: ActorCritic(obs_dim, space.shape[0], space.low, space.high, width=64, **kwargs)
        for name, kwargs in POLICIES.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/out/latency"))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    policies = build_policies()
    paths = {}
    for name, policy in policies.items():
        file = name.replace(" ", "_").replace("=", "").replace("[", "").replace("]", "")
        paths[name] = to_onnx(policy, args.out_dir / f"{file.replace(',', '-')}.onnx", ENV_ID)

    steps, warmup = args.steps, args.warmup
    results = [bench_identity(steps, warmup), bench_identity(steps, warmup, io_binding=False)]
    for name, path in paths.items():
        results.append(bench_session(path, steps, warmup, name=f"ORT {name}"))
    for name, path in paths.items():
        row = bench_session(path, steps, warmup, io_binding=False, name=f"ORT {name} (run)")
        results.append(row)
    for name, policy in policies.items():
        results.append(bench_torch(policy, f"torch {name}", steps, warmup))

    machine = machine_info()
    machine["torch"] = torch.__version__
    table = markdown_table(results, machine)
    print(table)
    (args.out_dir / "latency.md").write_text(table + "\n")
    (args.out_dir / "latency.json").write_text(to_json(results, machine))
    save_histogram(results, args.out_dir / "latency_hist.png")
    print(f"\nwrote {args.out_dir}/latency.md, latency.json, latency_hist.png and the .onnx files")


if __name__ == "__main__":
    main()
