"""Closed-loop parity of an exported policy against its torch original.

``B`` independent envs run for ``steps`` steps. At every step the torch policy
(``ActorCritic.predict``, deterministic, with ``episode_start`` flags) and the ONNX policy
(``OnnxPolicy.act``, reset on the same flags) see the same observations; the ONNX action
drives the envs, so the trajectory is the one a deployed controller would produce, and
episodes end and restart along the way (state resets are part of what is checked).

Actions must agree elementwise within ``|onnx - torch| <= atol + rtol * |torch|`` (the
``np.allclose`` rule) at every step, or ``ParityError`` is raised with the step, the env,
and the errors. Imports torch and gymnasium: a development-side tool, not for the device.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import numpy as np
import torch

from export.runtime import OnnxPolicy
from policies.actor_critic import ActorCritic


class ParityError(RuntimeError):
    """The ONNX policy's actions differ from the torch policy's beyond the tolerance."""


def _gym_make(env_id: str):
    import gymnasium

    return gymnasium.make(env_id)


def check_parity(
    policy: ActorCritic,
    onnx_path: str | os.PathLike,
    env_id: str,
    steps: int = 500,
    batch: int = 1,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    make_env: Callable[[str], object] | None = None,
    provider: str = "CPUExecutionProvider",
) -> dict:
    """Run ``batch`` envs for ``steps`` steps with both policies; raise on any mismatch.

    Args:
        policy: the torch policy the file was exported from (moved to CPU on a copy if needed).
        onnx_path: the exported file.
        env_id: environment id passed to ``make_env``.
        steps: control steps per env.
        batch: envs stepped together (``OnnxPolicy(batch_size=batch)``, one torch batch).
        seed: env ``k`` is first reset with ``seed + k``; later resets continue its RNG.
        rtol, atol: elementwise tolerance on actions.
        make_env: ``env_id -> gymnasium.Env`` (default ``gymnasium.make``; pass
            ``envs.make_env`` for this project's POMDP ids).
        provider: ORT execution provider.

    Returns:
        ``{"env_id", "steps", "batch", "episodes_started", "max_abs_err", "max_rel_err",
        "max_state_abs_err", "rtol", "atol"}``. ``max_rel_err`` is ``|Δ| / (|torch| + atol)``
        (finite where the torch action is 0); ``max_state_abs_err`` compares the recurrent
        states (reported, not enforced: actions are the contract).

    Raises:
        ParityError: at the first step where an action is out of tolerance.
    """
    make_env = make_env or _gym_make
    if next(policy.parameters()).device.type != "cpu":
        policy = copy.deepcopy(policy).cpu()
    onnx_policy = OnnxPolicy(onnx_path, provider=provider, batch_size=batch)
    if onnx_policy.obs_dim != policy.obs_dim or onnx_policy.act_dim != policy.act_dim:
        raise ParityError(
            f"{onnx_path} has obs/act dims {onnx_policy.obs_dim}/{onnx_policy.act_dim}, "
            f"the policy {policy.obs_dim}/{policy.act_dim}: not exported from this policy"
        )
    envs = [make_env(env_id) for _ in range(batch)]
    # One torch thread: at these sizes more threads only add synchronisation, and on a
    # busy machine they cost 40x (13 ms instead of 0.3 ms per step measured on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        obs = np.stack([env.reset(seed=seed + k)[0] for k, env in enumerate(envs)])
        start = np.ones(batch, dtype=bool)
        state = None
        episodes = batch
        max_abs = max_rel = max_state = 0.0
        for t in range(steps):
            ref, state = policy.predict(obs, state, episode_start=start, deterministic=True)
            onnx_policy.reset(start)
            got = onnx_policy.act(obs)

            err = np.abs(got.astype(np.float64) - ref)
            bad = err > atol + rtol * np.abs(ref)
            if bad.any():
                where = f"{env_id}: action mismatch at step {t}"
                message = _mismatch(where, got, ref, err, bad, atol, rtol, max_state)
                raise ParityError(message + _drift_hint(policy, max_state))
            max_abs = max(max_abs, float(err.max()))
            max_rel = max(max_rel, float((err / (np.abs(ref) + atol)).max()))
            if onnx_policy.recurrent:
                torch_state = state.actor.numpy()
                max_state = max(max_state, float(np.abs(onnx_policy.state - torch_state).max()))

            for k, env in enumerate(envs):
                o, _, terminated, truncated, _ = env.step(got[k])
                start[k] = terminated or truncated
                if start[k]:
                    o, _ = env.reset()
                    episodes += 1
                obs[k] = o
    finally:
        torch.set_num_threads(threads)
        for env in envs:
            env.close()
    return {
        "env_id": env_id,
        "steps": steps,
        "batch": batch,
        "episodes_started": episodes,
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "max_state_abs_err": max_state,
        "rtol": rtol,
        "atol": atol,
    }


def _mismatch(
    where: str,
    got: np.ndarray,
    ref: np.ndarray,
    err: np.ndarray,
    bad: np.ndarray,
    atol: float,
    rtol: float,
    max_state: float,
) -> str:
    """What the first out-of-tolerance element of one step is, and how many there are."""
    k, j = (int(i) for i in np.argwhere(bad)[0])
    return (
        f"{where}, env {k}, action dim {j}: onnx {got[k, j]:.8g} vs torch {ref[k, j]:.8g} "
        f"(abs err {err[k, j]:.3g}, max abs err this step {err.max():.3g}, tolerance atol "
        f"{atol} + rtol {rtol}·|torch|); {int(bad.sum())} of {bad.size} elements out of "
        f"tolerance; max state abs err so far {max_state:.3g}"
    )


def _drift_hint(policy: ActorCritic, max_state_err: float) -> str:
    """Explain the one benign cause of a mismatch: float32 rounding integrated by |λ| ≈ 1."""
    if policy.policy_type != "ssm" or max_state_err == 0.0:
        return ""
    with torch.no_grad():
        radius = max(float(b.lru.eigenvalues().abs().max()) for b in policy.actor.blocks)
    if radius < 0.99:
        return ""
    return (
        f". The largest |λ| is {radius:.5f}: each step's float32 rounding (~1 ulp of the state, "
        f"different in torch and ONNX Runtime) is integrated over ~{1 / (1 - radius):.0f} "
        f"steps, so state errors of 1e-5 can be float32 noise rather than an export bug. Check "
        f"a short rollout or a looser atol before suspecting the graph"
    )
