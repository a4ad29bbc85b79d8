"""In-training compression against its baselines, side by side (issue 4).

    python benchmarks/compression.py [--envs Hopper-v5,Hopper-v5-P] [--seeds 0,1]
        [--steps 1000000] [--tol 0.15] [--at 0.02,0.04,0.06,0.08]
        [--out benchmarks/out/compression]

Per env and seed, four policies:
1. uncompressed (n = 128 per layer),
2. compressed in training (tolerance ``--tol`` at the fractions ``--at`` of training),
3. small from scratch at (2)'s final actor sizes,
4. post-training compression of (1) to those sizes (no fine-tuning).
Reports deterministic return (10 episodes), final per-layer n, wall-clock training time
and training env steps/s after the last reduction. Runs already in ``--out`` are reused,
so the script can be stopped and restarted.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from compressm_rl.evaluate import evaluate_policy
from compressm_rl.posthoc import compress_run
from compressm_rl.runs import METRICS, MetricsLog, TrainConfig, load_checkpoint, load_policy
from compressm_rl.train import train


def run_once(config: TrainConfig, run_dir: Path) -> None:
    """Train unless a finished run is already there (resume an unfinished one)."""
    if (run_dir / "checkpoint.pt").exists():
        done = load_checkpoint(run_dir)["global_step"] >= config.preset().total_steps - (
            config.preset().num_envs * config.preset().rollout_steps
        )
        if not done:
            train(config, run_dir, resume=True, progress=False)
        return
    train(config, run_dir, progress=False)


def summarise(run_dir: Path, env_id: str, seed: int, label: str) -> dict:
    policy, meta = load_policy(run_dir)
    returns = evaluate_policy(policy, env_id, episodes=10, seed=10_000 + seed)
    rows = MetricsLog(run_dir / METRICS).read()
    events_path = run_dir / "compression.json"
    last_reduction = 0
    if events_path.exists():
        last_reduction = max((e["step"] for e in json.loads(events_path.read_text())), default=0)
    after = [float(r["steps_per_s"]) for r in rows if int(r["global_step"]) > last_reduction]
    return {
        "label": label,
        "env": env_id,
        "seed": seed,
        "return": float(returns.mean()),
        "return_std": float(returns.std()),
        "actor_n": policy.actor.state_dims,
        "critic_n": policy.critic.state_dims,
        "wall_s": float(rows[-1]["wall_time"]) if rows else float("nan"),
        "steps_per_s_after": float(np.mean(after)) if after else float("nan"),
        "global_step": meta["global_step"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="Hopper-v5,Hopper-v5-P")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tol", type=float, default=0.15)
    parser.add_argument("--at", default="0.02,0.04,0.06,0.08", help="reduction points")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/compression"))
    args = parser.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    results = []
    for env_id in args.envs.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            base = args.out / f"{env_id}-s{seed}"
            full = TrainConfig(env_id=env_id, total_steps=args.steps, seed=seed)
            run_once(full, base / "1-full")
            compressed = TrainConfig(
                env_id=env_id,
                total_steps=args.steps,
                seed=seed,
                compression={"tol": args.tol, "at": [float(f) for f in args.at.split(",")]},
            )
            run_once(compressed, base / "2-compressed")
            final_dims = load_policy(base / "2-compressed")[0].actor.state_dims
            small = TrainConfig(
                env_id=env_id, total_steps=args.steps, seed=seed, state_dims=final_dims
            )
            run_once(small, base / "3-small")
            if not (base / "4-posthoc" / "checkpoint.pt").exists():
                compress_run(base / "1-full", base / "4-posthoc", state_dims=final_dims)
            for label in ("1-full", "2-compressed", "3-small", "4-posthoc"):
                results.append(summarise(base / label, env_id, seed, label))
                print(json.dumps(results[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        "\n| env | policy | seeds | return (mean ± std over seeds) | final actor n | wall s | steps/s after last reduction |"
    )
    print("|---|---|---:|---:|---|---:|---:|")
    for env_id in args.envs.split(","):
        for label in ("1-full", "2-compressed", "3-small", "4-posthoc"):
            rows = [r for r in results if r["env"] == env_id and r["label"] == label]
            rets = np.array([r["return"] for r in rows])
            print(
                f"| {env_id} | {label} | {len(rows)} | {rets.mean():.0f} ± {rets.std():.0f} | "
                f"{' / '.join(str(r['actor_n']) for r in rows)} | "
                f"{np.mean([r['wall_s'] for r in rows]):.0f} | "
                f"{_fmt(np.mean([r['steps_per_s_after'] for r in rows]))} |"
            )


def _fmt(x: float) -> str:
    return "-" if np.isnan(x) else f"{x:.0f}"


if __name__ == "__main__":
    main()
