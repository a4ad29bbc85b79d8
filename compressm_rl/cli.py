"""The ``compressm-rl`` command line: train, eval, report (compress, export, bench join)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from compressm_rl import __version__


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a policy with recurrent PPO")
    p.add_argument("--env", help="Gymnasium id, e.g. Hopper-v5 or Hopper-v5-P (not with --resume)")
    p.add_argument("--total-steps", type=int, help="env steps (default: the task preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="run directory (default runs/ENV-sSEED)")
    p.add_argument("--policy", choices=["ssm", "mlp"], default="ssm")
    p.add_argument("--state-dim", type=int, default=128, help="n, complex states per LRU layer")
    p.add_argument("--width", type=int, default=64, help="H, features per layer")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--num-envs", type=int, help="parallel envs (default: preset)")
    p.add_argument("--num-workers", type=int, default=0, help="subprocess envs (AsyncVectorEnv)")
    p.add_argument(
        "--compress-tol", type=float, help="compress in training: drop this fraction of Σ HSV"
    )
    p.add_argument(
        "--compress-at",
        type=lambda s: [float(x) for x in s.split(",")],
        help="reduction points as fractions of total steps (default 0.02,0.04,0.06,0.08)",
    )
    p.add_argument("--min-state", type=int, help="floor on complex states per layer (default 4)")
    p.add_argument(
        "--compress-parts",
        type=lambda s: s.split(","),
        help="what to compress: actor,critic (default) or actor (the deployed part) alone",
    )
    p.add_argument("--config", type=Path, help="YAML with TrainConfig keys (flags win)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue a run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_train)


def _train(args) -> int:
    from compressm_rl.compression import CompressionConfig
    from compressm_rl.runs import TrainConfig, load_config
    from compressm_rl.train import train
    from envs import check_env_id

    if args.resume:
        config = load_config(args.resume)
        train(config, args.resume, resume=True, progress=not args.no_progress)
        return 0
    if args.env is None:
        raise ValueError("--env is required to start a run (or pass --resume DIR to continue one)")
    check_env_id(args.env)
    data: dict = {}
    if args.config:
        import yaml

        data = yaml.safe_load(args.config.read_text()) or {}
    flags = {
        "env_id": args.env,
        "total_steps": args.total_steps,
        "seed": args.seed,
        "policy": args.policy,
        "state_dim": args.state_dim,
        "width": args.width,
        "layers": args.layers,
        "num_workers": args.num_workers,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.num_envs:
        data.setdefault("ppo", {})["num_envs"] = args.num_envs
    compression = {
        "tol": args.compress_tol,
        "at": args.compress_at,
        "min_state": args.min_state,
        "parts": args.compress_parts,
    }
    data.setdefault("compression", {}).update({k: v for k, v in compression.items() if v})
    config = TrainConfig.from_dict(data)
    config.preset()  # validate PPO and compression settings before creating anything
    CompressionConfig.from_dict(config.compression)
    out = args.out or Path("runs") / f"{args.env}-s{args.seed}"
    if (out / "config.yaml").exists():
        if not args.overwrite:
            print(
                f"error: {out} already holds a run; pass --resume {out} to continue it "
                "or --overwrite to replace it",
                file=sys.stderr,
            )
            return 2
        shutil.rmtree(out)
    train(config, out, progress=not args.no_progress)
    print(f"run saved in {out}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run directory or an .onnx file deterministically")
    p.add_argument("target", type=Path, help="run directory or exported .onnx file")
    p.add_argument("--env", help="env id (default: the run's)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=10_000, help="episode k uses reset(seed=seed+k)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(handler=_eval)


def _eval(args) -> int:
    if args.target.suffix == ".onnx":
        from compressm_rl.deploy import evaluate_onnx
        from export.runtime import OnnxPolicy

        env_id = args.env or OnnxPolicy(args.target).env_id
        returns = evaluate_onnx(args.target, env_id, args.episodes, args.seed)
    else:
        from compressm_rl.evaluate import evaluate_policy
        from compressm_rl.runs import load_policy

        policy, meta = load_policy(args.target)
        env_id = args.env or meta["env_id"]
        returns = evaluate_policy(policy, env_id, args.episodes, args.seed)
    if args.json:
        print(
            json.dumps(
                {
                    "env_id": env_id,
                    "episodes": len(returns),
                    "mean": float(returns.mean()),
                    "std": float(returns.std()),
                    "returns": returns.tolist(),
                }
            )
        )
    else:
        print(f"{env_id}: {returns.mean():.1f} ± {returns.std():.1f} over {len(returns)} episodes")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.md and the learning-curve PNG of a run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--episodes", type=int, default=10, help="deterministic eval episodes (0: skip)")
    p.set_defaults(handler=_report)


def _report(args) -> int:
    from compressm_rl.evaluate import evaluate_policy
    from compressm_rl.report import write_report
    from compressm_rl.runs import load_policy

    returns = onnx_returns = None
    if args.episodes > 0:
        policy, meta = load_policy(args.run_dir)
        returns = evaluate_policy(policy, meta["env_id"], args.episodes, seed=10_000)
        onnx_path = args.run_dir / "policy.onnx"
        if onnx_path.exists():
            from compressm_rl.deploy import evaluate_onnx

            onnx_returns = evaluate_onnx(onnx_path, meta["env_id"], args.episodes, seed=10_000)
    print(f"report written to {write_report(args.run_dir, returns, onnx_returns)}")
    return 0


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="balanced truncation of a finished run (post-training)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="new run directory")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--tol", type=float, help="drop this fraction of Σ HSV per layer")
    group.add_argument(
        "--state-dims",
        type=lambda s: [int(x) for x in s.split(",")],
        help="target complex states per actor layer (critic layers get the same), e.g. 24,18",
    )
    p.set_defaults(handler=_compress)


def _compress(args) -> int:
    from compressm_rl.posthoc import compress_run

    events = compress_run(args.run_dir, args.out, tol=args.tol, state_dims=args.state_dims)
    for e in events:
        print(
            f"{e['layer']}: n {e['n_before']} -> {e['n_after']}  bound {e['bound']:.3g}  {e['status']}"
        )
    print(f"compressed run saved in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compressm-rl",
        description="Train SSM policies with recurrent PPO, compress them with balanced "
        "truncation, export them to ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_compress(sub)
    from compressm_rl.deploy import add_bench_parser, add_export_parser

    add_export_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # One BLAS thread: the float64 reductions are small; on 2 cores more threads ran 20x slower.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        handler = getattr(args, "handler", None) or args.func
        return handler(args)
    except (ValueError, OSError) as err:  # bad input, missing file, run directory busy
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
