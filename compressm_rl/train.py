"""The training runner: envs + policy + recurrent PPO + run directory, with resume.

``train(config, run_dir)`` is the whole loop; reading it top to bottom shows every
step of an iteration: anneal the learning rate, collect a rollout, compute values and
advantages, update, log, checkpoint.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from compressm_rl import ppo
from compressm_rl.compression import (
    EVENTS,
    CompressionConfig,
    compress_policy,
    drop_events_from,
    plot_hsv,
    save_events,
)
from compressm_rl.runs import (
    METRICS,
    MetricsLog,
    TrainConfig,
    build_policy,
    load_checkpoint,
    load_config,
    locked_run_dir,
    rng_state,
    save_checkpoint,
    save_config,
    set_rng_state,
)
from envs import make_vec_env
from policies.actor_critic import ActorCritic
from policies.normalizer import RunningNormalizer


def make_policy(config: TrainConfig, envs) -> ActorCritic:
    """A fresh policy for the envs' spaces, sized by the config."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    return ActorCritic(
        obs_space.shape[0],
        act_space.shape[0],
        act_space.low,
        act_space.high,
        policy=config.policy,
        width=config.width,
        state_dims=config.state_dims or [config.state_dim] * config.layers,
        mlp_layers=config.layers,
        init_log_std=config.preset().init_log_std,
    )


def make_optimizer(policy: ActorCritic, lr: float) -> torch.optim.Adam:
    # fused: one kernel for all tensors instead of ~10 ops per tensor (2.9 -> 0.7 ms a step)
    return torch.optim.Adam(policy.parameters(), lr=lr, eps=1e-5, fused=True)


def train(
    config: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    max_iterations: int | None = None,
) -> ActorCritic:
    """Train (or resume) a run; returns the final policy.

    Args:
        config: the run's settings (saved as ``config.yaml``).
        run_dir: output directory (created).
        resume: continue from ``run_dir``'s checkpoint (its config must equal ``config``).
        progress: show a progress bar with env steps/s and the recent return.
        max_iterations: stop after this many iterations in this call (for tests and
            for simulating an interrupted run); the run stays resumable.

    Raises:
        RunDirectoryBusy: another process is training in ``run_dir``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked_run_dir(run_dir):
        return _train(config, run_dir, resume, progress, max_iterations)


def _train(
    config: TrainConfig,
    run_dir: Path,
    resume: bool,
    progress: bool,
    max_iterations: int | None,
) -> ActorCritic:
    cfg = config.preset()
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    if cfg.rollout_steps % cfg.seq_len:
        raise ValueError(
            f"rollout_steps ({cfg.rollout_steps}) must be a multiple of seq_len ({cfg.seq_len})"
        )
    envs = make_vec_env(config.env_id, cfg.num_envs, config.seed, config.num_workers)
    policy = make_policy(config, envs)
    optimizer = make_optimizer(policy, cfg.lr)
    reward_norm = RunningNormalizer(()) if cfg.norm_reward else None
    metrics = MetricsLog(run_dir / METRICS)
    global_step, iteration = 0, 0
    compression = CompressionConfig.from_dict(config.compression)
    reduction_steps = [int(f * cfg.total_steps) for f in sorted(compression.at)]
    next_reduction = 0

    wall_before = 0.0  # training seconds before this call (resumed runs)
    if resume:
        saved = load_config(run_dir)
        if saved != config:
            raise ValueError(
                f"{run_dir} was trained with a different config; resume it with its own "
                f"config.yaml (compressm-rl train --resume {run_dir})"
            )
        payload = load_checkpoint(run_dir)
        policy = build_policy(
            payload["architecture"], payload["action_low"], payload["action_high"]
        )
        policy.load_state_dict(payload["policy"])
        optimizer = make_optimizer(policy, cfg.lr)
        optimizer.load_state_dict(payload["optimizer"])
        if reward_norm is not None:
            reward_norm.load_state_dict(payload["reward_norm"])
        set_rng_state(payload["rng"])
        global_step, iteration = int(payload["global_step"]), int(payload["iteration"])
        next_reduction = int(payload.get("next_reduction", 0))
        # The schedule the run started with, even if the defaults changed since.
        reduction_steps = [int(x) for x in payload.get("reduction_steps", reduction_steps)]
        wall_before = float(payload.get("wall_time", 0.0))
        metrics.truncate_after(global_step)
        drop_events_from(run_dir, global_step)
    else:
        save_config(run_dir, config)
        metrics.path.unlink(missing_ok=True)
        (run_dir / EVENTS).unlink(missing_ok=True)

    steps_per_iter = cfg.num_envs * cfg.rollout_steps
    num_iterations = max(1, cfg.total_steps // steps_per_iter)
    # MuJoCo episodes in flight at a checkpoint are not saved: a resumed run restarts them.
    obs, _ = envs.reset(seed=config.seed + iteration)
    carry = ppo.start_carry(policy, envs, obs)
    recent_returns: deque[float] = deque(maxlen=20)
    bar = tqdm(
        total=num_iterations * steps_per_iter,
        initial=global_step,
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    start_time, start_step = time.perf_counter(), global_step
    iterations_done = 0
    rollout = None
    new_events: list[dict] = []

    def checkpoint() -> None:
        save_checkpoint(
            run_dir,
            {
                "env_id": config.env_id,
                "global_step": global_step,
                "iteration": iteration,
                "next_reduction": next_reduction,
                "reduction_steps": reduction_steps,
                "wall_time": wall_before + time.perf_counter() - start_time,
                "architecture": policy.architecture(),
                "action_low": policy.action_low,
                "action_high": policy.action_high,
                "policy": policy.state_dict(),
                "optimizer": optimizer.state_dict(),
                "reward_norm": reward_norm.state_dict() if reward_norm is not None else {},
                "rng": rng_state(),
                "config": config.to_dict(),
            },
        )

    while iteration < num_iterations:
        if max_iterations is not None and iterations_done >= max_iterations:
            break
        if cfg.anneal_lr:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * (1.0 - iteration / num_iterations)

        if (
            compression.enabled
            and rollout is not None
            and next_reduction < len(reduction_steps)
            and global_step >= reduction_steps[next_reduction]
        ):
            # Between rollouts: shrink every LRU layer, map the envs' ongoing states.
            carry.state, new_events = compress_policy(
                policy,
                optimizer,
                compression,
                carry.state,
                rollout.obs.transpose(0, 1),
                rollout.episode_start.transpose(0, 1),
            )
            for event in new_events:
                event.update(step=global_step, return_before=_mean_or_none(recent_returns))
            plot_hsv(
                run_dir / f"hsv_{next_reduction + 1}.png",
                new_events,
                f"{config.env_id}: reduction {next_reduction + 1} at step {global_step:,}",
            )
            next_reduction += 1

        iter_start = time.perf_counter()
        rollout = ppo.collect_rollout(
            policy, envs, carry, cfg.rollout_steps, reward_norm, cfg.gamma
        )
        values, last_value, critic_seg_states, critic_end = ppo.critic_pass(
            policy, rollout, cfg.seq_len, cfg.gamma
        )
        carry.state = ppo.RecurrentState(carry.state.actor, critic_end)
        advantages, returns = ppo.compute_gae(
            rollout.rewards, values, rollout.dones, last_value, cfg.gamma, cfg.gae_lambda
        )
        stats = ppo.ppo_update(
            policy, optimizer, rollout, values, advantages, returns, critic_seg_states, cfg
        )
        iteration += 1
        iterations_done += 1
        global_step += steps_per_iter

        recent_returns.extend(rollout.finished_returns)
        if new_events:  # the return right after a reduction, for compression.json
            for event in new_events:
                event["return_after"] = _mean_or_none(rollout.finished_returns)
            save_events(run_dir, new_events)
            new_events = []
        elapsed = time.perf_counter() - start_time
        row = {
            "iteration": iteration,
            "global_step": global_step,
            "wall_time": round(wall_before + elapsed, 3),
            "steps_per_s": round(steps_per_iter / (time.perf_counter() - iter_start), 1),
            "episode_return": np.mean(rollout.finished_returns) if rollout.finished_returns else "",
            "episode_length": np.mean(rollout.finished_lengths) if rollout.finished_lengths else "",
            "episodes": len(rollout.finished_returns),
            "lr": optimizer.param_groups[0]["lr"],
            "explained_variance": ppo.explained_variance(values, returns),
            "state_dims": " ".join(str(n) for n in policy.actor.state_dims) or "0",
            **stats,
        }
        metrics.append(row)
        bar.update(steps_per_iter)
        bar.set_postfix(
            sps=f"{(global_step - start_step) / elapsed:.0f}",
            ret=f"{np.mean(recent_returns):.1f}" if recent_returns else "-",
        )
        if iteration % config.checkpoint_every == 0 or iteration == num_iterations:
            checkpoint()
    bar.close()
    if iterations_done and iteration % config.checkpoint_every != 0:
        checkpoint()  # the last iterations of an interrupted call are kept too
    envs.close()
    return policy


def _mean_or_none(values) -> float | None:
    return float(np.mean(values)) if len(values) else None
