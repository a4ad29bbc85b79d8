"""Where a PPO iteration's time goes, per phase, for several policy sizes side by side.

    python benchmarks/phases.py [--sizes 128,67,25] [--mlp] [--reps 5] [--env Hopper-v5]
        [--physics-threads 1]

One process builds a policy per size (n per LRU layer, two layers, H = 64; ``--mlp``
adds the 64-64 MLP) with its own envs and optimiser, then runs their iterations in
turn, so every size sees the same machine load. Prints the median over ``--reps``
iterations (after one warm-up) of the rollout, the critic pass, GAE and the update, in
ms, one torch thread. The ratio of two totals is the wall-clock ratio of training at
those sizes.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from compressm_rl.rl import iteration, make_optimizer, preset_for, start_carry
from compressm_rl.rl.iteration import PHASES
from compressm_rl.rl.process import configure_process
from compressm_rl.runs import TrainConfig
from compressm_rl.train import make_policy
from envs import make_vec_env
from export.bench import cpu_model
from policies.normalizer import RunningNormalizer


def policy_variants(sizes: list[int], mlp: bool) -> dict:
    """``make_setups``'s variants: ``"n = N"`` for a two-layer SSM of n = N per layer, each
    of ``sizes``, and ``"MLP 64-64"`` with ``mlp``."""
    variants = {f"n = {n}": ("ssm", [n, n]) for n in sizes}
    return variants | ({"MLP 64-64": ("mlp", None)} if mlp else {})


def make_setups(env_id: str, variants: dict, cfg, physics_threads: int = 1) -> dict:
    """Per name, ``(envs, policy, optimizer, carry, reward_norm)`` ready for ``iteration``:
    ``variants`` maps a name to ``(policy kind, state_dims)``; every one seeded alike."""
    setups = {}
    for name, (kind, dims) in variants.items():
        torch.manual_seed(0)
        envs = make_vec_env(env_id, cfg.num_envs, seed=0, physics_threads=physics_threads)
        obs, _ = envs.reset(seed=0)
        config = TrainConfig.from_dict(dict(env_id=env_id, policy=kind, state_dims=dims))
        policy = make_policy(config, envs)
        carry = start_carry(policy, envs, obs)
        setups[name] = (envs, policy, make_optimizer(policy, cfg.lr), carry, RunningNormalizer(()))
    return setups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,67,25", help="n per LRU layer, one per policy")
    parser.add_argument("--mlp", action="store_true", help="also time the MLP policy")
    parser.add_argument("--reps", type=int, default=5, help="timed iterations per policy")
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--physics-threads", type=int, default=1, help="see envs/physics.py")
    args = parser.parse_args()
    configure_process(1)
    cfg = preset_for(args.env)
    variants = policy_variants([int(n) for n in args.sizes.split(",")], args.mlp)
    setups = make_setups(args.env, variants, cfg, args.physics_threads)

    times = {name: {phase: [] for phase in PHASES} for name in setups}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for name, (envs, policy, optimizer, carry, reward_norm) in setups.items():
            result = iteration(policy, optimizer, envs, carry, reward_norm, cfg)
            if rep:
                for phase, seconds in result.seconds.items():
                    times[name][phase].append(seconds)

    threads = f"{args.physics_threads} physics thread(s)"
    print(f"machine: {cpu_model()}, {args.env}, 1 torch thread, {threads}, median of {args.reps}")
    print("\n| policy | " + " | ".join(PHASES) + " | total ms | vs first |")
    print("|---|" + "---:|" * (len(PHASES) + 2))
    first = None
    for name, phases in times.items():
        medians = [1000 * np.median(phases[p]) for p in PHASES]
        total = sum(medians)
        first = first or total
        cells = " | ".join(f"{m:.0f}" for m in medians)
        print(f"| {name} | {cells} | {total:.0f} | {total / first:.3f} |")


if __name__ == "__main__":
    main()
