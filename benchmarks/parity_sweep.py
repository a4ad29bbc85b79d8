"""What the float64 parity check catches: exports with one weight 0.1% or 1% off, and
correct exports over many seeds, in ONNX and in C.

    python benchmarks/parity_sweep.py [--seeds 200] [--sweep-seeds 3] [--steps 200] [--batch 2]

Small random Hopper-v5 policies shaped like trained ones (``make_policy``), width 64: an
SSM (2 LRU layers, n = 32 each), a compressed SSM (32 + 32 cut to 12 + 12 by balanced
truncation, ``compress_policy``) and an MLP (64-64). For each, the ONNX graph
(``build_model``'s default) and the C export (``export.c_codegen`` on the elementwise
graph, compiled with gcc) are checked by ``export.parity.check_parity`` (``steps``
Hopper steps x ``batch`` envs).

1. Sweep: for every float initialiser of the graph, its largest-magnitude element times
   1 + 1e-3 and 1 + 1e-2, one at a time (``sweep-seeds`` policies each). Each perturbed
   export is checked twice: by the per-step ``atol + rtol·scale`` rule alone (1e-5, 1e-4;
   the rounding rule switched off) and by the rounding rule alone (atol, rtol infinite),
   which gives the ratio of the candidate's RMS error to its allowance (above 1 fails).
   The full check fails when either does.
2. Correct exports: ``seeds`` policies per kind and backend (weights and env seeds
   differ), the full check with its defaults; pass rate and the largest share of the
   rounding allowance used.

Prints Markdown tables. Needs gcc for the C rows (skipped without it).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnx
import torch
from onnx import numpy_helper

from export.onnx_export import build_model
from export.parity import ParityError, check_parity
from policies.actor_critic import ActorCritic

ENV_ID = "Hopper-v5"
KINDS = ("ssm", "compressed", "mlp")
DELTAS = (1e-3, 1e-2)
OFF = 1e30  # a rounding factor that switches the rounding rule off


def make_policy(kind: str, seed: int, width: int = 64, env_id: str = ENV_ID) -> ActorCritic:
    """A random policy shaped like a trained one, so that every weight of its graph acts
    on its own closed-loop rollouts.

    ``kind``: "ssm" (n = [32, 32], two modes per layer at the |λ| clamp, one of them
    real), "compressed" (the same cut to 12 + 12 states by ``compress_policy``, balanced
    truncation: real and complex modes in balanced coordinates) or "mlp" (two hidden
    layers). The LayerNorms' scales and biases are not 1 and 0. The normaliser holds the
    statistics of 200 random-action steps, perturbed, each std at least a twentieth of
    the mean (random actions leave the torso height's std at 0.015, |m|/s = 80; a
    trained policy's is ~0.1), except for two joint velocities: centred on their median
    in the policy's own rollouts (env seeds ``seed`` and ``1000 + seed``) and scaled by
    a twentieth of their 35-65% range, they reach the ±10 clip on both sides. The action
    head is scaled on those rollouts too: standard deviation 0.6 around means of +0.5,
    -0.5, 0, ... per dimension, so that most actions are within the bounds and some at
    each bound.
    """
    # One torch thread: batch-1 steps on more threads cost 10-20x on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _make_policy(kind, seed, width, env_id)
    finally:
        torch.set_num_threads(threads)


def _make_policy(kind: str, seed: int, width: int, env_id: str) -> ActorCritic:
    torch.manual_seed(seed)
    env = gym.make(env_id)
    space = env.action_space
    space.seed(seed)
    if kind == "mlp":
        shape = dict(policy="mlp")
    else:
        shape = dict(policy="ssm", state_dims=[32, 32])
    policy = ActorCritic(
        env.observation_space.shape[0], space.shape[0], space.low, space.high, width=width, **shape
    )
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    seen = [obs]
    for _ in range(200):
        obs, _, terminated, truncated, _ = env.step(space.sample())
        seen.append(obs)
        if terminated or truncated:
            obs, _ = env.reset()
    with torch.no_grad():
        norm = policy.obs_norm
        norm.update(torch.as_tensor(np.array(seen)))
        norm.mean += torch.as_tensor(rng.normal(0, 0.1, policy.obs_dim))
        norm.var *= torch.as_tensor(rng.uniform(0.5, 2.0, policy.obs_dim))
        norm.var.copy_(torch.maximum(norm.var, (norm.mean / 20) ** 2))
        for module in policy.actor.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.normal_(0, 0.2)
        if kind != "mlp":
            for block in policy.actor.blocks:
                block.lru.nu_log[:2] = -30.0  # |λ| = MAX_RADIUS
                block.lru.theta[:2] = torch.tensor([0.0, math.pi])
    if kind == "compressed":
        from compressm_rl.compression import CompressionConfig, compress_policy

        config = CompressionConfig(budget=24, allocation="uniform", parts=["actor"], min_state=2)
        compress_policy(policy, None, config)
    offsets = torch.tensor([0.5, -0.5, 0.0])[torch.arange(policy.act_dim) % 3]
    with torch.no_grad():
        _, means = _closed_loop(policy, env, seed)
        _scale_head(policy, means, offsets)
        seen, _ = _closed_loop(policy, env, seed)
        # The two velocities whose median is nearest 0 in units of their 35-65% range.
        low, mid, high = np.quantile(seen, [0.35, 0.5, 0.65], axis=0)
        spread = np.maximum(high - low, 1e-6)
        clipped = 5 + np.argsort(np.abs(mid[5:]) / spread[5:])[:2]
        norm.mean[clipped] = torch.as_tensor(mid[clipped])
        norm.var[clipped] = torch.as_tensor((spread[clipped] / (2 * norm.clip)) ** 2)
        _, means = _closed_loop(policy, env, seed)
        _scale_head(policy, means, offsets)
    env.close()
    return policy


def _closed_loop(policy: ActorCritic, env, seed: int, steps: int = 300):
    """``(obs [2·steps, obs_dim], unclamped action means [2·steps, act_dim])`` of the
    policy driving ``env`` from the env seeds ``seed`` and ``1000 + seed`` (deterministic
    actions, the state reset with the episodes)."""
    seen, means = [], []
    for env_seed in (seed, 1000 + seed):
        _drive(policy, env, env_seed, steps, seen, means)
    return np.array(seen), torch.stack(means)


def _drive(policy: ActorCritic, env, seed: int, steps: int, seen: list, means: list) -> None:
    obs, _ = env.reset(seed=seed)
    state = policy.actor.initial_state(1)
    for _ in range(steps):
        seen.append(obs)
        x = policy.obs_norm(torch.as_tensor(obs, dtype=torch.float32)[None])
        features, state = policy.actor.step(x, state)
        mean = policy.actor_head(features)
        means.append(mean[0])
        action = torch.clamp(mean[0], policy.action_low, policy.action_high)
        obs, _, terminated, truncated, _ = env.step(action.numpy())
        if terminated or truncated:
            obs, _ = env.reset()
            state = policy.actor.initial_state(1)


def _scale_head(policy: ActorCritic, means: torch.Tensor, offsets: torch.Tensor) -> None:
    """Scale the action head so that ``means`` (its outputs on a rollout) would have
    standard deviation 0.6 around ``offsets``."""
    gain = 0.6 / means.std(0)
    policy.actor_head.weight *= gain[:, None]
    policy.actor_head.bias.copy_(policy.actor_head.bias * gain - means.mean(0) * gain + offsets)


def graph(policy: ActorCritic, backend: str) -> onnx.ModelProto:
    """The ONNX graph ``backend`` runs: ORT's default graph, or the C export's (the
    elementwise path, as ``compressm-rl export --format c`` writes it)."""
    return build_model(policy, ENV_ID, merged=False if backend == "c" else None)


def float_initializers(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]


def perturbed(model: onnx.ModelProto, name: str, delta: float) -> onnx.ModelProto:
    """A copy of ``model`` whose initialiser ``name`` has its largest-magnitude element
    times ``1 + delta`` (float32)."""
    model = copy.deepcopy(model)
    for init in model.graph.initializer:
        if init.name == name:
            values = numpy_helper.to_array(init).copy()
            flat = values.reshape(-1)
            flat[np.abs(flat).argmax()] *= np.float32(1 + delta)
            init.CopyFrom(numpy_helper.from_array(values, name))
            return model
    raise KeyError(name)


def candidate(model: onnx.ModelProto, backend: str, directory: Path, batch: int):
    """What ``check_parity`` takes: the ``.onnx`` path, or the compiled C policy."""
    directory.mkdir(parents=True, exist_ok=True)
    if backend == "onnx":
        path = directory / "policy.onnx"
        onnx.save_model(model, str(path))
        return path
    from export.c_codegen import generate
    from export.c_runtime import CPolicy

    sources = generate(model)
    (directory / "policy.c").write_text(sources.source)
    (directory / "policy.h").write_text(sources.header)
    return CPolicy(directory, batch_size=batch)


def check(policy, cand, steps, batch, seed, **rule) -> tuple[bool, float]:
    """``(passed, rounding_used)``: the check's verdict on ``cand`` (``candidate``), and
    its largest ratio of RMS error to the rounding allowance (NaN where the atol/rtol rule
    stopped it)."""
    try:
        report = check_parity(policy, cand, ENV_ID, steps, batch, seed, **rule)
    except ParityError as err:
        return False, math.nan if err.rounding_used is None else err.rounding_used
    return True, report["rounding_used"]


def sweep(policy, kind, seed, backend, steps, batch, out: Path) -> list[dict]:
    """Every float initialiser of ``policy``'s graph for ``backend``, perturbed by each of
    ``DELTAS``, checked by each rule alone."""
    rows = []
    model = graph(policy, backend)
    for name in float_initializers(model):
        for delta in DELTAS:
            directory = out / f"{kind}-{backend}-{seed}-{name}-{delta}"
            cand = candidate(perturbed(model, name, delta), backend, directory, batch)
            old, _ = check(policy, cand, steps, batch, 1000 + seed, rounding_factor=OFF)
            new, ratio = check(
                policy, cand, steps, batch, 1000 + seed, atol=math.inf, rtol=math.inf
            )
            rows.append(
                dict(
                    kind=kind,
                    backend=backend,
                    seed=seed,
                    name=name,
                    delta=delta,
                    old=old,
                    new=new,
                    ratio=ratio,
                )
            )
    return rows


def correct_export(policy, kind, seed, backend, steps, batch, out: Path) -> dict:
    """The full check, with its defaults, of ``policy``'s export for ``backend``."""
    directory = out / f"{kind}-{backend}-{seed}"
    row = dict(kind=kind, backend=backend, seed=seed)
    try:
        report = check_parity(
            policy,
            candidate(graph(policy, backend), backend, directory, batch),
            ENV_ID,
            steps,
            batch,
            1000 + seed,
        )
    except ParityError as err:
        print(f"  {kind} {backend} seed {seed}: FAILED: {err}", flush=True)
        return row | dict(passed=False, used=err.rounding_used or math.inf, vs=math.nan)
    return row | dict(passed=True, used=report["rounding_used"], vs=report["rms_err_vs_float32"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="correct exports per row")
    parser.add_argument("--sweep-seeds", type=int, default=3, help="policies per sweep row")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=int, default=64, help="features per layer (H)")
    parser.add_argument("--backends", default="onnx,c")
    parser.add_argument("--json", type=Path, help="also write every row to this file")
    parser.add_argument("--tables-from", type=Path, help="print the tables of a --json file")
    args = parser.parse_args()
    if args.tables_from:
        saved = json.loads(args.tables_from.read_text())
        backends = list(dict.fromkeys(r["backend"] for r in saved["correct"] + saved["swept"]))
        tables(saved["swept"], saved["correct"], backends, argparse.Namespace(**saved["args"]))
        return
    backends = args.backends.split(",")
    if "c" in backends and shutil.which("gcc") is None:
        print("no gcc: the C rows are skipped")
        backends.remove("c")
    torch.set_num_threads(1)
    swept, correct = [], []
    with tempfile.TemporaryDirectory(prefix="parity-sweep-") as tmp:
        out = Path(tmp)
        for kind in KINDS:
            t0 = time.perf_counter()
            for seed in range(max(args.seeds, args.sweep_seeds)):
                policy = make_policy(kind, seed, args.width)
                for backend in backends:
                    run = (policy, kind, seed, backend, args.steps, args.batch, out / str(seed))
                    if seed < args.sweep_seeds:
                        swept += sweep(*run)
                    if seed < args.seeds:
                        correct.append(correct_export(*run))
                shutil.rmtree(out / str(seed), ignore_errors=True)
            print(f"  {kind}: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                dict(args=vars(args) | dict(json=str(args.json)), swept=swept, correct=correct),
                indent=1,
            )
        )
    tables(swept, correct, backends, args)


def tables(swept: list[dict], correct: list[dict], backends: list[str], args) -> None:
    """Print the Markdown tables. A perturbed export that passes with the very ratio of
    the unperturbed one (same policy, export and rollout) had no effect on the rollout
    (an obs clip bound never reached, an action never at a bound there): no check can
    see it, and it is counted apart."""
    base = {(r["kind"], r["seed"], r["backend"]): r["used"] for r in correct}
    for r in swept:
        r["inert"] = (
            r["old"] and r["new"] and r["ratio"] == base.get((r["kind"], r["seed"], r["backend"]))
        )
    print(f"\nWidth {args.width}, {args.steps} steps x {args.batch} envs per check, {ENV_ID}\n")
    print(
        "Perturbed exports (largest element of one initialiser x (1 + δ), one at a time; "
        f"{args.sweep_seeds} policies per row):\n"
    )
    print(
        "| policy | export | δ | perturbed | no effect on the rollout | fail atol/rtol alone "
        "| fail the rounding rule alone | fail the check | smallest ratio to the allowance "
        "(initialiser) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for kind in KINDS:
        for backend in backends:
            for delta in DELTAS:
                rows = [
                    r
                    for r in swept
                    if (r["kind"], r["backend"], r["delta"]) == (kind, backend, delta)
                ]
                if not rows:
                    continue
                acting = [r for r in rows if not r["inert"]]
                n, inert = len(acting), len(rows) - len(acting)
                old = sum(not r["old"] for r in acting)
                new = sum(not r["new"] for r in acting)
                both = sum(not (r["old"] and r["new"]) for r in acting)
                weakest = min(acting, key=lambda r: r["ratio"])
                print(
                    f"| {kind} | {backend} | {delta:g} | {n} | {inert} | {old}/{n} | {new}/{n} | "
                    f"{both}/{n} | {weakest['ratio']:.3g} ({weakest['name']}) |"
                )

    print(
        "\nδ = 1e-3, per initialiser: the rounding rule's ratio (smallest over the policies "
        "where it acts), and how many of those the atol/rtol rule alone lets pass:\n"
    )
    print(
        "| policy | initialiser | "
        + " | ".join(f"{b}: ratio | {b}: atol/rtol passes" for b in backends)
        + " |"
    )
    print("|---|---|" + "---:|---:|" * len(backends))
    for kind in KINDS:
        names = dict.fromkeys(r["name"] for r in swept if r["kind"] == kind)
        for name in names:
            cells = []
            for backend in backends:
                rows = [
                    r
                    for r in swept
                    if (r["kind"], r["backend"], r["name"], r["delta"])
                    == (kind, backend, name, 1e-3)
                    and not r["inert"]
                ]
                if not rows:
                    cells += ["–", "–"]
                    continue
                passed = sum(r["old"] for r in rows)
                cells += [f"{min(r['ratio'] for r in rows):.3g}", f"{passed}/{len(rows)}"]
            print(f"| {kind} | {name} | " + " | ".join(cells) + " |")

    print(f"\nCorrect exports ({args.seeds} policies per row, the full check):\n")
    print(
        "| policy | export | pass | rounding allowance used: max | median | RMS error / "
        "float32's: max |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for kind in KINDS:
        for backend in backends:
            rows = [r for r in correct if (r["kind"], r["backend"]) == (kind, backend)]
            if not rows:
                continue
            used = [r["used"] for r in rows]
            print(
                f"| {kind} | {backend} | {sum(r['passed'] for r in rows)}/{len(rows)} | "
                f"{max(used):.3g} | {np.median(used):.3g} | "
                f"{np.nanmax([r['vs'] for r in rows]):.3g} |"
            )


if __name__ == "__main__":
    main()
