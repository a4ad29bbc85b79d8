"""``TrainConfig``: everything a training run depends on, typed and checked when built.

Saved as ``config.yaml`` in the run directory with every PPO and compression setting
resolved (the task preset, then the run's overrides), so a run can be read and
reproduced without knowing which defaults were in force when it started.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from compressm_rl.compression import CompressionConfig
from compressm_rl.device import DEVICES
from compressm_rl.rl.config import PPOConfig, preset_for
from compressm_rl.runs.files import atomic_write_text
from compressm_rl.settings import add_flags, check_types, setting
from envs import check_env_id, parse_dynamics

CONFIG = "config.yaml"
POLICY_TYPES = ("ssm", "mlp")
MAX_SIZE = 4096  # states or features per layer
MAX_LAYERS = 64
# Settings of the machine, not of the run: a resume may change them (``--resume`` with
# ``--device`` or ``--physics-threads``); the results are the same either way.
MACHINE_SETTINGS = ("device", "physics_threads")


@dataclass
class TrainConfig:
    """A training run's settings. Build from a mapping with ``from_dict`` (YAML, CLI),
    which applies the run's PPO overrides on top of the task preset.

    Every value is checked here, before anything is created: a bad one raises a
    ``ValueError`` naming the field, the value and the valid range.
    """

    env_id: str
    seed: int = setting(0, "seeds the policy, the envs and the action noise", flag="--seed")
    # Kept as written (config.yaml shows what was asked); parsed by envs.parse_dynamics.
    dynamics: str = setting(
        "none",
        "randomized dynamics, drawn per episode: a preset (none: the plain task, mild, wide) "
        "and/or ranges, e.g. mass=0.7:1.3,friction=0.5:1.5,gain=0.9:1.1,delay=0:2,"
        "obs_noise=0:0.01",
        flag="--dynamics",
    )
    policy: str = setting(
        "ssm", "ssm (stacked LRU layers) or mlp", flag="--policy", choices=("ssm", "mlp")
    )
    state_dim: int = setting(128, "n, complex states per LRU layer", flag="--state-dim")
    state_dims: list[int] | None = setting(
        None, "n per layer, e.g. 32,24 (overrides state_dim and layers)", flag="--state-dims"
    )
    # E.g. a small deployed actor beside a full-size critic, which is not deployed.
    critic_state_dims: list[int] | None = setting(
        None,
        "the critic's n per layer where it differs from the actor's",
        flag="--critic-state-dims",
    )
    width: int = setting(64, "H, features per layer", flag="--width")
    layers: int = setting(2, "LRU (or MLP) layers", flag="--layers")
    num_workers: int = setting(
        0, "envs in this many subprocesses (AsyncVectorEnv; 0: in-process)", flag="--num-workers"
    )
    # Bit-identical results: a setting of the machine like torch_threads (envs/physics.py).
    physics_threads: int = setting(
        1,
        "threads for the MuJoCo step of in-process locomotion envs: pays where the process "
        "has that many cores to itself (bit-identical)",
        flag="--physics-threads",
    )
    torch_threads: int = setting(1, "torch threads of the training process")
    # A setting of the machine, not of the run: resuming may change it (compressm_rl/device.py).
    device: str = setting(
        "auto",
        "where the update runs (the rollout steps on the CPU); auto: cuda when available",
        flag="--device",
        choices=DEVICES,
    )
    checkpoint_every: int = setting(10, "PPO iterations between checkpoints")
    ppo: PPOConfig | None = setting(None, "PPO settings: the task's preset, these on top")
    compression: CompressionConfig = setting(
        CompressionConfig(), "in-training compression (off unless tol or budget is set)"
    )

    def __post_init__(self) -> None:
        check_types(self, "")
        check_env_id(self.env_id)
        parse_dynamics(self.dynamics)  # a one-line error naming the bad part
        if self.ppo is None:
            self.ppo = preset_for(self.env_id)
        for name, kind in (("ppo", PPOConfig), ("compression", CompressionConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(
                    f"{name} must be a {kind.__name__}; build a config from a mapping of "
                    f"settings with TrainConfig.from_dict"
                )
        # Upper bounds keep a typo from allocating a policy the machine cannot hold.
        checks = {
            "seed": (self.seed >= 0, "0 or more"),
            "policy": (self.policy in POLICY_TYPES, f"one of {', '.join(POLICY_TYPES)}"),
            "state_dim": (1 <= self.state_dim <= MAX_SIZE, f"1 to {MAX_SIZE}"),
            "state_dims": (
                _layer_sizes_ok(self.state_dims),
                f"None or 1 to {MAX_LAYERS} sizes, each 1 to {MAX_SIZE}",
            ),
            "critic_state_dims": (
                _layer_sizes_ok(self.critic_state_dims),
                f"None (the actor's) or 1 to {MAX_LAYERS} sizes, each 1 to {MAX_SIZE}",
            ),
            "width": (1 <= self.width <= MAX_SIZE, f"1 to {MAX_SIZE}"),
            "layers": (1 <= self.layers <= MAX_LAYERS, f"1 to {MAX_LAYERS}"),
            "num_workers": (0 <= self.num_workers <= 256, "0 (envs in this process) to 256"),
            "physics_threads": (1 <= self.physics_threads <= 64, "1 to 64"),
            "torch_threads": (1 <= self.torch_threads <= 1024, "1 to 1024"),
            "device": (self.device in DEVICES, f"one of {', '.join(DEVICES)}"),
            "checkpoint_every": (self.checkpoint_every >= 1, "at least 1 iteration"),
        }
        for name, (ok, valid) in checks.items():
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r} is out of range: {valid}")
        if self.compression.enabled and self.policy != "ssm":
            raise ValueError(
                "compression is set (tol or budget) but policy = 'mlp' has no recurrent state to "
                "compress; use policy 'ssm' or drop the compression settings"
            )
        if self.compression.lr_scale != 1.0 and self.ppo.desired_kl is not None:
            raise ValueError(
                f"compression lr_scale = {self.compression.lr_scale} scales the lr after a cut, "
                f"but ppo desired_kl = {self.ppo.desired_kl} adapts it to the KL already; "
                "drop one of them"
            )
        if self.num_workers > 0 and self.physics_threads > 1:
            raise ValueError(
                f"physics_threads = {self.physics_threads} steps envs in this process, but "
                f"num_workers = {self.num_workers} puts them in subprocesses; set one of them"
            )
        if self.policy != "ssm" and (self.state_dims or self.critic_state_dims):
            raise ValueError(
                f"state_dims / critic_state_dims are set but policy = {self.policy!r} has no "
                "recurrent state; use policy 'ssm' or drop them"
            )
        if self.compression.enabled and self.compression.min_state > max(self.initial_state_dims):
            raise ValueError(
                f"compression min_state = {self.compression.min_state} is out of range: at "
                f"most the largest layer's n = {max(self.initial_state_dims)} "
                f"(state_dim / state_dims)"
            )
        budget = self.compression.budget
        for part in self.compression.parts if self.compression.enabled and budget else ():
            dims = self.initial_critic_state_dims if part == "critic" else self.initial_state_dims
            floor = len(dims) * self.compression.min_state
            if not floor <= budget < sum(dims):
                raise ValueError(
                    f"compression budget = {budget} is out of range: complex states per part "
                    f"over its {len(dims)} layers, at least {len(dims)} × min_state = {floor} "
                    f"and below the {part}'s initial {sum(dims)} (state_dim / state_dims)"
                )

    @property
    def initial_state_dims(self) -> list[int]:
        """n per LRU layer when training starts."""
        return list(self.state_dims) if self.state_dims else [self.state_dim] * self.layers

    @property
    def initial_critic_state_dims(self) -> list[int]:
        """The critic's n per LRU layer when training starts."""
        return list(self.critic_state_dims or self.initial_state_dims)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """From a mapping of settings: ``ppo`` holds overrides of the task's preset,
        ``compression`` of ``CompressionConfig``'s defaults; a top-level ``total_steps``
        is the ``ppo`` one (what ``--total-steps`` sets)."""
        data = dict(data)
        known = {f.name for f in fields(cls)} | {"total_steps"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
        if "env_id" not in data:
            raise ValueError("config needs env_id (the Gymnasium task id, e.g. Hopper-v5)")
        for key in ("ppo", "compression"):
            if not isinstance(data.get(key) or {}, dict):
                raise ValueError(f"config key {key!r} must be a mapping of settings")
        ppo = dict(data.pop("ppo", None) or {})
        if data.get("total_steps") is not None:
            ppo["total_steps"] = data["total_steps"]
        data.pop("total_steps", None)
        check_env_id(data["env_id"])  # before the preset lookup: the clear message first
        data["ppo"] = preset_for(data["env_id"]).with_overrides(**ppo)
        data["compression"] = CompressionConfig.from_dict(data.pop("compression", None) or {})
        return cls(**data)


def _layer_sizes_ok(dims: list[int] | None) -> bool:
    """None, or 1 to MAX_LAYERS per-layer sizes, each 1 to MAX_SIZE."""
    return dims is None or (0 < len(dims) <= MAX_LAYERS and all(1 <= n <= MAX_SIZE for n in dims))


def save_config(run_dir: Path, config: TrainConfig) -> None:
    atomic_write_text(Path(run_dir) / CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))


def trained_with(run_dir: Path, config: TrainConfig) -> bool:
    """Whether the run in ``run_dir`` was trained with ``config``, the machine's settings
    (``MACHINE_SETTINGS``) aside."""
    machine = {name: getattr(config, name) for name in MACHINE_SETTINGS}
    return replace(load_config(run_dir), **machine) == config


def load_config(run_dir: Path) -> TrainConfig:
    """The ``config.yaml`` of a run directory; clear errors if missing or malformed."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a compressm-rl run directory?")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return TrainConfig.from_dict(data)


def check_replaceable(out: Path, overwrite: bool) -> None:
    """The rule for writing a new run into ``out`` (``train --out``, ``compress --out``):
    a directory without ``config.yaml`` takes a new run; one with a run of this tool is
    replaced only with ``overwrite`` (and then only the files this tool wrote:
    ``runs.files.clear_run_dir``); one whose ``config.yaml`` is not a run's is never
    touched. Raises ValueError naming the case and the way out; writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory: choose another --out")
    if not (out / CONFIG).exists():
        return
    if not overwrite:
        raise ValueError(
            f"{out} already holds a run; pass --resume {out} to continue it or --overwrite "
            "to replace it"
        )
    try:
        load_config(out)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{out} holds a {CONFIG} that is not a compressm-rl run's ({err}); --overwrite "
            "replaces only a run of this tool: choose another --out"
        ) from None


def config_from_flags(args) -> TrainConfig:
    """The ``TrainConfig`` of ``compressm-rl train``'s parsed flags (``args.env``,
    ``args.config`` and every setting's flag) over its ``--config`` file, checked."""
    from compressm_rl.settings import given_flags

    data: dict = {}
    if args.config:
        try:
            data = yaml.safe_load(args.config.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{args.config} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{args.config} must hold a mapping of TrainConfig keys")
    data.update(env_id=args.env, **given_flags(args, TrainConfig))
    for section, cls in (("ppo", PPOConfig), ("compression", CompressionConfig)):
        if not isinstance(data.get(section) or {}, dict):
            raise ValueError(f"{args.config}: {section} must be a mapping of settings")
        data[section] = {**(data.get(section) or {}), **given_flags(args, cls)}
    if "total_steps" in data:  # a top-level total_steps is the ppo one (TrainConfig.from_dict)
        data["ppo"].setdefault("total_steps", data.pop("total_steps"))
    return TrainConfig.from_dict(data)


def add_run_flags(parser, compression_title: str = "in-training compression") -> None:
    """Every run setting (``TrainConfig``, ``ppo``, ``compression``) as a flag of
    ``parser``, in three groups; how ``train`` and ``sweep`` take them alike."""
    add_flags(parser.add_argument_group("run"), TrainConfig)
    preset = {name: "the task preset" for name in ("total_steps", "num_envs")}
    add_flags(parser.add_argument_group("PPO (the rest: ppo keys in --config)"), PPOConfig, preset)
    add_flags(parser.add_argument_group(compression_title), CompressionConfig)
