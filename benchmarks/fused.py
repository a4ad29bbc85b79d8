"""What the fused actor-critic pass, the allocator setting, the batched env step and the
threaded physics buy, A/B in one process.

    python benchmarks/fused.py [--sizes 128,25] [--reps 5] [--env Hopper-v5]

Per policy (n per LRU layer, two layers, H = 64; and the 64-64 MLP), whole PPO
iterations (``compressm_rl.rl.iteration``) with the variants taken in turn, every
repetition, so that all see the same machine load:

- ``autograd``: the update's actor-critic pass in autograd ops (``grouped_forward``
  with the fused pass switched off, and the rollout's step in torch ops: ``fused_pass``),
  glibc's allocator at its static defaults;
- ``fused``: the fused pass (``policies.lru_fused``), allocator at its defaults;
- ``fused + keep``: and freed memory kept for reuse (``keep_freed_memory``);
- ``+ batched envs``: and the envs stepped by one ``envs.locomotion.LocomotionStep``
  instead of one by one, what ``compressm-rl train`` runs;
- ``+ physics threads 2``: and their ``mj_step`` on two threads (``envs.physics``,
  ``--physics-threads 2``). Needs a second idle core to mean anything.

"Defaults" means mmap and trim thresholds of 128 KiB set with ``mallopt`` (once set,
glibc stops adapting them, so both arms are fixed settings). Prints the median per phase
over ``--reps`` (after one warm-up), one torch thread.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from unittest import mock

import numpy as np
from phases import make_setups, policy_variants  # benchmarks/ is on sys.path when run as a script

from compressm_rl.rl import iteration, preset_for
from compressm_rl.rl.iteration import PHASES
from compressm_rl.rl.process import configure_process, keep_freed_memory, set_malloc_thresholds
from envs.locomotion import locomotion_step
from export.bench import cpu_model
from policies import lru_fused


@contextlib.contextmanager
def fused_pass(on: bool) -> Iterator[None]:
    """Off: ``grouped_forward`` (the update) and ``LRUStack.frozen_step`` (the rollout) find
    the kernels unusable, so ``fused=None`` takes the autograd and torch paths, as
    ``fused=False``; on: as shipped (the kernels wherever ``lru_fused.usable``)."""
    if on:
        yield
        return
    with mock.patch.object(lru_fused, "usable", lambda *args, **kwargs: False):
        yield


def set_allocator(keep: bool) -> None:
    """glibc thresholds: 32 MiB / 1 GiB (``keep_freed_memory``) or 128 KiB / 128 KiB."""
    if keep:
        keep_freed_memory()
    else:
        set_malloc_thresholds(128 << 10, 128 << 10)


# name: (fused pass, keep freed memory, batched env step, physics threads)
VARIANTS = {
    "autograd": (False, False, False, 1),
    "fused": (True, False, False, 1),
    "fused + keep": (True, True, False, 1),
    "+ batched envs": (True, True, True, 1),
    "+ physics threads 2": (True, True, True, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,25", help="n per LRU layer, one per policy")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--env", default="Hopper-v5")
    args = parser.parse_args()
    configure_process(1)
    cfg = preset_for(args.env)
    policies = policy_variants([int(n) for n in args.sizes.split(",")], mlp=True)
    setups = make_setups(args.env, policies, cfg)
    batched_steps = {
        (name, threads): locomotion_step(list(setup[0].envs), threads)
        for name, setup in setups.items()
        for threads in (1, 2)
    }

    times = {(p, v): {phase: [] for phase in PHASES} for p in setups for v in VARIANTS}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for name, (envs, policy, optimizer, carry, reward_norm) in setups.items():
            for variant, (fused, keep, batched, threads) in VARIANTS.items():
                if name.startswith("MLP") and variant == "autograd":
                    continue  # the MLP has no LRU pass: "fused" is its baseline
                set_allocator(keep)
                envs.batched_step = batched_steps[(name, threads)] if batched else None
                with fused_pass(fused):
                    result = iteration(policy, optimizer, envs, carry, reward_norm, cfg)
                if rep:
                    for phase, seconds in result.seconds.items():
                        times[(name, variant)][phase].append(seconds)

    print(f"machine: {cpu_model()}, {args.env}, 1 torch thread, median of {args.reps}")
    print("\n| policy | variant | " + " | ".join(PHASES) + " | total ms |")
    print("|---|---|" + "---:|" * (len(PHASES) + 1))
    for (name, variant), phases in times.items():
        if not phases["update"]:
            continue
        medians = [1000 * np.median(phases[p]) for p in PHASES]
        cells = " | ".join(f"{m:.0f}" for m in medians)
        print(f"| {name} | {variant} | {cells} | {sum(medians):.0f} |")


if __name__ == "__main__":
    main()
