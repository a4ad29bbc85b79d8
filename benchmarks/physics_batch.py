"""MuJoCo's own batch API against the home-made thread pool (``envs.physics``), A/B in one
process, rounds interleaved.

    python benchmarks/physics_batch.py [--sizes 8,16] [--rounds 15] [--steps 40]

N Hopper-v5 envs (``gym.make``, frame_skip 4, reset with seeds 0..N-1), the same uniform
random actions for every variant, each variant on its own copies of the envs' states:

- ``loop``: ``mujoco.mj_step(model, data, nstep=4)`` env by env in Python (the reference);
- ``pool K``: ``envs.physics.ParallelPhysics`` on K threads (K = 1: its C loop, no helper);
- ``batch K``: ``mujoco.batch.Batch(nthread=K)`` with ``set_models`` (each env's own
  ``MjModel``, as the randomized dynamics need), state kept in the batch's rows:
  ``batch.ctrl[:] = a; batch.step(nstep=4)``;
- ``batch+sync K``: the same, plus what ``LocomotionStep`` would have to add, since the
  envs' ``MjData`` stay the state Gymnasium resets, the dynamics push and a sub-env steps
  on its own: each env's integration state copied into its row before the step
  (``mj_getState``) and back after it (``mj_setState``);
- ``rollout K``: ``mujoco.rollout.Rollout(nthread=K).rollout`` of one control step
  (``nstep=4``, the control held), from each env's full physics state (which does not
  carry the solver's warm start: ``initial_warmstart`` is passed, but the rollout gives no
  warm start back, so it is kept from the env's data and goes stale).

Each round runs ``--steps`` control steps of every variant in turn (the order rotated per
round); the table is the median µs per control step over the rounds, and each variant's
ratio to the loop and to the pool at the same K (p50 of the per-round ratios, so that
machine load shared by a round cancels). Bit-identity: fresh copies of the same reset
states, 200 control steps of each variant with the same actions, ``qpos``/``qvel``
compared exactly with the loop's.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import gymnasium as gym
import mujoco
import numpy as np
from mujoco import batch as mj_batch
from mujoco import rollout as mj_rollout

from envs.physics import ParallelPhysics, _build
from export.bench import cpu_model

FRAME_SKIP = 4
STATE = mujoco.mjtState.mjSTATE_INTEGRATION
FULL = mujoco.mjtState.mjSTATE_FULLPHYSICS


def make_envs(n: int) -> list[gym.Env]:
    envs = [gym.make("Hopper-v5") for _ in range(n)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
        assert env.unwrapped.frame_skip == FRAME_SKIP
    return envs


def copies(envs: list[gym.Env]) -> list[tuple[mujoco.MjModel, mujoco.MjData]]:
    """Each env's own model, and a copy of its data (its state, warm start included)."""
    sims = []
    for env in envs:
        model, data = env.unwrapped.model, env.unwrapped.data
        sims.append((model, mujoco.MjData(model)))
        mujoco.mj_copyData(sims[-1][1], model, data)
    return sims


class Loop:
    def __init__(self, sims, threads):
        self.sims = sims

    def __call__(self, actions):
        for (model, data), a in zip(self.sims, actions, strict=True):
            data.ctrl[:] = a
            mujoco.mj_step(model, data, nstep=FRAME_SKIP)

    def state(self):
        return [(d.qpos.copy(), d.qvel.copy()) for _, d in self.sims]


class Pool(Loop):
    def __init__(self, sims, threads):
        self.sims = sims
        self.pool = ParallelPhysics(_build(), sims, threads)

    def __call__(self, actions):
        for (_, data), a in zip(self.sims, actions, strict=True):
            data.ctrl[:] = a
        self.pool.step(FRAME_SKIP)


class BatchNative:
    """State in the batch's rows: what the batch API is built for."""

    def __init__(self, sims, threads):
        models = [m for m, _ in sims]
        self.batch = mj_batch.Batch(models[0], nsim=len(sims), nthread=threads)
        self.batch.set_models(models)
        for i, (model, data) in enumerate(sims):
            mujoco.mj_getState(model, data, self.batch.state[i], STATE)
        self.ctrl, self.qpos, self.qvel = (self.batch.bind(f) for f in ("ctrl", "qpos", "qvel"))

    def __call__(self, actions):
        self.ctrl[:] = actions
        self.batch.step(nstep=FRAME_SKIP)

    def state(self):
        return [(self.qpos[i].copy(), self.qvel[i].copy()) for i in range(len(self.qpos))]


class BatchSync(Loop):
    """The envs' MjData stay the state: copied into the rows and back at every step."""

    def __init__(self, sims, threads):
        self.sims = sims
        models = [m for m, _ in sims]
        self.batch = mj_batch.Batch(models[0], nsim=len(sims), nthread=threads)
        self.batch.set_models(models)
        self.rows = self.batch.state

    def __call__(self, actions):
        rows = self.rows
        for i, (model, data) in enumerate(self.sims):
            data.ctrl[:] = actions[i]
            mujoco.mj_getState(model, data, rows[i], STATE)
        self.batch.step(nstep=FRAME_SKIP)
        for i, (model, data) in enumerate(self.sims):
            mujoco.mj_setState(model, data, rows[i], STATE)


class Rollout(Loop):
    """One control step as a rollout of FRAME_SKIP substeps, the control held."""

    def __init__(self, sims, threads):
        self.sims = sims
        self.models = [m for m, _ in sims]
        self.datas = [mujoco.MjData(self.models[0]) for _ in range(threads)]
        self.runner = mj_rollout.Rollout(nthread=threads)
        n, nstate = len(sims), mujoco.mj_stateSize(self.models[0], FULL)
        self.initial = np.empty((n, nstate))
        self.warmstart = np.empty((n, self.models[0].nv))
        self.out = np.empty((n, FRAME_SKIP, nstate))

    def __call__(self, actions):
        for i, (model, data) in enumerate(self.sims):
            mujoco.mj_getState(model, data, self.initial[i], FULL)
            self.warmstart[i] = data.qacc_warmstart
        self.runner.rollout(
            self.models,
            self.datas,
            self.initial,
            actions[:, None, :],
            nstep=FRAME_SKIP,
            initial_warmstart=self.warmstart,
            state=self.out,
        )
        for i, (model, data) in enumerate(self.sims):
            mujoco.mj_setState(model, data, self.out[i, -1], FULL)
            data.ctrl[:] = actions[i]


VARIANTS = {
    "loop": (Loop, 1),
    "pool 1": (Pool, 1),
    "pool 2": (Pool, 2),
    "batch 1": (BatchNative, 1),
    "batch 2": (BatchNative, 2),
    "batch+sync 1": (BatchSync, 1),
    "batch+sync 2": (BatchSync, 2),
    "rollout 1": (Rollout, 1),
    "rollout 2": (Rollout, 2),
}


def identity(n: int, steps: int = 200) -> dict[str, bool]:
    envs = make_envs(n)
    actions = np.random.default_rng(1).uniform(-1, 1, (steps, n, 3))
    finals = {}
    for name, (kind, threads) in VARIANTS.items():
        variant = kind(copies(envs), threads)
        for t in range(steps):
            variant(actions[t])
        finals[name] = variant.state()
    ref = finals["loop"]
    return {
        name: all(
            np.array_equal(q, rq) and np.array_equal(v, rv)
            for (q, v), (rq, rv) in zip(state, ref, strict=True)
        )
        for name, state in finals.items()
    }


def timing(n: int, rounds: int, steps: int) -> dict[str, list[float]]:
    envs = make_envs(n)
    actions = np.random.default_rng(2).uniform(-1, 1, (steps * (rounds + 1), n, 3))
    variants = {name: kind(copies(envs), k) for name, (kind, k) in VARIANTS.items()}
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds + 1):  # round 0: warm-up (threads started, caches filled)
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            variant = variants[name]
            start = time.perf_counter()
            for t in range(r * steps, (r + 1) * steps):
                variant(actions[t])
            elapsed = (time.perf_counter() - start) / steps * 1e6
            if r:
                times[name].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8,16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(f"mujoco {mujoco.__version__}, {platform.python_version()}, {cpu_model()}")
    print(f"{len(os.sched_getaffinity(0))} CPUs; Hopper-v5, frame_skip {FRAME_SKIP}")
    print(f"{args.rounds} rounds x {args.steps} control steps, variants interleaved\n")
    for n in (int(s) for s in args.sizes.split(",")):
        same = identity(n)
        times = timing(n, args.rounds, args.steps)
        print(f"N = {n}: µs per control step (p50 over rounds), ratios p50 of per-round ratios")
        print(
            f"  {'variant':<14}{'µs p50':>9}{'min':>9}{'÷ loop':>9}{'÷ pool K':>10}  bit-identical"
        )
        for name, values in times.items():
            k = VARIANTS[name][1]
            to_loop = np.median(np.divide(values, times["loop"]))
            to_pool = np.median(np.divide(values, times[f"pool {k}"]))
            print(
                f"  {name:<14}{np.median(values):>9.0f}{np.min(values):>9.0f}"
                f"{to_loop:>9.2f}{to_pool:>10.2f}  {'yes' if same[name] else 'NO'}"
            )
        print()


if __name__ == "__main__":
    main()
