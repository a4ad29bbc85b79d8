"""The batched locomotion step against Gymnasium's ``SyncVectorEnv``, side by side.

    python benchmarks/env_step.py [--envs Hopper-v5,Ant-v5] [--num-envs 8] [--steps 200]
        [--rounds 5] [--threads 2] [--envpool]

(default: the six batched tasks)

Per task, the vector envs (SAME_STEP autoreset, the same seeds and actions: uniform in
±0.4 of the action range, so Humanoid and Ant stay up for a while) step ``--steps``
times in turn, ``--rounds`` rounds; the figure is each one's fastest round in µs per
vector step, and the ratio Gymnasium / batched. ``--threads 2`` adds the batched step
with 2 physics threads. ``--envpool`` adds EnvPool's own vector env (``pip install
envpool``: its own MuJoCo build and reset draws, so not bit-identical; an optional
comparison, not a dependency) with 1 and ``--threads`` worker threads, its batch the
whole vector.
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


def vector_envs(env_id: str, num_envs: int, threads: int, envpool: bool) -> dict:
    """The vector envs to time, by column name."""
    fns = [lambda: make_env(env_id) for _ in range(num_envs)]
    envs = {
        "batched": SameStepSyncVectorEnv(fns, batched=True),
        "gymnasium": gym.vector.SyncVectorEnv(
            fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        ),
    }
    if threads > 1:
        envs[f"batched, {threads} physics threads"] = SameStepSyncVectorEnv(
            fns, batched=True, physics_threads=threads
        )
    if envpool:
        import envpool as pool

        for n in sorted({1, threads}):
            envs[f"EnvPool, {n} thread{'s' * (n > 1)}"] = pool.make_gymnasium(
                env_id, num_envs=num_envs, batch_size=num_envs, num_threads=n, seed=0
            )
    return envs


def time_task(
    env_id: str, num_envs: int, steps: int, rounds: int, threads: int = 1, envpool: bool = False
) -> dict[str, float]:
    envs = vector_envs(env_id, num_envs, threads, envpool)
    high = envs["gymnasium"].single_action_space.high
    rng = np.random.default_rng(0)
    actions = (rng.uniform(-0.4, 0.4, (steps, num_envs, len(high))) * high).astype(np.float32)
    best = {name: float("inf") for name in envs}
    for name, env in envs.items():
        env.reset() if name.startswith("EnvPool") else env.reset(seed=0)  # seeded when made
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
    parser.add_argument("--threads", type=int, default=1, help="also time this many threads")
    parser.add_argument("--envpool", action="store_true", help="also time EnvPool")
    args = parser.parse_args()
    if args.envpool:
        import envpool  # noqa: F401  (missing: one line, before anything is timed)
    print(f"{cpu_model()}, {args.num_envs} envs, µs per vector step (fastest of {args.rounds})")
    header = None
    for env_id in args.envs.split(","):
        best = time_task(env_id, args.num_envs, args.steps, args.rounds, args.threads, args.envpool)
        if header is None:
            header = list(best)
            print(f"| task | {' | '.join(header)} | Gymnasium / batched |")
            print("|---|" + "---:|" * (len(header) + 1))
        ratio = best["gymnasium"] / best["batched"]
        cells = " | ".join(f"{best[name]:.0f}" for name in header)
        print(f"| {env_id} | {cells} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
