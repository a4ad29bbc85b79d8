"""Training throughput, side by side in one run: this project's SSM and MLP policies vs
stable-baselines3 PPO (MLP) and sb3-contrib RecurrentPPO (LSTM).

    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/train.py [--iterations 4] [--rounds 3] [--physics-threads 2]

Same set-up for all: Hopper-v5, 8 envs (SyncVectorEnv / DummyVecEnv), 256-step
rollouts (2048 env steps per iteration), 10 epochs, 4 minibatches per epoch (SB3's
batch_size = 512), one torch thread. Figures are env steps/s over whole iterations
(rollout + update) after one warm-up iteration, the median over ``--rounds`` rounds
that each time every trainer in turn. sb3 is a benchmark-only extra. ``--physics-threads
K`` adds our SSM with the envs' ``mj_step`` on K threads (``envs/physics.py``): what a
user whose training process has K cores gets; SB3's answer there is ``SubprocVecEnv``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from compressm_rl.rl.process import configure_process
from export.bench import cpu_model

ENV = "Hopper-v5"
N_ENVS, N_STEPS, EPOCHS, BATCH = 8, 256, 10, 512
PER_ITER = N_ENVS * N_STEPS


def ours(policy: str, iterations: int, physics_threads: int = 1) -> float:
    from compressm_rl.runs import TrainConfig
    from compressm_rl.train import train

    config = TrainConfig.from_dict(
        dict(
            env_id=ENV,
            total_steps=(iterations + 1) * PER_ITER,
            policy=policy,
            ppo={"num_envs": N_ENVS, "rollout_steps": N_STEPS, "epochs": EPOCHS, "minibatches": 4},
            checkpoint_every=10_000,
            physics_threads=physics_threads,
        )
    )
    with tempfile.TemporaryDirectory() as out:
        train(config, out, progress=False, max_iterations=1)  # warm-up, then resume timed
        start = time.perf_counter()
        train(config, out, resume=True, progress=False)
        return iterations * PER_ITER / (time.perf_counter() - start)


def sb3(recurrent: bool, iterations: int) -> float:
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(ENV, n_envs=N_ENVS, seed=0)
    if recurrent:
        from sb3_contrib import RecurrentPPO

        model = RecurrentPPO(
            "MlpLstmPolicy", env, n_steps=N_STEPS, batch_size=BATCH, n_epochs=EPOCHS, seed=0
        )
    else:
        from stable_baselines3 import PPO

        model = PPO("MlpPolicy", env, n_steps=N_STEPS, batch_size=BATCH, n_epochs=EPOCHS, seed=0)
    model.learn(PER_ITER)  # warm-up
    start = time.perf_counter()
    model.learn(iterations * PER_ITER, reset_num_timesteps=False)
    return iterations * PER_ITER / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4, help="timed PPO iterations each")
    parser.add_argument("--lstm-iterations", type=int, default=1, help="RecurrentPPO is slow")
    parser.add_argument("--rounds", type=int, default=3, help="median over rounds")
    parser.add_argument("--physics-threads", type=int, default=1, help="> 1 adds an SSM row")
    args = parser.parse_args()
    configure_process(1)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread")
    trainers = {
        "compressm-rl SSM (2 LRU layers, n=128, H=64)": lambda: ours("ssm", args.iterations),
        "compressm-rl MLP (64-64)": lambda: ours("mlp", args.iterations),
        "SB3 PPO MLP (64-64)": lambda: sb3(False, args.iterations),
        "sb3-contrib RecurrentPPO (LSTM 256)": lambda: sb3(True, args.lstm_iterations),
    }
    if args.physics_threads > 1:
        name = f"compressm-rl SSM, {args.physics_threads} physics threads"
        trainers[name] = lambda: ours("ssm", args.iterations, args.physics_threads)
    # Rounds, each timing every trainer in turn: this VM's speed drifts by tens of
    # percent over minutes, so one pass per trainer compares different machines.
    runs: dict[str, list[float]] = {name: [] for name in trainers}
    for round_ in range(args.rounds):
        for name, run in trainers.items():
            runs[name].append(run())
        print(f"round {round_ + 1}: " + ", ".join(f"{v[-1]:,.0f}" for v in runs.values()))
    rows = {name: float(np.median(values)) for name, values in runs.items()}
    ref = rows["SB3 PPO MLP (64-64)"]
    lstm = rows["sb3-contrib RecurrentPPO (LSTM 256)"]
    print("\n| trainer | env steps/s | vs SB3 PPO MLP | vs RecurrentPPO |")
    print("|---|---:|---:|---:|")
    for name, sps in rows.items():
        print(f"| {name} | {sps:,.0f} | {sps / ref:.2f}x | {sps / lstm:.1f}x |")


if __name__ == "__main__":
    main()
