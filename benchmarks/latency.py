"""Per-step inference latency at batch 1: ONNX Runtime vs torch eager, side by side.

    python benchmarks/latency.py [--steps 5000] [--sweep 4,8,16,32,64,128]
        [--out-dir benchmarks/out/latency]

Hopper-v5 sizes (obs 11, act 3), width H = 64. Policies carry random weights: latency
depends on the shapes only, not on training (a "compressed" policy here is one built at the
compressed sizes, n = [32, 32], not one reduced by balanced truncation).

- ``ssm n=[128,128]``: the uncompressed 2-layer LRU policy.
- ``ssm n=[32,32]``: the same after compression to a quarter of the states.
- ``mlp 64-64``: the feed-forward baseline.

Rows: ONNX Runtime's identity-graph floor; each policy through ``OnnxPolicy.act``
(IOBinding, the default) and through ``session.run`` (``io_binding=False``); each policy
in torch eager (``ActorCritic.predict`` under no_grad, one torch thread). Then a sweep
of ORT p50 over the per-layer state size n (2 layers, ``--sweep``), which separates the
cost that shrinks with n from the fixed per-call cost that compression cannot remove.
Writes the ONNX files (reusable with ``python -m export.bench`` on a target device),
``latency.md``, ``latency.json``, ``latency_hist.png`` and ``latency_vs_n.png`` to
``--out-dir``.
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


def build_policies(policies: dict[str, dict]) -> dict[str, ActorCritic]:
    env = gym.make(ENV_ID)
    obs_dim, space = env.observation_space.shape[0], env.action_space
    env.close()
    torch.manual_seed(0)
    return {
        name: ActorCritic(obs_dim, space.shape[0], space.low, space.high, width=64, **kwargs)
        for name, kwargs in policies.items()
    }


def state_size_sweep(sizes: list[int], out_dir: Path, steps: int, warmup: int) -> list[dict]:
    """ORT p50 of 2-layer SSM policies with n states per layer, for each n in ``sizes``."""
    policies = build_policies(
        {f"sweep ssm n=[{n},{n}]": dict(policy="ssm", state_dims=[n, n]) for n in sizes}
    )
    rows = []
    for (name, policy), n in zip(policies.items(), sizes, strict=True):
        path = to_onnx(policy, out_dir / f"sweep_n{n}.onnx", ENV_ID)
        rows.append({**bench_session(path, steps, warmup, name=f"ORT {name}"), "n": n})
    return rows


def plot_sweep(rows: list[dict], floor: dict, mlp: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    n = [r["n"] for r in rows]
    ax.plot(n, [r["p50_us"] for r in rows], "o-", label="ORT SSM, 2 layers, H = 64 (p50)")
    for r in rows:
        ax.annotate(
            f"{r['nodes']} nodes",
            (r["n"], r["p50_us"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
        )
    ax.axhline(mlp["p50_us"], color="tab:green", ls="--", label=f"MLP 64-64 ({mlp['p50_us']:.1f})")
    ax.axhline(
        floor["p50_us"], color="grey", ls=":", label=f"identity floor ({floor['p50_us']:.1f})"
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("complex states per layer n (18 nodes: merged graph path, 23: elementwise)")
    ax.set_ylabel("µs per step (batch 1)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--sweep", default="4,8,16,32,64,128", help="n per layer ('' skips)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/out/latency"))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    policies = build_policies(POLICIES)
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
    save_histogram(results, args.out_dir / "latency_hist.png")
    if args.sweep:
        sweep = state_size_sweep(
            [int(n) for n in args.sweep.split(",")], args.out_dir, steps, warmup
        )
        mlp = next(r for r in results if r["name"] == "ORT mlp 64-64")
        plot_sweep(sweep, results[0], mlp, args.out_dir / "latency_vs_n.png")
        table += "\n\nState-size sweep (ORT, IOBinding, 2 layers, H = 64):\n\n"
        table += "| n per layer | nodes | p50 µs | p99 µs |\n|---:|---:|---:|---:|\n"
        table += "\n".join(
            f"| {r['n']} | {r['nodes']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} |" for r in sweep
        )
        results += sweep
    print(table)
    (args.out_dir / "latency.md").write_text(table + "\n")
    (args.out_dir / "latency.json").write_text(to_json(results, machine))
    print(f"\nwrote {args.out_dir}/latency.md, latency.json, the PNGs and the .onnx files")


if __name__ == "__main__":
    main()
