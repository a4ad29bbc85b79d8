"""A gradient step's bookkeeping, per-parameter gradients against one gradient buffer,
A/B in one process.

    python benchmarks/gradients.py [--sizes 128,25] [--reps 60] [--env Hopper-v5]

Per policy (n per LRU layer, two layers, H = 64; and the 64-64 MLP), after one PPO
iteration of its own rollout, the pieces of a gradient step on one minibatch of that
rollout, the two ways taken in turn every repetition:

- ``per tensor``: ``optimizer.zero_grad(set_to_none=True)``, ``backward``,
  ``torch.nn.utils.clip_grad_norm_`` over the parameters, fused Adam's ``step``;
- ``buffer``: ``ppo.gradient_buffer``'s views zeroed, ``backward``,
  ``ppo.clip_flat_grad_norm_``, the same ``step`` (what ``ppo_update`` runs).

Prints the median ms of each piece, one torch thread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from phases import make_setups, policy_variants  # benchmarks/ is on sys.path when run as a script

from compressm_rl.rl import iteration, ppo, preset_for
from compressm_rl.rl.process import configure_process
from export.bench import cpu_model

PIECES = ("zero", "backward", "clip", "step")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_pieces(policy, optimizer, rollout, cfg, reps: int) -> dict[str, list[float]]:
    """Median ms per piece, ``{"per tensor": [...], "buffer": [...]}`` in ``PIECES`` order."""
    n_seq = rollout.obs.shape[0] * rollout.obs.shape[1] // cfg.seq_len // cfg.minibatches

    def sequences(x: torch.Tensor) -> torch.Tensor:  # env-major, as SequenceBatch cuts them
        return x.transpose(0, 1).reshape(-1, cfg.seq_len, x.shape[-1])[:n_seq]

    obs, actions = sequences(rollout.obs), sequences(rollout.actions)
    reset = torch.zeros(obs.shape[:2], dtype=torch.bool)
    actor0 = torch.zeros(n_seq, policy.actor.state_size)
    critic0 = torch.zeros(n_seq, policy.critic.state_size)
    params = list(policy.parameters())

    def loss() -> torch.Tensor:
        log_prob, _, values = policy.evaluate(obs, actor0, critic0, reset, actions)
        return values.square().mean() - log_prob.mean()

    def per_tensor() -> list[float]:
        forward = loss()
        return [
            timed(lambda: optimizer.zero_grad(set_to_none=True)),
            timed(forward.backward),
            timed(lambda: torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)),
            timed(optimizer.step),
        ]

    def buffer() -> list[float]:
        grads, forward = ppo.gradient_buffer(params), loss()
        return [
            timed(grads.zero_),
            timed(forward.backward),
            timed(lambda: ppo.clip_flat_grad_norm_(grads, cfg.max_grad_norm)),
            timed(optimizer.step),
        ]

    rows = {"per tensor": [], "buffer": []}
    for _ in range(reps + 1):  # the two ways in turn; the first repetition warms up
        rows["per tensor"].append(per_tensor())
        rows["buffer"].append(buffer())
    return {way: np.median(np.array(r[1:]), axis=0).tolist() for way, r in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,25", help="n per LRU layer, one per policy")
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--env", default="Hopper-v5")
    args = parser.parse_args()
    configure_process(1)
    cfg = preset_for(args.env)
    variants = policy_variants([int(n) for n in args.sizes.split(",")], mlp=True)
    print(f"{cpu_model()}, {args.env}, one minibatch of the preset, median ms of {args.reps}\n")
    print("| policy | way | " + " | ".join(PIECES) + " | total |")
    print("|---|---|" + "---:|" * (len(PIECES) + 1))
    setups = make_setups(args.env, variants, cfg)
    for name, (envs, policy, optimizer, carry, reward_norm) in setups.items():
        rollout = iteration(policy, optimizer, envs, carry, reward_norm, cfg).rollout
        for way, medians in time_pieces(policy, optimizer, rollout, cfg, args.reps).items():
            cells = " | ".join(f"{m:.3f}" for m in medians)
            print(f"| {name} | {way} | {cells} | {sum(medians):.3f} |", flush=True)
        envs.close()


if __name__ == "__main__":
    main()
