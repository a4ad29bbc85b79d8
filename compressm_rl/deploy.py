"""Deployment commands: ``compressm-rl export`` and ``compressm-rl bench``, ONNX evaluation.

Wiring (in ``cli.build_parser``)::

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_export_parser(sub)
    add_bench_parser(sub)
    ...
    return args.func(args)          # handlers return the exit code

Heavy imports (torch, gymnasium, onnx) happen inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEFAULT_PARITY_STEPS = 500


# ----- export ---------------------------------------------------------------------------
def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``compressm-rl export RUN_DIR --out FILE.onnx``: export, then closed-loop parity check."""
    p = subparsers.add_parser(
        "export",
        help="export a run's policy to one ONNX step graph and check it against torch",
        description="Export the actor of a trained run to ONNX (obs normalisation and action "
        "bounds baked in), then run closed-loop MuJoCo rollouts with episode resets comparing "
        "ONNX Runtime's actions with torch's. Exits with status 1 if they differ.",
    )
    p.add_argument("run_dir", help="run directory (as written by `compressm-rl train`)")
    p.add_argument("--out", help="output .onnx file (default: RUN_DIR/policy.onnx)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    p.add_argument(
        "--parity-steps",
        type=int,
        default=DEFAULT_PARITY_STEPS,
        help="closed-loop steps per parity check (0 skips the check; not recommended)",
    )
    p.add_argument("--parity-batch", type=int, default=1, help="envs stepped together")
    p.add_argument("--seed", type=int, default=0, help="env seed of the parity rollouts")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument(
        "--keep-failed",
        action="store_true",
        help="keep the .onnx file when parity fails (it is deleted by default so that a "
        "file at --out always means a checked export)",
    )
    p.set_defaults(func=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``compressm-rl export``; returns the exit status."""
    from compressm_rl.runs import load_policy
    from envs import make_env
    from export.onnx_export import DEFAULT_OPSET, to_onnx
    from export.parity import ParityError, check_parity

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "policy.onnx"
    try:
        policy, meta = load_policy(run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: cannot load a policy from {run_dir}: {err}", file=sys.stderr)
        return 2
    env_id, step = meta["env_id"], int(meta.get("global_step", 0))
    to_onnx(policy, out, env_id=env_id, training_steps=step, opset=args.opset or DEFAULT_OPSET)

    from export.runtime import OnnxPolicy

    onnx_policy = OnnxPolicy(out)
    print(
        f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB): {env_id}, {policy.policy_type}, "
        f"state dims {onnx_policy.layer_state_dims}, {onnx_policy.metadata['num_nodes']} nodes, "
        f"trained {step} steps"
    )
    if args.parity_steps <= 0:
        print("parity check skipped (--parity-steps 0)", file=sys.stderr)
        return 0
    try:
        report = check_parity(
            policy,
            out,
            env_id,
            steps=args.parity_steps,
            batch=args.parity_batch,
            seed=args.seed,
            rtol=args.rtol,
            atol=args.atol,
            make_env=make_env,
        )
    except ParityError as err:
        if not args.keep_failed:
            out.unlink(missing_ok=True)
        kept = f"kept {out}" if args.keep_failed else f"deleted {out}"
        print(f"error: ONNX export does not match torch: {err} ({kept})", file=sys.stderr)
        return 1
    print(
        f"parity ok: {report['steps']} steps x {report['batch']} envs, "
        f"{report['episodes_started']} episodes, max abs err {report['max_abs_err']:.2e}, "
        f"max rel err {report['max_rel_err']:.2e} (rtol {args.rtol}, atol {args.atol})"
    )
    return 0


# ----- bench ----------------------------------------------------------------------------
def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``compressm-rl bench FILE.onnx [...]``: per-step latency table (and histogram)."""
    p = subparsers.add_parser(
        "bench",
        help="per-step latency of exported policies in ONNX Runtime (batch 1)",
        description="Time OnnxPolicy.act at batch 1 for each file side by side, with ONNX "
        "Runtime's identity-graph floor and optionally the torch policy of a run.",
    )
    p.add_argument("models", nargs="+", help=".onnx files")
    p.add_argument("--steps", type=int, default=5000, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--provider", default="CPUExecutionProvider")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--run", metavar="DIR", help="add a torch eager row for this run's policy")
    p.add_argument(
        "--out-dir", metavar="DIR", help="write latency.md, latency.json, latency_hist.png here"
    )
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Handler of ``compressm-rl bench``; returns the exit status."""
    from export.bench import machine_info, markdown_table, run_benchmarks, save_histogram, to_json

    try:
        results = run_benchmarks(args.models, args.steps, args.warmup, args.provider)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.run:
        from compressm_rl.runs import load_policy

        policy, meta = load_policy(Path(args.run))
        results.append(
            bench_torch(policy, f"torch eager ({Path(args.run).name})", args.steps, args.warmup)
        )
    machine = machine_info(args.provider)
    table = markdown_table(results, machine)
    print(table)
    if args.json:
        Path(args.json).write_text(to_json(results, machine))
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "latency.md").write_text(table + "\n")
        (out_dir / "latency.json").write_text(to_json(results, machine))
        if not save_histogram(results, out_dir / "latency_hist.png"):
            print("matplotlib is not installed: no histogram written", file=sys.stderr)
    return 0


def torch_stepper(policy) -> Callable[[np.ndarray], np.ndarray]:
    """``obs [obs_dim] -> action [act_dim]`` through ``ActorCritic.predict`` (no_grad,
    deterministic), carrying the recurrent state: the torch twin of ``OnnxPolicy.act``."""
    state = policy.initial_state(1)

    def step(obs: np.ndarray) -> np.ndarray:
        nonlocal state
        action, state = policy.predict(obs, state)
        return action

    return step


def bench_torch(policy, name: str, steps: int = 5000, warmup: int = 500, threads: int = 1) -> dict:
    """Latency row of the torch eager policy at batch 1 on ``threads`` torch threads."""
    import torch

    from export.bench import bench_callable

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return bench_callable(
            name,
            torch_stepper(policy),
            policy.obs_dim,
            steps,
            warmup,
            kind="torch",
            policy_type=policy.policy_type,
            state_dims=list(policy.actor.state_dims),
        )
    finally:
        torch.set_num_threads(previous)


# ----- evaluation -----------------------------------------------------------------------
def evaluate_onnx(path: str | Path, env_id: str, episodes: int, seed: int = 0) -> np.ndarray:
    """Undiscounted returns ``[episodes]`` of the exported policy, deterministic actions.

    One env (``envs.make_env``, so POMDP ids work); episode ``k`` starts with
    ``env.reset(seed=seed + k)`` and the policy's state reset; rewards are summed until
    ``terminated`` or ``truncated``. The same convention as the torch ``evaluate_policy``.
    """
    from envs import make_env
    from export.runtime import OnnxPolicy

    policy = OnnxPolicy(path)
    env = make_env(env_id)
    returns = np.zeros(episodes)
    try:
        for k in range(episodes):
            obs, _ = env.reset(seed=seed + k)
            policy.reset()
            done = False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(policy.act(obs))
                returns[k] += float(reward)
                done = terminated or truncated
    finally:
        env.close()
    return returns
