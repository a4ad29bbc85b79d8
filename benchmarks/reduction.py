"""Cost of one reduction of every LRU layer of a Hopper-sized SSM policy.

    OPENBLAS_NUM_THREADS=1 python benchmarks/reduction.py [--state-dim 128] [--tol 0.1]

Actor and critic, 2 layers each, n = 128, H = 64 (random weights: the cost does not
depend on training). Times the maths and surgery alone, then with both guards (each
layer's output error on 8 x 256 recorded steps, the actor's KL), median of 3.
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


def one_reduction(state_dim: int, tol: float, guards: bool) -> float:
    torch.manual_seed(0)
    policy = ActorCritic(11, 3, -np.ones(3), np.ones(3), state_dims=[state_dim, state_dim])
    obs = torch.randn(8, 256, 11) if guards else None
    reset = torch.zeros(8, 256, dtype=torch.bool) if guards else None
    config = CompressionConfig(tol=tol, max_output_error=1e9, max_kl=1e9)
    start = time.perf_counter()
    compress_policy(policy, None, config, policy.initial_state(8), obs, reset)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dim", type=int, default=128)
    parser.add_argument("--tol", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
    )
    for guards in (False, True):
        times = sorted(one_reduction(args.state_dim, args.tol, guards) for _ in range(3))
        label = "with guards" if guards else "maths + surgery"
        print(f"4 layers, n = {args.state_dim}, tol {args.tol}, {label}: {times[1]:.3f} s")


if __name__ == "__main__":
    main()
