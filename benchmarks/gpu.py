"""The GPU check of ``--device cuda``, one command, a few minutes on a GPU:

    python benchmarks/gpu.py [--steps 50000] [--reps 3] [--repeats 7]

1. **train**: Hopper-v5, ``--steps`` env steps with ``device="cuda"`` (the preset's
   8 envs x 256 steps), env steps/s over the run after a warm-up iteration (Triton's
   compilation);
2. **update per iteration, CPU vs CUDA**: rollout, critic pass, GAE and update of one
   iteration (``benchmarks/phases.py``'s set-ups), n = 128 and n = 25, median of
   ``--reps`` after a warm-up, one torch thread;
3. **scan**: forward+backward of ``linear_scan``'s sequential / parallel / Triton
   backends, T in {256, 1024, 4096}, batch 64, N = 128 complex
   (``benchmarks/scan.py``'s CUDA rows);
4. **checks**: a short run with in-training compression on CUDA, its checkpoint loaded
   on the CPU, and ``--resume`` of it with ``device="cpu"``.

Prints Markdown with the GPU's name. Without CUDA it prints one line and exits 0. Not
run by the tests.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ENV = "Hopper-v5"
DEVICE = "cuda"  # (set to "cpu" only to dry-run the code paths without a GPU)


def train_row(steps: int) -> list[str]:
    """Env steps/s of a ``device="cuda"`` run (rollout on the CPU, update on the GPU)."""
    from compressm_rl.runs import TrainConfig
    from compressm_rl.train import train

    config = TrainConfig.from_dict(
        dict(env_id=ENV, total_steps=steps, device=DEVICE, checkpoint_every=10_000)
    )
    timed_steps = (config.ppo.num_iterations - 1) * config.ppo.steps_per_iteration
    with tempfile.TemporaryDirectory() as out:
        train(config, out, progress=False, max_iterations=1)  # warm-up: Triton compiles
        start = time.perf_counter()
        train(config, out, resume=True, progress=False)
        seconds = time.perf_counter() - start
    return [
        f"| {ENV}, {timed_steps:,} steps after 1 warm-up iteration, device {DEVICE} "
        f"| {timed_steps / seconds:,.0f} env steps/s | {seconds:.1f} s |"
    ]


def phase_rows(sizes: list[int], reps: int) -> list[str]:
    """One iteration's phases on the CPU and on CUDA, per policy size (ms, medians)."""
    from phases import make_setups, policy_variants

    from compressm_rl.rl import iteration, make_optimizer, preset_for
    from compressm_rl.rl.iteration import PHASES

    cfg = preset_for(ENV)
    variants = policy_variants(sizes, mlp=False)
    rows = [
        "| policy | device | " + " | ".join(PHASES) + " | total ms | update CPU/CUDA |",
        "|---|---|" + "---:|" * (len(PHASES) + 2),
    ]
    for name, setup in make_setups(ENV, variants, cfg).items():
        envs, policy, _, carry, reward_norm = setup
        medians = {}
        for device in ("cpu", DEVICE):
            policy.to(device)
            optimizer = make_optimizer(policy, cfg.lr)  # after the move: state on the device
            times = {p: [] for p in PHASES}
            for rep in range(reps + 1):  # rep 0 warms up
                result = iteration(policy, optimizer, envs, carry, reward_norm, cfg)
                if device == "cuda":
                    torch.cuda.synchronize()
                if rep:
                    for phase, seconds in result.seconds.items():
                        times[phase].append(seconds)
            medians[device] = {p: 1000 * float(np.median(times[p])) for p in PHASES}
        for device, ms in medians.items():
            ratio = medians["cpu"]["update"] / medians[DEVICE]["update"]
            cells = " | ".join(f"{ms[p]:.0f}" for p in PHASES)
            last = f"{ratio:.1f}x" if device == DEVICE else ""
            rows.append(f"| {name} | {device} | {cells} | {sum(ms.values()):.0f} | {last} |")
        envs.close()
    return rows


def scan_rows(repeats: int) -> list[str]:
    from scan import bench_cuda

    return bench_cuda(repeats)


def check_rows() -> list[str]:
    """Compression on CUDA, the checkpoint on the CPU, ``--resume`` with device cpu."""
    from compressm_rl.runs import EventLog, TrainConfig, load_checkpoint, load_policy
    from compressm_rl.train import train

    ppo = dict(num_envs=8, rollout_steps=256, seq_len=64, epochs=2, minibatches=4)
    config = TrainConfig.from_dict(
        dict(
            env_id=ENV,
            total_steps=4 * 2048,
            device=DEVICE,
            state_dim=64,
            ppo=ppo,
            compression=dict(tol=0.2, at=[0.25, 0.5], max_kl=10.0, max_output_error=10.0),
        )
    )
    rows = ["| check | result |", "|---|---|"]
    with tempfile.TemporaryDirectory() as out:
        train(config, out, progress=False, max_iterations=3)
        events = EventLog(Path(out)).read()
        state = load_checkpoint(out, DEVICE)
        dims = state.policy.actor.state_dims
        rows.append(
            f"| compression in training on CUDA | {len(events)} events, actor n = {dims}, "
            f"params on {state.policy.log_std.device} |"
        )
        policy, _ = load_policy(out)  # on the CPU
        action, _ = policy.predict(np.zeros(policy.obs_dim))
        rows.append(f"| CUDA checkpoint loaded on the CPU | action {np.round(action, 3)} |")
        train(replace(config, device="cpu"), out, resume=True, progress=False)
        done = load_checkpoint(out)
        rows.append(
            f"| --resume with device cpu | step {done.global_step:,}, "
            f"config device {done.config.device} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000, help="env steps of the train row")
    parser.add_argument("--sizes", default="128,25", help="n per LRU layer of the phase rows")
    parser.add_argument("--reps", type=int, default=3, help="timed iterations per phase row")
    parser.add_argument("--repeats", type=int, default=7, help="timed scans per scan row")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False): skipped")
        return 0
    sys.path.insert(0, str(Path(__file__).parent))  # phases.py, scan.py
    from compressm_rl.rl.process import configure_process
    from export.bench import cpu_model

    configure_process(1)
    props = torch.cuda.get_device_properties(0)
    print(
        f"# GPU check: {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB), "
        f"CPU {cpu_model()}, torch {torch.__version__}, 1 torch thread\n"
    )
    print("## Training, device cuda\n\n| run | throughput | wall |\n|---|---:|---:|")
    print("\n".join(train_row(args.steps)), flush=True)
    print(f"\n## One iteration, CPU vs CUDA ({ENV}, ms, median of {args.reps})\n")
    print("\n".join(phase_rows([int(n) for n in args.sizes.split(",")], args.reps)), flush=True)
    print(f"\n## Scan forward+backward, batch 64, N = 128 (median of {args.repeats})\n")
    scan_rows(args.repeats)  # prints its rows as it goes
    print("\n## Checks\n")
    print("\n".join(check_rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
