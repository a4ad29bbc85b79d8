"""The ``compressm-rl`` command line: train, eval, report, compress, export, bench, loop,
sweep.

One convention: ``_add_NAME(subparsers)`` declares a command and sets its ``handler``;
``_NAME(args)`` does the work through the library and returns the exit status.
``ValueError`` and ``OSError`` (bad input, a missing file, a busy run directory) print
one ``error:`` line and exit 2, before anything is written. A training run stopped by
SIGINT or SIGTERM saves its last completed iteration and exits 130 / 143. Heavy imports (torch,
gymnasium, onnx) happen inside the handlers so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from compressm_rl import __version__
from compressm_rl.settings import int_list


# ----- train ----------------------------------------------------------------------------
def _add_train(sub, with_settings: bool = True) -> None:
    p = sub.add_parser(
        "train",
        help="train a policy with recurrent PPO (and compress it in training)",
        description="Train an SSM (or MLP) policy with recurrent PPO on a Gymnasium MuJoCo "
        "task, optionally compressing it in training. Every run setting below is a "
        "TrainConfig field (docs/reference.md): a flag overrides the --config file, which "
        "overrides the default.",
    )
    p.add_argument("--env", help="Gymnasium id, e.g. Hopper-v5 or Hopper-v5-P (not with --resume)")
    p.add_argument("--out", type=Path, help="run directory (default runs/ENV-sSEED)")
    p.add_argument("--config", type=Path, help="YAML with TrainConfig keys (flags win)")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue a run from its checkpoint, with its own settings (only --total-steps, "
        "--device, --physics-threads, --nproc and --no-progress may be given with it)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--nproc",
        type=int,
        help="data-parallel ranks on this machine, launched through torch.distributed.run "
        "(torchrun); each rank steps --num-envs envs, gradients are averaged (default 1)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_train, command_parser=p)
    if not with_settings:  # `compressm-rl --help` and other commands: no torch to load
        return
    from compressm_rl.runs.config import add_run_flags

    add_run_flags(p)


# What `train --resume` takes besides the run: the machine's settings, how many ranks,
# and a new length. Every other flag is the run's own (config.yaml) and is refused.
RESUME_FLAGS = ("--resume", "--device", "--physics-threads", "--nproc", "--no-progress")
RESUME_FLAGS += ("--total-steps",)


def _given_flags(args) -> list[str]:
    """The flags of ``args.command_parser`` given on the command line (a value other than
    the default), by their long names; abbreviations count as given."""
    return [
        action.option_strings[-1]
        for action in args.command_parser._actions
        if action.option_strings
        and action.dest != "help"
        and getattr(args, action.dest, action.default) != action.default
    ]


def _train(args) -> int:
    return _resume_run(args) if args.resume else _new_run(args)


def _resume_run(args) -> int:
    from dataclasses import replace

    from compressm_rl.device import resolve_device
    from compressm_rl.rl.launch import launch_ranks, wants_ranks
    from compressm_rl.runs import TrainConfig, load_config, locked_run_dir
    from compressm_rl.runs.checkpoint import CHECKPOINT
    from compressm_rl.runs.config import MACHINE_SETTINGS
    from compressm_rl.train import train

    refused = [flag for flag in _given_flags(args) if flag not in RESUME_FLAGS]
    if refused:
        raise ValueError(
            f"{', '.join(refused)} cannot be given with --resume: a run keeps the settings "
            f"in {args.resume / 'config.yaml'} (with --resume: {', '.join(RESUME_FLAGS[1:])})"
        )
    config = load_config(args.resume)
    # A run may move between machines: their settings given here replace the run's.
    given = {name: getattr(args, name) for name in MACHINE_SETTINGS}
    config = replace(config, **{k: v for k, v in given.items() if v is not None})
    if args.total_steps is not None:  # a longer (or shorter) run: checked by TrainConfig
        data = config.to_dict()
        data["ppo"]["total_steps"] = args.total_steps
        config = TrainConfig.from_dict(data)
    resolve_device(config.device)  # checked before anything is written
    if not (args.resume / CHECKPOINT).exists():
        print(
            f"{args.resume} has no checkpoint yet (stopped before its first): training "
            "it from step 0 with its saved config",
            file=sys.stderr,
        )
    if wants_ranks(args.nproc):
        with locked_run_dir(args.resume):  # busy: one line from here, not from each rank
            pass
        return launch_ranks(args.argv, args.nproc)
    train(config, args.resume, resume=True, progress=not args.no_progress)
    print(f"run saved in {args.resume}")
    return 0


def _new_run(args) -> int:
    from compressm_rl.device import resolve_device
    from compressm_rl.rl.launch import launch_ranks, wants_ranks
    from compressm_rl.runs import locked_run_dir
    from compressm_rl.runs.config import check_replaceable, config_from_flags
    from compressm_rl.train import train

    if args.env is None:
        raise ValueError("--env is required to start a run (or pass --resume DIR to continue one)")
    config = config_from_flags(args)  # every setting checked before anything is created
    resolve_device(config.device)  # and that this machine has the device
    out = args.out or Path("runs") / f"{args.env}-s{config.seed}"
    check_replaceable(out, args.overwrite)
    if wants_ranks(args.nproc):
        if out.exists():  # busy: one line from here rather than from each rank
            with locked_run_dir(out):
                pass
        return launch_ranks(args.argv, args.nproc)
    train(config, out, progress=not args.no_progress, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run saved in {out}")
    return 0


# ----- eval, report, compress -----------------------------------------------------------
def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a run directory, an .onnx file or a C export deterministically"
    )
    p.add_argument(
        "target", type=Path, help="run directory, .onnx file, or C export (directory or policy.c)"
    )
    p.add_argument("--env", help="env id (default: the run's)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=10_000, help="episode k uses reset(seed=seed+k)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument(
        "--dynamics",
        default="none",
        metavar="SPEC",
        help="randomized dynamics drawn per episode (seeded by the episode's seed): a preset "
        "(none, mild, wide) and/or ranges, e.g. mass=0.7:1.3,friction=0.5:1.5,delay=0:2 "
        "(default none: the plain task)",
    )
    p.add_argument(
        "--dynamics-grid",
        metavar="GRID",
        help="evaluate at every point of a grid of fixed dynamics, e.g. "
        "mass=0.5:1.5:5,friction=0.3:2.0:5 (key=low:high:count or key=value); writes "
        "dynamics_grid.md and, for 1 or 2 keys, dynamics_grid.png",
    )
    p.add_argument(
        "--out-dir", type=Path, default=Path("."), help="where --dynamics-grid writes (default .)"
    )
    p.set_defaults(handler=_eval)


def _eval(args) -> int:
    from compressm_rl.runs import evaluate, load_controller
    from compressm_rl.runs.evaluate import evaluate_grid, parse_grid_spec, write_grid
    from envs import parse_dynamics

    if args.episodes < 1:
        raise ValueError(f"--episodes = {args.episodes} is out of range: at least 1")
    dynamics = parse_dynamics(args.dynamics)  # bad specs fail before the policy loads
    grid = parse_grid_spec(args.dynamics_grid) if args.dynamics_grid else None
    controller, env_id = load_controller(args.target)
    env_id = args.env or env_id
    if grid is not None:
        result = evaluate_grid(controller, env_id, grid, args.episodes, args.seed, dynamics)
        paths = write_grid(result, args.out_dir)
        summary = {"env_id": env_id, "episodes": args.episodes, "points": result.rows()}
        print(json.dumps(summary) if args.json else result.markdown())
        print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
        return 0
    returns = evaluate(controller, env_id, args.episodes, args.seed, dynamics)
    if args.json:
        summary = {"env_id": env_id, "episodes": len(returns), "mean": float(returns.mean())}
        summary.update(std=float(returns.std()), returns=returns.tolist())
        print(json.dumps(summary))
    else:
        print(f"{env_id}: {returns.mean():.1f} ± {returns.std():.1f} over {len(returns)} episodes")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.md and the learning-curve PNG of a run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--episodes", type=int, default=10, help="deterministic eval episodes (0: skip)")
    p.set_defaults(handler=_report)


def _report(args) -> int:
    from compressm_rl.runs import evaluate, load_controller
    from compressm_rl.runs.report import write_report

    returns = onnx_returns = None
    if args.episodes > 0:
        controller, env_id = load_controller(args.run_dir)
        returns = evaluate(controller, env_id, args.episodes, seed=10_000)
        onnx_path = args.run_dir / "policy.onnx"
        if onnx_path.exists():
            onnx_policy, _ = load_controller(onnx_path)
            onnx_returns = evaluate(onnx_policy, env_id, args.episodes, seed=10_000)
    print(f"report written to {write_report(args.run_dir, returns, onnx_returns)}")
    return 0


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="balanced truncation of a finished run (post-training)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="new run directory")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--tol", type=float, help="drop this fraction of Σ HSV per layer")
    group.add_argument(
        "--state-dims",
        type=int_list,
        help="target complex states per actor layer (critic layers get the same), e.g. 24,18",
    )
    p.set_defaults(handler=_compress)


def _compress(args) -> int:
    from compressm_rl.posthoc import compress_run

    events = compress_run(
        args.run_dir, args.out, tol=args.tol, state_dims=args.state_dims, overwrite=args.overwrite
    )
    for e in events:
        print(f"{e.layer}: n {e.n_before} -> {e.n_after}  bound {e.bound:.3g}  {e.status}")
    print(f"compressed run saved in {args.out}")
    return 0


# ----- deployment -----------------------------------------------------------------------
def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a run's policy to one ONNX step graph (or C sources), checked",
        description="Export the actor of a trained run to ONNX (obs normalisation and action "
        "bounds baked in), or with --format c to dependency-free C99 generated from that "
        "graph (policy.c, policy.h, README.md, bench.c with a Makefile for `make bench` on any "
        "board, and the policy.onnx it came from, in one directory). Then run closed-loop MuJoCo rollouts with episode resets, judging every "
        "step against a float64 reference. Exits with status 1 on a mismatch.",
    )
    p.add_argument("run_dir", type=Path, help="run directory (as written by `compressm-rl train`)")
    p.add_argument("--format", choices=("onnx", "c"), default="onnx", help="what to write")
    p.add_argument(
        "--out",
        type=Path,
        help="output .onnx file, or directory for --format c (default: RUN_DIR/policy.onnx, "
        "RUN_DIR/policy_c)",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    p.add_argument(
        "--parity-steps",
        type=int,
        default=500,
        help="closed-loop steps per parity check (0 skips the check; not recommended)",
    )
    p.add_argument("--parity-batch", type=int, default=1, help="envs stepped together")
    p.add_argument("--seed", type=int, default=0, help="env seed of the parity rollouts")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument(
        "--keep-failed",
        action="store_true",
        help="write the .onnx file to --out even when parity fails (by default --out is "
        "left as it was, so a file there always means a checked export; ONNX only)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --out file that is not a previous export (ONNX only; a previous "
        "export is always replaced)",
    )
    p.set_defaults(handler=_export)


def _export(args) -> int:
    from compressm_rl.deploy import export_c_run, export_run
    from export.onnx_export import DEFAULT_OPSET
    from export.parity import ParityError

    if args.format == "c" and (args.opset is not None or args.keep_failed or args.overwrite):
        raise ValueError("--opset, --keep-failed and --overwrite apply to --format onnx only")
    checks = dict(
        parity_steps=args.parity_steps,
        parity_batch=args.parity_batch,
        seed=args.seed,
        rtol=args.rtol,
        atol=args.atol,
    )
    default = "policy_c" if args.format == "c" else "policy.onnx"
    out = args.out or args.run_dir / default
    try:
        if args.format == "c":
            policy, meta, report = export_c_run(args.run_dir, out, **checks)
        else:
            opset = args.opset or DEFAULT_OPSET
            policy, meta, report = export_run(
                args.run_dir,
                out,
                opset=opset,
                keep_failed=args.keep_failed,
                overwrite=args.overwrite,
                **checks,
            )
    except ParityError as err:
        kept = f"written to {out} anyway" if args.keep_failed else f"{out} left as it was"
        print(f"error: the export does not match its reference: {err} ({kept})", file=sys.stderr)
        return 1
    if args.format == "c":
        what = f"{out}/policy.c, policy.h, README.md, bench.c, Makefile, policy.onnx"
    else:
        what = f"{out} ({out.stat().st_size / 1024:.1f} KiB)"
    print(
        f"wrote {what}: {meta['env_id']}, {policy.policy_type}, state dims "
        f"{list(policy.actor.state_dims)}, trained {meta['global_step']} steps"
    )
    if report is None:
        print("parity check skipped (--parity-steps 0)", file=sys.stderr)
        return 0
    print(
        f"parity ok: {report['steps']} steps x {report['batch']} envs, "
        f"{report['episodes_started']} episodes, max abs err {report['max_abs_err']:.2e}, "
        f"max rel err {report['max_rel_err']:.2e} (rtol {args.rtol}, atol {args.atol})"
    )
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="per-step latency of exported policies, here or on a target device (batch 1)",
        description="Time OnnxPolicy.act at batch 1 for each .onnx file, and each C export's "
        "policy_step inside C (bench.c, built with gcc), side by side, with ONNX Runtime's "
        "identity-graph floor and optionally the torch policy of a run. With --target, "
        "--ssh or --runner: C exports cross-built for the target, checked against this "
        "machine's build, and timed on the device (aarch64 without a device: under "
        "qemu-aarch64, tagged emulated); --target cortex-m4: on QEMU's mps2-an386 board "
        "(flash, RAM, stack, instructions per step).",
    )
    p.add_argument("models", nargs="+", help=".onnx files or C export directories")
    p.add_argument("--steps", type=int, default=5000, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--provider", default="CPUExecutionProvider")
    p.add_argument(
        "--native",
        action="store_true",
        help="build the C exports with -march=native (this machine's CPU only; the default "
        "build is portable)",
    )
    p.add_argument(
        "--target",
        choices=("native", "aarch64", "cortex-m4"),
        help="build for and time on this target (C exports only; default: this machine)",
    )
    p.add_argument("--ssh", metavar="USER@HOST", help="run on this device over ssh")
    p.add_argument("--ssh-config", metavar="FILE", help="ssh -F FILE (port, key, host key file)")
    p.add_argument(
        "--runner",
        metavar="CMD",
        help="run on the device through CMD, which runs its last argument as a shell command "
        'there (e.g. "adb shell")',
    )
    p.add_argument(
        "--cpu", help="tune the target build for this core (-mcpu/-march), e.g. cortex-a72"
    )
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument(
        "--run", type=Path, metavar="DIR", help="add torch rows for this run (eager, frozen)"
    )
    p.add_argument(
        "--out-dir", type=Path, help="write latency.md, latency.json, latency_hist.png here"
    )
    p.set_defaults(handler=_bench)


def _bench(args) -> int:
    from compressm_rl.latency import BenchOptions, bench

    keys = BenchOptions.__dataclass_fields__
    print(bench(args.models, BenchOptions(**{k: getattr(args, k) for k in keys})))
    return 0


def _add_loop(sub) -> None:
    p = sub.add_parser(
        "loop",
        help="drive MuJoCo's C library with a C export on a real-time schedule, no Python",
        description="Generate and build one C program that links MuJoCo's own library with "
        "the export's policy.c, starts each episode where `compressm-rl eval --seed S` starts "
        "it, forms observations, rewards and terminations as Gymnasium's v5 task does, and "
        "steps policy and physics on absolute deadlines (SCHED_FIFO and mlockall where "
        "permitted). Reports the returns and the timing of the policy step and of the whole "
        "control step (p50/p99/p99.9/max, deadline misses).",
    )
    p.add_argument("export", type=Path, help="C export directory (compressm-rl export --format c)")
    p.add_argument("--env", help="task (default: the export's own)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--rate", type=float, help="control rate in Hz (default: as fast as possible)")
    p.add_argument(
        "--spin-us",
        type=float,
        default=0.0,
        help="with --rate, busy-wait the last this many µs before each step instead of "
        "sleeping (steadier wake-ups for that share of a core; e.g. 100 at 1000 Hz)",
    )
    p.add_argument("--seed", type=int, default=10_000, help="episode k starts as eval's seed+k")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the result as JSON")
    p.set_defaults(handler=_loop)


def _loop(args) -> int:
    from compressm_rl.control_loop import format_loop_report, run_loop
    from compressm_rl.runs.files import atomic_write_text

    result = run_loop(
        args.export, args.episodes, args.seed, args.rate, args.env, spin_us=args.spin_us
    )
    print(format_loop_report(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


# ----- entry point ----------------------------------------------------------------------
def build_parser(with_settings: bool = True) -> argparse.ArgumentParser:
    """The command line; ``with_settings`` False leaves out `train`'s run settings (which
    load torch), for a fast ``--help`` of the other commands."""
    parser = argparse.ArgumentParser(
        prog="compressm-rl",
        description="Train SSM policies with recurrent PPO, compress them with balanced "
        "truncation, export them to ONNX and C, and time and run them on devices.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub, with_settings)
    for add in (_add_eval, _add_report, _add_compress, _add_export, _add_bench, _add_loop):
        add(sub)
    from compressm_rl.sweep.command import add_sweep  # light: its handler imports optuna

    add_sweep(sub, with_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    # One BLAS thread: the float64 reductions are small; on 2 cores more threads ran 20x slower.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(with_settings=command in ("train", "sweep"))
    args = parser.parse_args(argv)
    args.argv = argv  # for `train --nproc`
    if args.command is None:
        parser.print_help()
        return 0
    from compressm_rl.rl.distributed import NonFiniteWeights, PeerStopped
    from compressm_rl.stopping import TrainingStopped
    from export.c_build import ToolchainError

    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank of torchrun's: it dies with the job
        from compressm_rl.rl.process import die_with_parent

        die_with_parent()
    try:
        return args.handler(args)
    except (ValueError, OSError) as err:  # bad input, missing file, run directory busy
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:  # SIGINT / SIGTERM: the last iteration is saved
        if int(os.environ.get("RANK", "0")) == 0:  # one line for a data-parallel job
            print(stopped, file=sys.stderr)
        return stopped.exit_status
    except ToolchainError as err:  # a C export that does not build (one line naming it)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PeerStopped:  # a rank other than 0 whose peer left: that one said why
        return 1
    except NonFiniteWeights as err:  # training diverged: the last checkpoint is before it
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        print("stopped at once (Ctrl-C); files on disk are as last written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
