"""``compressm-rl sweep``: the command line of a sweep worker (``add_sweep``) and its
handler (``sweep``). Heavy imports (torch, optuna) happen in the handler, so that
``compressm-rl --help`` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path

from compressm_rl.settings import float_list, int_list

DESCRIPTION = (
    "Decide how far to compress: train, evaluate, export to C and time many policies of one "
    "task, and report return against state size and against the C step's latency "
    "(OUT/pareto.md, OUT/pareto.png). Grid (default): per budget (--budgets) or energy "
    "fraction (--tols) and seed, the policy compressed in training (with the compression "
    "settings below, train's defaults), one trained small from scratch at its final sizes, "
    "and the full run truncated after training to them; and per seed the full run as the "
    "reference. --search N: N compressed runs chosen by NSGA-II, maximising the "
    "deterministic return and minimising the states (or --objective latency). --tune N: "
    "N uncompressed runs whose PPO settings (--search-space) Optuna's TPE sampler picks, "
    "maximising the deterministic return (RL Zoo's way to tune a preset). Each run "
    "lives in OUT/trials/KIND-bBUDGET-sSEED. Trials are shared through an Optuna study: "
    "start this same command in as many processes as there are cores, here or on other "
    "machines (with --storage a database or journal file all of them reach, and OUT on a "
    "shared file system); a joining worker may give --out, --storage and --study alone. A "
    "worker killed mid-trial is detected by its missing heartbeat and its trial is retried "
    "by another worker, which resumes the run from its checkpoint. Every run setting below "
    "is a TrainConfig field, as in `compressm-rl train`."
)


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_sweep(sub, with_settings: bool = True) -> None:
    """Declare ``compressm-rl sweep``; ``with_settings`` adds every run setting's flag
    (from the settings dataclasses, exactly as `train` has them)."""
    p = sub.add_parser(
        "sweep",
        help="compress to many sizes over seeds, shared by workers (Optuna)",
        description=DESCRIPTION,
    )
    p.add_argument("--env", help="Gymnasium id; needed to start a sweep, not to join one")
    p.add_argument("--out", type=Path, required=True, help="the sweep's directory")
    p.add_argument("--config", type=Path, help="YAML with TrainConfig keys (flags win)")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage: a SQLAlchemy URL (sqlite:///F.db, postgresql://...) or a "
        "journal file (journal:PATH or PATH.log) (default sqlite:///OUT/study.db)",
    )
    p.add_argument("--study", help="study name (default: OUT's name)")
    _add_plan_flags(p.add_argument_group("what the sweep runs (kept in the study)"))
    p.add_argument(
        "--heartbeat",
        type=int,
        default=30,
        metavar="S",
        help="seconds between a running trial's heartbeats; a trial silent 4 times as long "
        "is failed and retried",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="write OUT/pareto.md and pareto.png (a tune: tune.md, tune.png) from the study "
        "and exit",
    )
    p.set_defaults(handler=sweep, command_parser=p)
    if not with_settings:  # `compressm-rl --help` and other commands: no torch to load
        return
    from compressm_rl.runs.config import add_run_flags

    add_run_flags(p, "in-training compression (the recipe)")


def _add_plan_flags(group) -> None:
    """The grid's or the search's flags, and how each policy is measured."""
    group.add_argument(
        "--budgets",
        type=int_list,
        help="grid: complex states per part to compress to (default 8,16,32,64); search: "
        "the ends of the budget's range",
    )
    group.add_argument(
        "--tols",
        type=float_list,
        help="grid: compress by energy to these fractions of the HSV sum instead (or besides)",
    )
    group.add_argument("--seeds", type=int_list, help="seeds of every method (default 0,1,2)")
    group.add_argument(
        "--methods",
        type=_names,
        help="what the grid compares with the full runs: some of compressed, small, posthoc "
        "and mlp (an MLP policy with the full run's settings: does the task need memory?) "
        "(default compressed,small,posthoc)",
    )
    group.add_argument(
        "--search",
        type=int,
        metavar="N",
        help="multi-objective search of N compressed runs (NSGA-II) instead of the grid",
    )
    group.add_argument(
        "--tune",
        type=int,
        metavar="N",
        help="tune the uncompressed policy's PPO settings instead: N runs whose "
        "--search-space settings (some of lr, init_log_std, minibatches, epochs, gamma, "
        "gae_lambda, clip_coef, ent_coef, vf_coef, max_grad_norm) Optuna's TPE sampler picks",
    )
    group.add_argument(
        "--objective",
        choices=("states", "latency"),
        help="what the search minimises besides maximising the return (default states)",
    )
    group.add_argument(
        "--search-space",
        type=_names,
        metavar="NAMES",
        help="what the search varies besides the budget: some of tol (instead of the "
        "budget), gramian, heal_steps; what a tune varies (see --tune)",
    )
    group.add_argument("--eval-episodes", type=int, help="deterministic episodes (default 30)")
    group.add_argument(
        "--parity-steps", type=int, help="closed-loop steps checking each C export (default 500)"
    )
    group.add_argument("--bench-steps", type=int, help="timed C steps per policy (default 5000)")


# The sweep's own settings (stored in the study); a joining worker leaves them out.
SPEC_FLAGS = ("budgets", "tols", "seeds", "methods", "search", "tune", "objective")
SPEC_FLAGS += ("search_space",)
SPEC_FLAGS += ("eval_episodes", "parity_steps", "bench_steps", "config")


def spec_from_args(args):
    """The ``SweepSpec`` of a worker's flags, every setting checked (``ValueError``)."""
    from dataclasses import asdict

    from compressm_rl.runs.config import config_from_flags
    from compressm_rl.sweep.plan import SweepSpec, check_spec, round_sampled

    for flag, instead in (("compress_to", "--budgets"), ("compress_tol", "--tols")):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is {instead} in a sweep: give that")
    mode, space = _mode(args)
    if mode == "tune":
        budgets = []
    else:
        budgets = args.budgets or ([] if args.tols and mode == "grid" else [8, 16, 32, 64])
    # The recipe checked with a target in it (some settings need one, e.g. uniform allocation).
    args.compress_to, args.compress_tol = (
        (budgets[0], None) if budgets else (None, args.tols[0] if args.tols else None)
    )
    config = config_from_flags(args)
    recipe = {k: v for k, v in asdict(config.compression).items() if k not in ("budget", "tol")}
    data = config.to_dict()
    data["compression"] = {}
    spec = SweepSpec(
        env_id=args.env,
        config=data,
        recipe=recipe,
        mode=mode,
        budgets=budgets,
        # Rounded as a searched tol is: the run directory's name and its config agree.
        tols=[round_sampled(tol) for tol in args.tols or []],
    )
    for name in ("seeds", "methods", "objective", "eval_episodes", "parity_steps", "bench_steps"):
        if getattr(args, name) is not None:
            setattr(spec, name, getattr(args, name))
    spec.trials, spec.search_space = args.search or args.tune or 0, space
    check_spec(spec)
    return spec


def _mode(args) -> tuple[str, list[str]]:
    """The sweep's mode (grid, search, tune) and what it varies, its flags checked."""
    from compressm_rl.sweep.plan import SEARCH_SPACE, TUNE_SPACE

    space = args.search_space or []
    if args.search is not None and args.tune is not None:
        raise ValueError("--search and --tune are two kinds of sweep: give one")
    if args.tune is not None:
        unknown = sorted(set(space) - set(TUNE_SPACE))
        if args.tune < 1 or not space or unknown:
            raise ValueError(
                f"--tune {args.tune} --search-space {','.join(space)} is out of range: at least "
                f"1 trial, over some of {', '.join(TUNE_SPACE)}"
            )
        given = [f for f in ("budgets", "tols", "methods", "objective") if getattr(args, f)]
        if given:
            raise ValueError(f"--{given[0]} is not a tune's: a tune trains uncompressed runs")
        return "tune", space
    if args.search is not None:
        unknown = sorted(set(space) - set(SEARCH_SPACE))
        if args.search < 1 or unknown:
            raise ValueError(
                f"--search {args.search} --search-space {','.join(space)} is out of range: at "
                f"least 1 trial, over the budget and some of {','.join(SEARCH_SPACE)}"
            )
        if args.tols:
            raise ValueError("--tols is the grid's: a search varies tol with --search-space tol")
        return "search", space
    if space or args.objective:
        raise ValueError("--search-space and --objective apply to --search N or --tune N only")
    return "grid", space


def sweep(args: argparse.Namespace) -> int:
    """Join (or start) the sweep, run trials until none is left, write the report."""
    import optuna

    from compressm_rl.device import resolve_device
    from compressm_rl.sweep import study as studies
    from compressm_rl.sweep.report import write_report
    from compressm_rl.sweep.worker import Queue, run_worker, say

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the worker's own lines instead
    name = args.study or args.out.resolve().name
    given = [f"--{f.replace('_', '-')}" for f in SPEC_FLAGS if getattr(args, f, None) is not None]
    if args.env is None and given and not args.report:
        raise ValueError(
            f"{', '.join(given)} set a sweep's settings: give --env too to start one, or "
            "leave them out to join one"
        )
    if args.heartbeat < 1:
        raise ValueError(f"--heartbeat {args.heartbeat} is out of range: at least 1 second")
    spec = spec_from_args(args) if args.env and not args.report else None
    if spec is not None:
        resolve_device(spec.config["device"])  # before anything is written
    url = studies.storage_url(args.storage, args.out)
    if args.storage is None and args.report and not (args.out / studies.DEFAULT_DB).exists():
        raise ValueError(
            f"{args.out} holds no sweep ({studies.DEFAULT_DB}): give its --out, or --storage"
        )
    if args.storage is None:  # its database lives in the sweep's directory
        args.out.mkdir(parents=True, exist_ok=True)
    storage = studies.open_storage(url, None if args.report else args.heartbeat, args.out)
    if args.report:
        spec, found = studies.sweep_studies(storage, name)
        path = write_report(args.out, name, spec, found)
        print(f"report written to {path} and {path.with_suffix('.png')}")
        return 0
    queues, spec = studies.join_sweep(storage, name, spec)
    held = studies.describe([study for study, _ in queues])
    say(f"joined study {name!r} at {studies.shown_url(url)}: {held}")
    count = run_worker(
        spec, args.out, [Queue(study, search) for study, search in queues], args.heartbeat
    )
    path = write_report(args.out, name, spec, [study for study, _ in queues])
    say(f"no trials left ({count} run here); report written to {path}")
    return 0
