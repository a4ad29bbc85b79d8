"""Run directories: config (YAML), metrics (CSV), atomic checkpoints, loading a policy.

A run directory holds::

    config.yaml        every setting of the run (TrainConfig), enough to rebuild it
    metrics.csv        one row per PPO iteration
    checkpoint.pt      latest checkpoint (policy, optimiser, normalisers, RNG, step)
    compression.json   reduction events (when compression is on)
    .lock              locked while a process trains here

Checkpoints are written to a temporary file in the same directory and renamed over the
old one, so a run killed mid-write keeps its previous checkpoint. They are loaded with
``torch.load(..., weights_only=True)``: plain tensors, numbers, strings, lists, dicts.
A second process that tries to train in a locked directory (say, a resume while the
first still runs) stops with an error instead of interleaving its writes.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from envs import preset_for
from envs.tasks import with_overrides
from policies.actor_critic import ActorCritic

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"
METRICS = "metrics.csv"
FORMAT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything a training run depends on. PPO settings default to the task preset."""

    env_id: str
    total_steps: int | None = None
    seed: int = 0
    policy: str = "ssm"
    state_dim: int = 128
    state_dims: list[int] | None = None  # per-layer n; overrides state_dim and layers
    width: int = 64
    layers: int = 2
    num_workers: int = 0
    torch_threads: int = 1
    checkpoint_every: int = 10  # PPO iterations
    ppo: dict = field(default_factory=dict)  # overrides of envs.TaskPreset fields
    compression: dict = field(default_factory=dict)  # see compressm_rl.compression

    def preset(self):
        """The task preset with this run's overrides (and total_steps) applied."""
        overrides = dict(self.ppo)
        if self.total_steps is not None:
            overrides["total_steps"] = self.total_steps
        return with_overrides(preset_for(self.env_id), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def save_config(run_dir: Path, config: TrainConfig) -> None:
    atomic_write_text(run_dir / CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(run_dir: Path) -> TrainConfig:
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


class RunDirectoryBusy(OSError):
    """Another process is training in this run directory."""


@contextmanager
def locked_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the ``with`` block (released when the block
    ends or the process dies: no stale locks). POSIX only: elsewhere nothing is locked."""
    with open(Path(run_dir) / ".lock", "w") as handle:
        try:
            import fcntl
        except ImportError:
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryBusy(
                f"another process is training in {run_dir}; wait for it or stop it first"
            ) from None
        yield


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_policy(arch: dict, action_low, action_high) -> ActorCritic:
    """Rebuild an ActorCritic from ``ActorCritic.architecture()`` output."""
    return ActorCritic(
        arch["obs_dim"],
        arch["act_dim"],
        action_low,
        action_high,
        policy=arch["policy"],
        width=arch["width"],
        state_dims=arch["actor_state_dims"] or [1],
        critic_state_dims=arch["critic_state_dims"] or None,
        mlp_layers=arch.get("mlp_layers") or 2,
    )


def rng_state() -> dict:
    """Torch and numpy global RNG states as tensors (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.as_tensor(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_gauss": [int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy_pos"], int(has_gauss), cached))


def save_checkpoint(run_dir: Path, payload: dict) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically."""
    payload = {"format_version": FORMAT_VERSION, **payload}
    path = Path(run_dir) / CHECKPOINT
    _atomic_write(path, lambda f: torch.save(payload, f))
    return path


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint file or a run directory's latest; clear errors if missing or corrupt."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the run has not saved one yet")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/garbled files
        raise ValueError(
            f"checkpoint {path} is corrupt or not a compressm-rl checkpoint ({type(err).__name__}: "
            f"{err}). Delete it to restart the run, or restore it from a copy."
        ) from err
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a compressm-rl checkpoint (format {FORMAT_VERSION})")
    return payload


def load_policy(run_dir: Path) -> tuple[ActorCritic, dict]:
    """The trained policy of a run directory, and its metadata (env_id, global_step, ...)."""
    payload = load_checkpoint(run_dir)
    policy = build_policy(payload["architecture"], payload["action_low"], payload["action_high"])
    policy.load_state_dict(payload["policy"])
    policy.eval()
    meta = {"env_id": payload["env_id"], "global_step": int(payload["global_step"])}
    return policy, meta


class MetricsLog:
    """Append-only CSV of per-iteration metrics (header written once)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            return list(csv.DictReader(f))

    def truncate_after(self, global_step: int) -> None:
        """Drop rows logged after the checkpoint a resumed run restarts from."""
        rows = [r for r in self.read() if int(r["global_step"]) <= global_step]
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        header = list(rows[0])
        lines = [",".join(header)] + [",".join(str(r[k]) for k in header) for r in rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
