"""ONNX Runtime p50 of the step graph's variants, interleaved in one process (A/B).

    python benchmarks/onnx_graph.py [--sizes 25,128] [--rounds 30] [--steps 2000]

Hopper-v5 sizes (obs 11, act 3, bounds ±1), width H = 64, 2 LRU layers of n states each,
random weights (latency depends on the shapes only). For each n: the plain graph on the
path HEAD picked before the folds (merged while S(S + 2H) + 2H² ≤ 70k, else elementwise),
the merged path with its folds, the elementwise path as the C export writes it, and the
automatic graph (``build_model``'s default, ORT's). Plus the MLP 64-64 and ORT's
identity-graph floor. Every round times every row once (``steps`` calls of
``OnnxPolicy.act`` at batch 1, IOBinding) in a random order; a row's figure is the median
over rounds of its p50, and a ratio is the median over rounds of the two rows' p50 ratio
in the same round (this VM drifts ±30% between processes and by 2× within minutes; the
paired ratios are what to quote). Also prints each graph's node count as written and
after ORT's ``ORT_ENABLE_ALL`` optimisation, with the contrib ops ORT fused in.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.bench import cpu_model, identity_step, time_steps
from export.onnx_export import build_model
from export.runtime import OnnxPolicy, session_options
from policies.actor_critic import ActorCritic

OBS_DIM, ACT_DIM, WIDTH = 11, 3, 64


def make_policy(state_dims: list[int]) -> ActorCritic:
    torch.manual_seed(0)
    kind = dict(policy="ssm", state_dims=state_dims) if state_dims else dict(policy="mlp")
    bounds = np.ones(ACT_DIM, np.float32)
    return ActorCritic(OBS_DIM, ACT_DIM, -bounds, bounds, width=WIDTH, **kind)


def variants(n: int) -> dict[str, onnx.ModelProto]:
    policy = make_policy([n, n])
    state, layers = 4 * n, 2
    head_merged = state * (state + layers * WIDTH) + layers * WIDTH**2 <= 70_000
    return {
        f"n={n} HEAD graph": build_model(policy, merged=head_merged, folds=()),
        f"n={n} merged, chain+ln_affine": build_model(
            policy, merged=True, folds=("chain", "ln_affine")
        ),
        f"n={n} elementwise (C export)": build_model(policy, merged=False),
        f"n={n} automatic": build_model(policy),
    }


def ort_nodes(model: onnx.ModelProto, directory: Path) -> tuple[int, list[str]]:
    """Node count after ORT's optimisation, and the fused (contrib) ops in it."""
    opts = session_options()
    opts.optimized_model_filepath = str(directory / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(opts.optimized_model_filepath)
    fused = [node.op_type for node in optimized.graph.node if node.domain]
    return len(optimized.graph.node), fused


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="25,128", help="n per layer, comma separated")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2000, help="timed calls per row a round")
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)

    models = {"mlp 64-64": build_model(make_policy([]))}
    for n in (int(s) for s in args.sizes.split(",")):
        models.update(variants(n))
    directory = Path(tempfile.mkdtemp())
    _, floor = identity_step(width=OBS_DIM)  # IOBinding, as OnnxPolicy.act
    steps = {"identity floor": floor}
    print("| graph | nodes | after ORT | ORT fused | folds |\n|---|---:|---:|---|---|")
    for i, (name, model) in enumerate(models.items()):
        path = directory / f"{i}.onnx"
        onnx.save(model, str(path))
        steps[name] = OnnxPolicy(path).act
        count, fused = ort_nodes(model, directory)
        meta = {p.key: p.value for p in model.metadata_props}
        print(
            f"| {name} | {len(model.graph.node)} | {count} | {', '.join(fused) or '-'} | "
            f"{meta['graph_variant']}: {meta['graph_folds'] or '-'} |"
        )

    names = list(steps)
    p50 = {name: [] for name in names}
    rng = np.random.default_rng(0)
    for r in range(args.rounds):
        for i in rng.permutation(len(names)):
            times = time_steps(steps[names[i]], OBS_DIM, args.steps, args.warmup, seed=r)
            p50[names[i]].append(np.percentile(times, 50) / 1e3)
    p50 = {name: np.array(values) for name, values in p50.items()}

    def ratio(a: str, b: str) -> float:
        return float(np.median(p50[a] / p50[b]))

    print(
        f"\n{cpu_model()}, onnxruntime {ort.__version__}, 1 thread, batch 1, "
        f"{args.rounds} rounds x {args.steps} steps\n"
    )
    print("| graph | p50 µs | ÷ HEAD graph | ÷ MLP |\n|---|---:|---:|---:|")
    for name in names:
        head = f"{name.split(' ')[0]} HEAD graph"
        vs_head = f"{ratio(name, head):.3f}" if head in p50 and name != head else ""
        vs_mlp = f"{ratio(name, 'mlp 64-64'):.2f}" if name != "identity floor" else ""
        print(f"| {name} | {np.median(p50[name]):.2f} | {vs_head} | {vs_mlp} |")


if __name__ == "__main__":
    main()
