"""The batched locomotion step against Gymnasium's ``SyncVectorEnv``, side by side.

    python benchmarks/env_step.py [--envs Hopper-v5,Ant-v5] [--num-envs 8] [--steps 200]
        [--rounds 5]

(default: the six batched tasks)

Per task, both vector envs (SAME_STEP autoreset, the same seeds and actions: uniform in
±0.4 of the action range, so Humanoid and Ant stay up for a while) step ``--steps``
times in turn, ``--rounds`` rounds; the figure is each one's fastest round in µs per
vector step, and their ratio (Gymnasium / batched). One thread, no physics threads.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

from envs import make_env
from envs.vector import SameStepSyncVectorEnv
from export.bench import cpu_model

TASKS = "Hopper-v5,Walker2d-v5,HalfCheetah-v5,Swimmer-v5,Ant-v5,Humanoid-v5"


def time_task(env_id: str, num_envs: int, steps: int, rounds: int) -> dict[str, float]:
    fns = [lambda: make_env(env_id) for _ in range(num_envs)]
    envs = {
        "batched": SameStepSyncVectorEnv(fns, batched=True),
        "gymnasium": gym.vector.SyncVectorEnv(
            fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        ),
    }
    high = envs["gymnasium"].single_action_space.high
    rng = np.random.default_rng(0)
    actions = (rng.uniform(-0.4, 0.4, (steps, num_envs, len(high))) * high).astype(np.float32)
    best = {name: float("inf") for name in envs}
    for env in envs.values():
        env.reset(seed=0)
    for _ in range(rounds):
        for name, env in envs.items():
            start = time.perf_counter()
            for action in actions:
                env.step(action)
            best[name] = min(best[name], (time.perf_counter() - start) / steps * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default=TASKS)
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{cpu_model()}, {args.num_envs} envs, µs per vector step (fastest of {args.rounds})")
    print("| task | batched | Gymnasium SyncVectorEnv | Gymnasium / batched |")
    print("|---|---:|---:|---:|")
    for env_id in args.envs.split(","):
        best = time_task(env_id, args.num_envs, args.steps, args.rounds)
        ratio = best["gymnasium"] / best["batched"]
        print(f"| {env_id} | {best['batched']:.0f} | {best['gymnasium']:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
