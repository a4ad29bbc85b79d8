"""The training runner: envs + policy + recurrent PPO + in-training compression + run
directory, with resume (docs/design.md §5, §7, §9).

``train(config, run_dir)`` reads top to bottom: start (or resume) the run, then per
iteration compress when a reduction point is due, set the learning rate
(``scheduled_lr``), run one PPO ``iteration``, log, checkpoint.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from compressm_rl.compression import ReductionEvent, apply_reductions, decide_reductions
from compressm_rl.device import resolve_device
from compressm_rl.progress import progress as progress_display
from compressm_rl.rl import EnvCarry, IterationResult, iteration, make_optimizer, start_carry
from compressm_rl.rl.distributed import (
    SINGLE,
    World,
    barrier,
    broadcast_module,
    broadcast_object,
    check_in_sync,
    gather_batches,
    init_world,
    shutdown,
)
from compressm_rl.rl.ppo import explained_variance
from compressm_rl.rl.process import configure_process
from compressm_rl.runs import (
    EventLog,
    MetricsLog,
    TrainConfig,
    TrainingState,
    load_checkpoint,
    locked_run_dir,
    save_config,
)
from compressm_rl.runs.checkpoint import (
    CHECKPOINT,
    checkpoint_payload,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from compressm_rl.runs.config import CONFIG, check_replaceable, load_config, trained_with
from compressm_rl.runs.files import clear_run_dir, remove_stale_temporaries
from compressm_rl.runs.report import plot_hsv
from compressm_rl.stopping import StopOnSignals, TrainingStopped
from envs import make_vec_env
from policies.actor_critic import ActorCritic
from policies.normalizer import RunningNormalizer

# Rank k's envs and action noise are seeded with seed + k · RANK_SEED_STRIDE.
RANK_SEED_STRIDE = 10_000


def make_policy(config: TrainConfig, envs: gym.vector.VectorEnv) -> ActorCritic:
    """A fresh policy for the envs' spaces, sized by the config."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    return ActorCritic(
        obs_space.shape[0],
        act_space.shape[0],
        act_space.low,
        act_space.high,
        policy=config.policy,
        width=config.width,
        state_dims=config.initial_state_dims,
        critic_state_dims=config.initial_critic_state_dims,
        mlp_layers=config.layers,
        init_log_std=config.ppo.init_log_std,
    )


def train(
    config: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    max_iterations: int | None = None,
    overwrite: bool = False,
) -> ActorCritic:
    """Train (or resume) a run; returns the final policy.

    Args:
        config: the run's settings (saved as ``config.yaml``).
        run_dir: output directory (created).
        resume: continue from ``run_dir``'s checkpoint (its config must equal ``config``).
        progress: show a progress bar with env steps/s and the recent return.
        max_iterations: stop after this many iterations in this call (for tests and
            for simulating an interrupted run); the run stays resumable.
        overwrite: replace the run in ``run_dir``: the files this tool wrote there are
            removed (``runs.files.clear_run_dir``) once its lock is held, so a run that
            another process is training is never deleted under it; other files stay, and
            a ``config.yaml`` that is not a run's is refused (``check_replaceable``).

    A run without a checkpoint yet (stopped before its first) resumes from step 0.

    The policy and optimiser live on ``config.device`` (``compressm_rl.device``); the
    rollout steps a CPU copy of the actor (``ActorCritic.rollout_actor``). The returned
    policy is on the CPU.

    Raises:
        ValueError: ``config.device`` is ``cuda`` and this machine has no CUDA (checked
            before ``run_dir`` is created).
        RunDirectoryBusy: another process is training in ``run_dir``.
        TrainingStopped: SIGINT or SIGTERM arrived; the last completed iteration is saved
            (``compressm_rl.stopping``).
    """
    device = resolve_device(config.device)  # before any side effect: a clear error, no directory
    if overwrite and not resume:
        check_replaceable(run_dir, overwrite=True)  # never empties what is not a run
    world = init_world(device)  # torchrun's job, or a world of one
    run_dir = Path(run_dir)
    try:
        if not world.is_main:  # rank 0 owns the directory; the others only read from it
            barrier(world)  # rank 0 holds the lock and has prepared the directory
            return _train(config, run_dir, resume, False, max_iterations, device, world)
        run_dir.mkdir(parents=True, exist_ok=True)
        with locked_run_dir(run_dir):  # held by rank 0 for the whole job
            remove_stale_temporaries(run_dir)  # from a process killed mid-write
            if overwrite and not resume and (run_dir / CONFIG).exists():
                clear_run_dir(run_dir)  # only the files this tool wrote
            barrier(world)
            return _train(config, run_dir, resume, progress, max_iterations, device, world)
    finally:
        shutdown(world)


def _train(
    config: TrainConfig,
    run_dir: Path,
    resume: bool,
    progress: bool,
    max_iterations: int | None,
    device: torch.device,
    world: World,
) -> ActorCritic:
    # The iteration loop reads top to bottom here (CleanRL's style); each step is one call.
    state, envs, seed = _prepare(config, run_dir, resume, device, world)
    # total_steps counts every rank's env steps: an iteration collects world.size rollouts.
    steps_per_iteration = config.ppo.steps_per_iteration * world.size
    num_iterations = max(1, config.ppo.total_steps // steps_per_iteration)
    # MuJoCo episodes in flight at a checkpoint are not saved: a resumed run restarts them.
    obs, _ = envs.reset(seed=seed + state.iteration)
    carry = start_carry(state.policy, envs, obs)
    log = _Log(state, run_dir, world, num_iterations * steps_per_iteration, progress)
    last, saved_step, iterations_done = log.completed(), None, 0
    with StopOnSignals(escalate=not world.distributed) as stop:
        while state.iteration < num_iterations and stop.signum is None:
            if max_iterations is not None and iterations_done >= max_iterations:
                break
            try:
                with stop.interruptible():  # a stop abandons this part; `last` is kept
                    result, new_events = _iterate(state, envs, carry, log, num_iterations, world)
            except Exception:
                if stop.signum is None:  # a real error (a worker env killed by the signal
                    raise  # is not one)
                break
            state.iteration += 1
            state.global_step += steps_per_iteration
            iterations_done += 1
            _keep_guard_batch(state, result, world)
            log.iteration_done(result, new_events)
            last = log.completed()
            due = (
                state.iteration % config.checkpoint_every == 0 or state.iteration == num_iterations
            )
            if due and world.is_main:
                write_checkpoint(run_dir, last)
                saved_step = state.global_step
        log.close()
        unsaved = last["global_step"] != saved_step and (iterations_done or stop.signum is not None)
        if unsaved and world.is_main:
            write_checkpoint(run_dir, last)  # the iterations since the last checkpoint, kept
        try:
            envs.close()
        except Exception:
            if stop.signum is None:  # worker envs the signal reached die with broken pipes
                raise
        if stop.signum is not None:
            raise TrainingStopped(stop.signum, last["global_step"], run_dir)
    return state.policy.cpu()


def _prepare(
    config: TrainConfig, run_dir: Path, resume: bool, device: torch.device, world: World
) -> tuple[TrainingState, gym.vector.VectorEnv, int]:
    """The process set up, this rank's envs made and the run started or resumed: the
    training state, the envs and this rank's env seed."""
    configure_process(config.torch_threads)
    torch.manual_seed(config.seed)  # the same initial policy on every rank
    np.random.seed(config.seed)
    # Each rank its own envs and action noise; rank 0's are those of a one-process run.
    seed = config.seed + RANK_SEED_STRIDE * world.rank
    cfg = config.ppo
    envs = make_vec_env(
        config.env_id,
        cfg.num_envs,
        seed,
        config.num_workers,
        config.physics_threads,
        dynamics=config.dynamics,
    )
    state = (_resume if resume else _start)(config, run_dir, envs, device, world)
    broadcast_module(state.policy, world)  # bit-identical from the start
    if world.rank:
        torch.manual_seed(seed + state.iteration)
        np.random.seed(seed + state.iteration)
    return state, envs, seed


def _iterate(
    state: TrainingState,
    envs: gym.vector.VectorEnv,
    carry: EnvCarry,
    log: _Log,
    num_iterations: int,
    world: World,
) -> tuple[IterationResult, list[ReductionEvent]]:
    """One iteration: compress where a reduction is due, set the lr, one PPO iteration,
    check the ranks. Returns its result and the reductions made before it."""
    config, new_events = state.config, []
    # The guards run on the last rollout (kept in the state, so in the checkpoint: a
    # resumed run cuts where an uninterrupted one does).
    if _reduction_due(state) and state.guard_obs is not None:
        left = num_iterations - state.iteration
        new_events = _compress(state, carry, log.recent_returns, log.run_dir, left, world)
    if config.ppo.desired_kl is None:  # else the update adapts the lr itself
        lr = scheduled_lr(config, state.iteration, num_iterations, state.policy)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
    log.iteration_started()
    result = iteration(
        state.policy, state.optimizer, envs, carry, state.reward_norm, config.ppo, world
    )
    steps = config.ppo.steps_per_iteration * world.size
    check_in_sync(  # every rank took the same step, to finite weights
        state.policy, world, update=state.iteration + 1, step=state.global_step + steps
    )
    return result, new_events


class _Log:
    """What a training call reports: ``metrics.csv`` rows and ``compression.json`` events
    (rank 0 writes them), the progress bar, the recent episode returns, the wall-clock."""

    def __init__(
        self, state: TrainingState, run_dir: Path, world: World, total: int, progress: bool
    ) -> None:
        self.state, self.run_dir, self.world = state, run_dir, world
        self.metrics, self.events = MetricsLog(run_dir), EventLog(run_dir)
        self.recent_returns: deque[float] = deque(state.recent_returns, maxlen=20)
        self.bar = progress_display(total, state.global_step, progress)
        self.start_time, self.start_step = time.perf_counter(), state.global_step
        self.wall_before, self.iteration_start = state.wall_time, self.start_time

    def iteration_started(self) -> None:
        self.iteration_start = time.perf_counter()

    def iteration_done(self, result: IterationResult, new_events: list[ReductionEvent]) -> None:
        """Log the iteration just counted in ``state``."""
        state, writes = self.state, self.world.is_main
        finished = result.rollout.finished_returns
        self.recent_returns.extend(finished)
        if new_events and writes:  # the return right after a reduction, for compression.json
            after = _mean_or_none(finished)
            self.events.append([replace(e, return_after=after) for e in new_events])
        elapsed = time.perf_counter() - self.start_time
        if writes:
            seconds = time.perf_counter() - self.iteration_start
            row = _metrics_row(state, result, self.wall_before + elapsed, seconds, self.world.size)
            self.metrics.append(row)
        self.bar.update(state.config.ppo.steps_per_iteration * self.world.size)
        self.bar.set_postfix(
            sps=f"{(state.global_step - self.start_step) / elapsed:.0f}",
            ret=f"{np.mean(self.recent_returns):.1f}" if self.recent_returns else "-",
            n=",".join(str(n) for n in state.policy.actor.state_dims) or "0",
        )

    def completed(self) -> dict:
        """What a stop saves: the state after the last full iteration."""
        self.state.wall_time = self.wall_before + time.perf_counter() - self.start_time
        self.state.rng = rng_state()
        self.state.recent_returns = list(self.recent_returns)
        return checkpoint_payload(self.state)

    def close(self) -> None:
        self.bar.close()


def _start(
    config: TrainConfig,
    run_dir: Path,
    envs: gym.vector.VectorEnv,
    device: torch.device,
    world: World = SINGLE,
) -> TrainingState:
    """A new run: fresh policy and optimiser on ``device``, ``config.yaml`` written, old
    logs cleared."""
    cfg = config.ppo
    policy = make_policy(config, envs).to(device)  # drawn on the CPU: same start anywhere
    state = TrainingState(
        config=config,
        policy=policy,
        optimizer=make_optimizer(policy, cfg.lr),
        reward_norm=RunningNormalizer(()) if cfg.norm_reward else None,
        reduction_steps=[int(f * cfg.total_steps) for f in sorted(config.compression.at)],
        world_size=world.size,
    )
    if world.is_main:
        save_config(run_dir, config)
        MetricsLog(run_dir).path.unlink(missing_ok=True)
        EventLog(run_dir).clear()
    return state


def _resume(
    config: TrainConfig,
    run_dir: Path,
    envs: gym.vector.VectorEnv,
    device: torch.device,
    world: World = SINGLE,
) -> TrainingState:
    """The run's checkpoint on ``device``, RNG restored, logs cut back to the checkpoint's
    step; a run stopped before its first checkpoint starts again from step 0. The device
    and the physics threads may differ from the run's (they are the machine's settings)."""
    # The run's length may change on resume (`train --resume DIR --total-steps N`).
    saved_steps = load_config(run_dir).ppo.total_steps
    if not trained_with(run_dir, replace(config, ppo=replace(config.ppo, total_steps=saved_steps))):
        raise ValueError(
            f"{run_dir} was trained with a different config; resume it with its own "
            f"config.yaml (compressm-rl train --resume {run_dir})"
        )
    if config.ppo.total_steps != saved_steps and world.is_main:
        save_config(run_dir, config)
    if not (run_dir / CHECKPOINT).exists():
        return _start(config, run_dir, envs, device, world)
    state = load_checkpoint(run_dir, device)
    if state.world_size != world.size:
        raise ValueError(
            f"{run_dir} was trained on {state.world_size} rank(s) and this job has "
            f"{world.size}: each rank's envs and batch are part of the run; resume it with "
            f"--nproc {state.world_size} (or torchrun --nproc-per-node {state.world_size})"
        )
    state.config = config  # config.yaml is the run's one source of settings
    if not state.reduction_steps:  # checkpoints from before the schedule was saved
        at = sorted(config.compression.at)
        state.reduction_steps = [int(f * config.ppo.total_steps) for f in at]
    set_rng_state(state.rng)
    if world.is_main:
        MetricsLog(run_dir).truncate_after(state.global_step)
        EventLog(run_dir).drop_from(state.global_step)
    return state


def _keep_guard_batch(state: TrainingState, result: IterationResult, world: World) -> None:
    """Keep the rollout just collected (every rank's, gathered) in ``state`` while a
    reduction is due at the next iteration: the compression guards' data."""
    if _reduction_due(state):  # the same on every rank: gather_batches is a collective
        rollout = result.rollout
        state.guard_obs = gather_batches(rollout.obs.transpose(0, 1), world)
        state.guard_reset = gather_batches(rollout.episode_start.transpose(0, 1), world)
    else:
        state.guard_obs = state.guard_reset = None


def _reduction_due(state: TrainingState) -> bool:
    return (
        state.config.compression.enabled
        and state.next_reduction < len(state.reduction_steps)
        and state.global_step >= state.reduction_steps[state.next_reduction]
    )


def scheduled_lr(
    config: TrainConfig, iteration: int, num_iterations: int, policy: ActorCritic
) -> float:
    """The lr of iteration ``iteration`` (0-based): ``ppo.lr``, annealed linearly to 0 over
    the run if ``ppo.anneal_lr``, times ``compression.lr_scale`` once the actor has fewer
    states than the run started with (the step size it compensates is the actor's; read
    from the policy, so a resumed run gets the same lr)."""
    lr = config.ppo.lr
    if config.ppo.anneal_lr:
        lr *= 1.0 - iteration / num_iterations
    if config.compression.enabled and policy.actor.state_dims != config.initial_state_dims:
        lr *= config.compression.lr_scale
    return lr


def _compress(
    state: TrainingState,
    carry: EnvCarry,
    recent_returns: deque[float],
    run_dir: Path,
    iterations_left: int,
    world: World = SINGLE,
) -> list[ReductionEvent]:
    """Between rollouts: shrink the LRU layers, map the envs' ongoing states, plot the
    spectra. The events are logged after the next rollout, with the return it reached.

    The guards run on the last rollout, ``state.guard_obs`` / ``guard_reset``.
    Works wherever the policy lives: layers are read as float64 numpy on the CPU
    (``LRU.system``) and written back on the policy's device (``LRU.load_system``), the
    optimiser follows the new parameters there; the rollout's observations are on the
    policy's device (``iteration``) and the carried state on the CPU.

    Data-parallel: rank 0 decides, with the guards run on every rank's rollout (gathered),
    and sends the decision to all (with cut-and-heal, the healed actor's weights too);
    every rank applies it to its identical policy and optimiser and maps its own envs'
    states."""
    obs, reset = state.guard_obs, state.guard_reset
    # One event per iteration at most: points the run has no iterations left for do not
    # count, so a budget's last event is one that happens.
    events_left = min(len(state.reduction_steps) - state.next_reduction, iterations_left)
    decision = None
    if world.is_main:
        decision = decide_reductions(
            state.policy, state.config.compression, obs, reset, events_left
        )
    decision = broadcast_object(decision, world)
    carry.state = apply_reductions(state.policy, state.optimizer, decision, carry.state)
    events = decision.events
    before = _mean_or_none(recent_returns)
    events = [replace(e, step=state.global_step, return_before=before) for e in events]
    state.next_reduction += 1
    state.guard_obs = state.guard_reset = None
    if world.is_main:
        title = f"{state.config.env_id}: reduction {state.next_reduction}"
        plot_hsv(
            run_dir / f"hsv_{state.next_reduction}.png",
            events,
            f"{title} at step {state.global_step:,}",
        )
    return events


def _metrics_row(
    state: TrainingState,
    result: IterationResult,
    wall_time: float,
    iteration_seconds: float,
    ranks: int = 1,
) -> dict:
    """One ``metrics.csv`` row for the iteration just finished (episode statistics are
    rank 0's; env steps count every rank's)."""
    rollout = result.rollout
    steps = state.config.ppo.steps_per_iteration * ranks
    return {
        "iteration": state.iteration,
        "global_step": state.global_step,
        "wall_time": round(wall_time, 3),
        "steps_per_s": round(steps / iteration_seconds, 1),
        "episode_return": np.mean(rollout.finished_returns) if rollout.finished_returns else "",
        "episode_length": np.mean(rollout.finished_lengths) if rollout.finished_lengths else "",
        "episodes": len(rollout.finished_returns),
        "lr": state.optimizer.param_groups[0]["lr"],
        "explained_variance": explained_variance(result.values, result.returns),
        "state_dims": " ".join(str(n) for n in state.policy.actor.state_dims) or "0",
        **result.stats,
    }


def _mean_or_none(values) -> float | None:
    return float(np.mean(values)) if len(values) else None
