"""What a sweep trains: its settings (``SweepSpec``, stored in the study so that every
worker runs the same sweep), its trials' parameters, their run directories and configs.

A trial is one policy, named by its parameters: ``kind`` (``full``, ``compressed``,
``small``, ``posthoc``, ``mlp``; ``tuned`` in a tune), its target (``budget``: complex
states per part, or ``tol``: the fraction of each layer's Hankel singular value sum to
drop; 0 / none for ``full``), the search's recipe settings or the tune's PPO settings
where it samples them, and ``seed``. Its run directory is
``OUT/trials/<kind>-b<budget>[-<setting><value>...]-s<seed>``, so that a retried trial,
or a duplicate of one, finds the run it left.

The small-from-scratch and post-training policies of a target take the compressed run's
final actor sizes, layer by layer: the three are compared at one architecture (what
``small`` shows is the price of training small, not of another split of the budget; how
``global`` allocation splits a budget depends on the trained policy, so no split chosen
before training would be the one compression ends with).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from compressm_rl.runs.config import MACHINE_SETTINGS, TrainConfig

TRIALS = "trials"
# mlp: the full run's settings with a feed-forward policy, the size's lower end (no
# state at all): whether the task needs memory.
GRID_KINDS = ("full", "compressed", "small", "posthoc", "mlp")
KINDS = (*GRID_KINDS, "tuned")  # tuned: a full run with the PPO settings a tune picked
METHODS = GRID_KINDS[1:]  # what a grid compares with the full policy
DEFAULT_METHODS = ("compressed", "small", "posthoc")
OBJECTIVES = ("states", "latency")
# The search's optional dimensions besides the budget (``tol`` replaces it: compress by
# energy, the size an outcome).
SEARCH_SPACE = {
    "tol": (0.01, 0.5),  # log-uniform, rounded to 3 significant digits
    "gramian": ("white", "data"),
    "heal_steps": (0, 25, 50, 100),
}
# What a tune varies: PPO settings (``compressm-rl train``'s names), after RL Zoo's PPO
# search space, cut to this trainer's settings. lr is log-uniform (3 significant digits);
# the others are choices, kept to those valid for the sweep's config (``tune_choices``).
TUNE_SPACE = {
    "lr": (1e-5, 2e-3),
    "init_log_std": (-2.0, -1.5, -1.0, -0.5, 0.0),
    "minibatches": (2, 4, 8, 16, 32),
    "epochs": (5, 10, 20),
    "gamma": (0.98, 0.99, 0.995, 0.999),
    "gae_lambda": (0.9, 0.95, 0.98, 1.0),
    "clip_coef": (0.1, 0.2, 0.3),
    "ent_coef": (0.0, 1e-4, 1e-3, 1e-2),
    "vf_coef": (0.25, 0.5, 1.0),
    "max_grad_norm": (0.5, 1.0, 2.0),
}
# Wide bounds for the grid's parameters: Optuna requires one distribution per name in a
# study, so a grid extended later (more seeds, other budgets) keeps them.
SEED_MAX = 2**31 - 1
BUDGET_MAX = 4096 * 64
# The parameters that name a compressed run's target (one of them: in its run directory's
# name, and in its config).
TARGET_KEYS = ("budget", "tol")


@dataclass
class SweepSpec:
    """A sweep's settings, the same for every worker (``differences``).

    ``config`` is the full policy's ``TrainConfig`` as a mapping (compression off);
    ``recipe`` the in-training compression settings of the compressed runs, without
    their target (``budget`` or ``tol``, from ``budgets`` / ``tols`` or the search)."""

    env_id: str
    config: dict
    recipe: dict
    mode: str = "grid"  # or "search", "tune"
    budgets: list[int] = field(default_factory=list)
    tols: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    trials: int = 0  # the search's (or the tune's) trial count
    objective: str = "states"
    search_space: list[str] = field(default_factory=list)
    eval_episodes: int = 30
    parity_steps: int = 500
    bench_steps: int = 5000

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SweepSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def extended_by(self, other: SweepSpec) -> bool:
        """Whether ``other`` is this grid with more points: the same settings, and budgets,
        tols, seeds and methods that include this one's (the trials' ``kind`` choices kept:
        an MLP reference cannot join a study made without it)."""
        grown = ("budgets", "tols", "seeds", "methods")
        return (
            self.mode == other.mode == "grid"
            and set(self.differences(other)) <= set(grown)
            and all(set(getattr(self, k)) <= set(getattr(other, k)) for k in grown)
            and kind_choices(self) == kind_choices(other)
        )

    def differences(self, other: SweepSpec) -> list[str]:
        """The settings in which ``other`` differs from this sweep, by name; the
        machine's settings (device, physics threads) may differ between workers."""
        mine, theirs = self.to_dict(), other.to_dict()
        for spec in (mine, theirs):
            for name in MACHINE_SETTINGS:
                spec["config"].pop(name, None)
        names = [k for k in mine if k not in ("config",) and mine[k] != theirs[k]]
        names += [
            f"config.{k}" for k in mine["config"] if mine["config"][k] != theirs["config"].get(k)
        ]
        return names


def run_name(params: dict) -> str:
    """The run directory's name of a trial's parameters, e.g. ``compressed-b16-s0``,
    ``full-b0-s1``, ``compressed-t0.15-gramiandata-s2``."""
    target = f"t{params['tol']:g}" if params.get("tol") else f"b{params.get('budget', 0)}"
    extra = "".join(
        f"-{key.replace('_', '')}{params[key]}"
        for key in sorted(params)
        if key not in ("kind", "seed", *TARGET_KEYS)
    )
    return f"{params['kind']}-{target}{extra}-s{params['seed']}"


def run_dir(out: Path, params: dict) -> Path:
    return Path(out) / TRIALS / run_name(params)


def with_kind(params: dict, kind: str) -> dict:
    """The parameters of the trial of another ``kind`` at the same target and seed (the
    full run has no target)."""
    if kind == "full":
        return {"kind": "full", "seed": params["seed"], "budget": 0}
    return {**params, "kind": kind}


def kind_choices(spec: SweepSpec) -> tuple[str, ...]:
    """The choices of the trials' ``kind`` parameter. Optuna fixes a categorical's choices
    for a study's life, and sweeps without the MLP reference hold the first four."""
    return GRID_KINDS if "mlp" in spec.methods else GRID_KINDS[:4]


def full_config(spec: SweepSpec, seed: int) -> TrainConfig:
    """The full policy's config at ``seed`` (compression off)."""
    return TrainConfig.from_dict({**spec.config, "seed": seed, "compression": {}})


def mlp_config(spec: SweepSpec, seed: int) -> TrainConfig:
    """The MLP reference's config at ``seed``: the full run's, with an MLP policy."""
    return TrainConfig.from_dict({**spec.config, "seed": seed, "compression": {}, "policy": "mlp"})


def tuned_config(spec: SweepSpec, params: dict) -> TrainConfig:
    """A tune's run: the full policy's config with the PPO settings in ``params``."""
    ppo = {**spec.config["ppo"], **{k: v for k, v in params.items() if k in TUNE_SPACE}}
    data = {**spec.config, "seed": params["seed"], "compression": {}, "ppo": ppo}
    return TrainConfig.from_dict(data)


def tune_choices(spec: SweepSpec, key: str) -> tuple:
    """The values of ``TUNE_SPACE[key]`` the sweep's config accepts (e.g. minibatch counts
    that divide its sequences), the same on every worker; a ``ValueError`` if none is."""
    valid = []
    for value in TUNE_SPACE[key]:
        try:
            tuned_config(spec, {"seed": spec.seeds[0], key: value})
            valid.append(value)
        except ValueError:
            continue
    if not valid:
        raise ValueError(
            f"--search-space {key}: none of {TUNE_SPACE[key]} is valid with this sweep's "
            "settings; leave it out"
        )
    return tuple(valid)


def compressed_config(spec: SweepSpec, params: dict) -> TrainConfig:
    """The in-training compressed run of ``params``: the recipe, its target and the
    searched settings."""
    compression = dict(spec.recipe)
    for key, value in params.items():
        if key in TARGET_KEYS:
            compression[key] = value or None  # budget 0: the full run's, no target
        elif key in SEARCH_SPACE:
            compression[key] = value
    if compression.get("tol") is not None:
        compression["tol"] = round_sampled(compression["tol"])
    data = {**spec.config, "seed": params["seed"], "compression": compression}
    return TrainConfig.from_dict(data)


def small_config(spec: SweepSpec, params: dict, actor_dims: list[int]) -> TrainConfig:
    """The small-from-scratch run: the full policy's settings at the compressed run's
    final actor sizes ``actor_dims``; the critic too, unless the recipe compresses the
    actor alone (the critic then keeps its full size, as in the compressed run)."""
    full = full_config(spec, params["seed"])
    data = full.to_dict()
    data["state_dims"] = list(actor_dims)
    if "critic" not in spec.recipe["parts"]:
        data["critic_state_dims"] = full.initial_critic_state_dims
    return TrainConfig.from_dict(data)


def round_sampled(value: float) -> float:
    """A sampled float setting (``tol``, ``lr``) to 3 significant digits: its run
    directory's name and its config then agree."""
    return float(f"{value:.3g}")


def grid_points(spec: SweepSpec) -> list[dict]:
    """The grid's trials' parameters, in the order workers take them: per seed its full
    run and its compressed runs (with two workers and one target, a seed's full and
    compressed runs start side by side: their wall-clocks compare under one load), then
    the small and post-training runs, which depend on them, then the MLP references. A
    search queues none: its sampler makes its trials."""
    if spec.mode != "grid":
        return []
    targets = [{"budget": b} for b in spec.budgets] + [{"tol": t} for t in spec.tols]
    points = []
    for seed in spec.seeds:
        points.append({"kind": "full", "seed": seed, "budget": 0})
        points += [{"kind": "compressed", **t, "seed": seed} for t in targets]
    for kind in ("small", "posthoc"):
        if kind in spec.methods:
            points += [{"kind": kind, **t, "seed": s} for t in targets for s in spec.seeds]
    if "mlp" in spec.methods:
        points += [{"kind": "mlp", "seed": s, "budget": 0} for s in spec.seeds]
    return points


def reference_points(spec: SweepSpec) -> list[dict]:
    """A search's full reference runs, one per seed."""
    return [{"kind": "full", "seed": s, "budget": 0} for s in spec.seeds]


def check_spec(spec: SweepSpec) -> None:
    """Build every config the sweep will train (the small runs' sizes aside, known only
    once their compressed run ends), so that a bad setting is a ``ValueError`` naming it
    before anything runs."""
    if not spec.methods or not set(spec.methods) <= set(METHODS):
        raise ValueError(
            f"--methods {','.join(spec.methods)} is out of range: some of {','.join(METHODS)} "
            "(the compressed runs are always trained: the others depend on them)"
        )
    if not spec.seeds or min(spec.seeds) < 0 or len(set(spec.seeds)) != len(spec.seeds):
        raise ValueError(
            f"--seeds {','.join(map(str, spec.seeds))} is out of range: distinct seeds, 0 or more"
        )
    for name, low in (("eval_episodes", 1), ("parity_steps", 0), ("bench_steps", 1)):
        if getattr(spec, name) < low:
            flag = f"--{name.replace('_', '-')}"
            raise ValueError(f"{flag} {getattr(spec, name)} is out of range: at least {low}")
    full_config(spec, spec.seeds[0])
    if spec.mode == "tune":
        for key in spec.search_space:
            tune_choices(spec, key)
        return
    if "mlp" in spec.methods:
        mlp_config(spec, spec.seeds[0])
    for point in _points_to_check(spec):
        compressed_config(spec, {**point, "seed": spec.seeds[0]})


def _points_to_check(spec: SweepSpec) -> list[dict]:
    """One compressed trial per target of the grid; the search's extreme budgets, with
    every searched setting at its most demanding value."""
    if spec.mode == "grid":
        return [{"budget": b} for b in spec.budgets] + [{"tol": t} for t in spec.tols]
    extra = {k: SEARCH_SPACE[k][-1] for k in spec.search_space if k != "tol"}
    if "tol" in spec.search_space:
        return [{"tol": t, **extra} for t in SEARCH_SPACE["tol"]]
    return [{"budget": b, **extra} for b in (min(spec.budgets), max(spec.budgets))]
