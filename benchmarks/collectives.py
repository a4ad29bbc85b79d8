"""What one collective costs on this machine: the price data-parallel PPO pays at every
gradient step.

    python benchmarks/collectives.py [--env Hopper-v5] [--ranks 2] [--calls 300]

Starts ``--ranks`` processes through ``torch.distributed.run`` on 127.0.0.1 (gloo, one
torch thread each), builds the task preset's policy on each and times, per call, the wall
and CPU time (the process's, gloo's threads included; median of 5 blocks of calls) of

- ``average_gradients`` of that policy's gradient buffer: what every gradient step runs,
- an all-reduce of 8 floats: the backend's floor here, whatever the size,
- an all-gather and a broadcast of the gradient's size, for scale.

Then what one iteration spends in its epochs × minibatches gradient all-reduces. The calls
run back to back with the ranks in step: a rank that waits at the all-reduce for a slower
one (in training, the other rank's minibatch took longer) waits on top of these figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from compressm_rl.rl import preset_for
from compressm_rl.rl.distributed import average_gradients, free_loopback_port, init_world
from compressm_rl.rl.ppo import gradient_buffer
from compressm_rl.rl.process import configure_process
from compressm_rl.runs import TrainConfig
from compressm_rl.train import make_policy
from envs import make_vec_env
from export.bench import cpu_model

BLOCKS = 5


def per_call(fn, calls: int) -> tuple[float, float]:
    """Median over ``BLOCKS`` blocks of ``fn``'s wall and CPU milliseconds per call."""
    for _ in range(5):
        fn()
    walls, cpus = [], []
    for _ in range(BLOCKS):
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls // BLOCKS):
            fn()
        walls.append((time.perf_counter() - wall) * 1e3 / (calls // BLOCKS))
        cpus.append((time.process_time() - cpu) * 1e3 / (calls // BLOCKS))
    return float(np.median(walls)), float(np.median(cpus))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300, help="timed calls per collective")
    args = parser.parse_args()
    if "WORLD_SIZE" not in os.environ:  # not a rank yet: start the ranks
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
        command += ["--nproc-per-node", str(args.ranks), "--master-addr", "127.0.0.1"]
        command += ["--master-port", str(free_loopback_port()), __file__, *sys.argv[1:]]
        raise SystemExit(subprocess.call(command))

    configure_process(1)
    world = init_world()
    envs = make_vec_env(args.env, 1, seed=0)
    params = list(make_policy(TrainConfig.from_dict(dict(env_id=args.env)), envs).parameters())
    envs.close()
    grads = gradient_buffer(params).normal_()
    numel = grads.numel()
    tiny, flat = torch.zeros(8), torch.randn(numel)
    gathered = [torch.empty(numel) for _ in range(world.size)]
    rows = {
        f"`average_gradients`, {numel:,} floats": lambda: average_gradients(grads, world),
        "all-reduce, 8 floats": lambda: dist.all_reduce(tiny),
        f"all-gather, {numel:,} floats": lambda: dist.all_gather(gathered, flat),
        f"broadcast, {numel:,} floats": lambda: dist.broadcast(flat, 0),
    }
    timings = {name: per_call(fn, args.calls) for name, fn in rows.items()}
    if world.is_main:
        cfg = preset_for(args.env)
        steps = cfg.epochs * cfg.minibatches
        print(f"\n{cpu_model()}, gloo on 127.0.0.1, {world.size} ranks, {args.env} preset policy\n")
        print("| collective | wall ms a call | CPU ms a call |")
        print("|---|---:|---:|")
        for name, (wall, cpu) in timings.items():
            print(f"| {name} | {wall:.3f} | {cpu:.3f} |")
        wall = next(iter(timings.values()))[0]
        print(
            f"\nOne iteration's {steps} gradient steps ({cfg.epochs} epochs × "
            f"{cfg.minibatches} minibatches): {steps * wall:.0f} ms in all-reduces."
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
