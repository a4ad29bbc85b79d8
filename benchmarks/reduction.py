"""Cost of one reduction event (every LRU layer of a Hopper-sized SSM policy), per method.

    OPENBLAS_NUM_THREADS=1 python benchmarks/reduction.py [--state-dim 128] [--tol 0.1]
        [--budget 128] [--heal-steps 50]

Actor and critic, 2 layers each, n = 128, H = 64 (random weights: the cost does not
depend on training). Times the maths and surgery alone, then each compression method
with both guards (each layer's output error on 8 x 256 recorded steps, the actor's KL),
median of 3: energy cut per layer (``tol``), a state budget per part with global or
uniform allocation, data-weighted Gramians, and cut-and-heal.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from compressm_rl.compression import CompressionConfig, compress_policy
from export.bench import cpu_model
from policies.actor_critic import ActorCritic


def one_reduction(state_dim: int, config: CompressionConfig, guards: bool) -> float:
    torch.manual_seed(0)
    policy = ActorCritic(11, 3, -np.ones(3), np.ones(3), state_dims=[state_dim, state_dim])
    obs = torch.randn(8, 256, 11) if guards else None
    reset = torch.zeros(8, 256, dtype=torch.bool) if guards else None
    start = time.perf_counter()
    compress_policy(policy, None, config, policy.initial_state(8), obs, reset, events_left=4)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dim", type=int, default=128)
    parser.add_argument("--tol", type=float, default=0.1)
    parser.add_argument("--budget", type=int, default=128, help="states per part")
    parser.add_argument("--heal-steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
    )
    loose = dict(max_output_error=1e9, max_kl=1e9)  # every cut goes through: cost, not luck
    methods = [
        ("maths + surgery", CompressionConfig(tol=args.tol), False),
        (f"tol {args.tol}, with guards", CompressionConfig(tol=args.tol, **loose), True),
        (f"budget {args.budget} global", CompressionConfig(budget=args.budget, **loose), True),
        (
            f"budget {args.budget} uniform",
            CompressionConfig(budget=args.budget, allocation="uniform", **loose),
            True,
        ),
        (
            f"budget {args.budget} global, data Gramians",
            CompressionConfig(budget=args.budget, gramian="data", **loose),
            True,
        ),
        (
            f"budget {args.budget} global, heal {args.heal_steps} steps",
            CompressionConfig(budget=args.budget, heal_steps=args.heal_steps, **loose),
            True,
        ),
    ]
    for label, config, guards in methods:
        times = sorted(one_reduction(args.state_dim, config, guards) for _ in range(3))
        print(f"4 layers, n = {args.state_dim}, {label}: {times[1]:.3f} s")


if __name__ == "__main__":
    main()
