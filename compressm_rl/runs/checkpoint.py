"""``checkpoint.pt``: the state of a training run. ``save_checkpoint`` and
``load_checkpoint`` are the one place that knows its layout.

Written to a temporary file in the same directory and renamed over the old one, so a
run killed mid-write keeps its previous checkpoint. Loaded with
``torch.load(..., weights_only=True)``: plain tensors, numbers, strings, lists, dicts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressm_rl.rl.ppo import make_optimizer
from compressm_rl.runs.config import TrainConfig
from compressm_rl.runs.files import atomic_write
from policies.actor_critic import ActorCritic
from policies.normalizer import RunningNormalizer

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass
class TrainingState:
    """Everything a run needs to continue where it stopped.

    ``reduction_steps`` is the compression schedule in env steps, fixed when the run
    starts (a resumed run follows it even if the defaults changed since);
    ``next_reduction`` indexes the next one due. ``wall_time`` is training seconds so
    far; ``rng`` the global torch/numpy RNG states when saved (``rng_state``, rank 0's
    in a data-parallel run of ``world_size`` ranks).

    ``guard_obs`` and ``guard_reset`` (``[envs, T, obs_dim]``, ``[envs, T]``, every rank's
    envs) are the last rollout's observations and episode starts while a reduction is due
    at the next iteration: the compression guards run on them, so a run resumed from this
    checkpoint makes that reduction at the same step, on the same data, as one that was
    never stopped. ``recent_returns`` (up to 20 episode returns) feeds the progress bar and
    the events' ``return_before``.
    """

    config: TrainConfig
    policy: ActorCritic
    optimizer: torch.optim.Optimizer
    reward_norm: RunningNormalizer | None
    global_step: int = 0
    iteration: int = 0
    next_reduction: int = 0
    reduction_steps: list[int] = field(default_factory=list)
    wall_time: float = 0.0
    rng: dict | None = None
    world_size: int = 1
    guard_obs: torch.Tensor | None = None
    guard_reset: torch.Tensor | None = None
    recent_returns: list[float] = field(default_factory=list)


def save_checkpoint(run_dir: Path, state: TrainingState) -> Path:
    """Write ``state`` to ``run_dir/checkpoint.pt`` atomically; returns the path."""
    return write_checkpoint(run_dir, checkpoint_payload(state))


def checkpoint_payload(state: TrainingState) -> dict:
    """The checkpoint's contents, copied off the live objects: it stays the state of this
    moment while training goes on (the runner keeps the last completed iteration's, to
    save when a run is stopped mid-iteration)."""
    policy = state.policy
    payload = {
        "format_version": FORMAT_VERSION,
        "env_id": state.config.env_id,
        "global_step": state.global_step,
        "iteration": state.iteration,
        "next_reduction": state.next_reduction,
        "reduction_steps": list(state.reduction_steps),
        "wall_time": state.wall_time,
        "world_size": state.world_size,
        "architecture": policy.architecture(),
        "action_low": policy.action_low,
        "action_high": policy.action_high,
        "policy": policy.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "reward_norm": state.reward_norm.state_dict() if state.reward_norm is not None else {},
        "rng": state.rng if state.rng is not None else rng_state(),
        "config": state.config.to_dict(),
        "guard_obs": state.guard_obs,
        "guard_reset": state.guard_reset,
        "recent_returns": [float(r) for r in state.recent_returns],
    }
    return copy.deepcopy(_on_cpu(payload))


def _on_cpu(value):
    """``value`` with every tensor in it on the CPU (a no-op for CPU tensors), so that a
    checkpoint written by a run on CUDA loads on any machine."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):  # a state_dict's OrderedDict and its _metadata kept
        out = type(value)((k, _on_cpu(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata
        return out
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value


def write_checkpoint(run_dir: Path, payload: dict) -> Path:
    """Write a ``checkpoint_payload`` to ``run_dir/checkpoint.pt`` atomically."""
    path = Path(run_dir) / CHECKPOINT

    def write(f) -> None:
        try:
            torch.save(payload, f)
        except RuntimeError as err:  # torch's writer hides a failed write (ENOSPC, EIO)
            failed = err.__context__  # behind "unexpected pos": say what happened
            if not isinstance(failed, OSError):
                raise
            raise OSError(
                failed.errno,
                f"{failed.strerror} while writing {path}; the previous checkpoint is kept: "
                "free space and resume the run",
            ) from None

    atomic_write(path, write)
    return path


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> TrainingState:
    """A checkpoint file, or a run directory's latest, rebuilt into live objects, the
    policy and its optimiser on ``device`` (whatever device wrote it).

    Raises FileNotFoundError if there is none, ValueError if it is corrupt or not ours.
    """
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
    try:
        return _state_from(payload, device)
    except (KeyError, TypeError, RuntimeError, IndexError) as err:  # a key or a shape off
        what = f"missing {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise ValueError(
            f"checkpoint {path} does not hold a complete compressm-rl training state "
            f"({type(err).__name__}: {what}); restore it from a copy, or delete it to train "
            "the run again"
        ) from None


def _state_from(payload: dict, device: torch.device | str) -> TrainingState:
    """The live objects of a checkpoint's payload (raises on a missing key or shape)."""
    config = TrainConfig.from_dict(payload["config"])
    policy = ActorCritic.from_architecture(
        payload["architecture"], payload["action_low"], payload["action_high"]
    )
    policy.load_state_dict(payload["policy"])
    policy.to(device)  # before the optimiser: its state follows its parameters' device
    optimizer = make_optimizer(policy, config.ppo.lr)
    if payload["optimizer"]:
        optimizer.load_state_dict(payload["optimizer"])
    reward_norm = None
    if config.ppo.norm_reward:
        reward_norm = RunningNormalizer(())
        reward_norm.load_state_dict(payload["reward_norm"])
    return TrainingState(
        config=config,
        policy=policy,
        optimizer=optimizer,
        reward_norm=reward_norm,
        global_step=int(payload["global_step"]),
        iteration=int(payload["iteration"]),
        next_reduction=int(payload.get("next_reduction", 0)),
        reduction_steps=[int(x) for x in payload.get("reduction_steps", [])],
        wall_time=float(payload.get("wall_time", 0.0)),
        rng=payload["rng"],
        world_size=int(payload.get("world_size", 1)),
        guard_obs=_to(payload.get("guard_obs"), device),
        guard_reset=_to(payload.get("guard_reset"), device),
        recent_returns=[float(r) for r in payload.get("recent_returns", [])],
    )


def _to(tensor: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def load_policy(run_dir: Path) -> tuple[ActorCritic, dict]:
    """The trained policy of a run directory, and ``{"env_id", "global_step"}``."""
    state = load_checkpoint(run_dir)
    state.policy.eval()
    return state.policy, {"env_id": state.config.env_id, "global_step": state.global_step}


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
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy_pos"], int(has_gauss), cached))
