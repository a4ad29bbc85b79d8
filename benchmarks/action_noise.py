"""Deterministic against stochastic return of trained policies, on the same episodes.

    python benchmarks/action_noise.py OUT [OUT ...] [--episodes 20] [--scales 0,0.5,1]

``OUT`` is a ``benchmarks/compression.py`` output directory (``ENV-sSEED/LABEL`` runs).
Each policy plays ``--episodes`` episodes (reset seeds 1000, 1001, ...) per noise scale:
the action is ``clip(mean + scale · std · ε)``, scale 0 the deterministic action, scale 1
the training policy's own noise. The actor is stepped eagerly; ``compression.py``
evaluates through the frozen ``TorchController``, whose float32
rounding can turn a chaotic episode another way (docs/design.md §9). Prints per run the mean return
per scale and the share of steps whose mean action lies outside the bounds, then per
policy label the mean over seeds: whether a method's deterministic return falls below its
stochastic one, and by how much.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from compressm_rl.runs import evaluate, load_policy
from export.bench import cpu_model
from policies.actor_critic import ActorCritic


class NoisyController:
    """The trained actor with its action noise scaled by ``scale`` (0: deterministic)."""

    def __init__(self, policy: ActorCritic, scale: float) -> None:
        self.policy, self.scale = policy, scale
        self.std = policy.log_std.detach().exp()
        self.saturated: list[float] = []  # per step: share of mean actions out of bounds

    def reset(self) -> None:
        self.state = self.policy.initial_state(1).actor

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        obs_norm = self.policy.obs_norm(torch.as_tensor(obs, dtype=torch.float32)[None])
        features, self.state = self.policy.actor.step(obs_norm, self.state)
        mean = self.policy.actor_head(features)
        low, high = self.policy.action_low, self.policy.action_high
        self.saturated.append(float(((mean < low) | (mean > high)).float().mean()))
        action = mean + self.scale * self.std * torch.randn_like(mean)
        return torch.maximum(torch.minimum(action, high), low)[0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--scales", default="0,0.5,1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scales = [float(s) for s in args.scales.split(",")]
    by_label: dict[tuple[str, str], list[list[float]]] = defaultdict(list)
    print(f"machine: {cpu_model()}; {args.episodes} episodes per scale, reset seeds from 1000")
    print("\n| run | " + " | ".join(f"return, noise ×{s:g}" for s in scales) + " | saturated |")
    print("|---|" + "---:|" * (len(scales) + 1))
    for out in args.outs:
        for run in sorted(out.glob("*-s*/[1-4]-*")):
            policy, meta = load_policy(run)
            returns, saturated = [], []
            for scale in scales:
                torch.manual_seed(0)
                controller = NoisyController(policy, scale)
                returns.append(
                    float(evaluate(controller, meta["env_id"], args.episodes, 1000).mean())
                )
                saturated.append(np.mean(controller.saturated))
            by_label[(meta["env_id"], run.name)].append(returns)
            cells = " | ".join(f"{r:.0f}" for r in returns)
            print(
                f"| {run.parent.name}/{run.name} | {cells} | {np.mean(saturated):.2f} |", flush=True
            )
    print("\n| env | policy | seeds | " + " | ".join(f"noise ×{s:g}" for s in scales) + " |")
    print("|---|---|---:|" + "---:|" * len(scales))
    for (env_id, label), rows in sorted(by_label.items()):
        means = np.mean(rows, axis=0)
        cells = " | ".join(f"{m:.0f}" for m in means)
        print(f"| {env_id} | {label} | {len(rows)} | {cells} |")


if __name__ == "__main__":
    main()
