"""Closed-loop parity of an exported policy, judged step by step against float64.

``B`` independent envs run for ``steps`` steps, driven by the candidate's actions (the
exported policy: an ``.onnx`` file run by ``OnnxPolicy``, or any object with its
interface), so the trajectory is the one a deployed controller would produce, and
episodes end and restart along the way (state resets are part of what is checked). The
torch float32 policy (``ActorCritic.predict``) sees the same observations and episode
starts and carries its own recurrent state.

What is judged is each step on its own, against a float64 copy of the policy
(``Float64Actor``) stepped from the *same* float32 observation and the *same* incoming
state: the candidate's action and new state against float64 from the candidate's state,
torch's action and new state against float64 from torch's state. Every element must be
within ``atol + rtol * scale`` of float64 at every step, or ``ParityError`` names the step,
the env, the element and whether the action or the state is out. ``scale`` is ``|ref|``
for an action; for a state element it is the size of the complex state it belongs to,
``max(|h'|, |λ|·|h|)`` (``Float64Actor.state_scale``).

Why not compare ONNX with torch directly: both are float32 and round differently, and a
recurrence with |λ| ≈ 1 integrates those differences over ~1/(1 - |λ|) steps, so the
end-to-end difference of two correct implementations reaches ~2e-5 and a fixed tolerance
either fails correct files now and then or is too loose to mean anything. A one-step error
is one step's rounding whatever the history, while a wrong graph (a weight, the state
layout, a reset) is wrong at the step where it acts. The end-to-end torch vs candidate
difference is still reported, as information. Imports torch and gymnasium: a
development-side tool, not for the device.
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
    """An exported policy (or torch float32 itself) differs from the float64 step of the
    same policy from the same state beyond the tolerance."""


class Float64Actor:
    """The actor of ``policy`` in float64, stepped from an explicit flat state.

    A deep copy converted with ``.double()``: the float32 weights widened exactly, the
    normaliser's float64 statistics as they are, every operation in float64 (the LRU
    recurrence in complex128). ``step`` takes raw observations and the actor state in the
    export's layout ``[B, S]`` (per layer ``[Re h (n), Im h (n)]``) and returns float64.
    """

    def __init__(self, policy: ActorCritic) -> None:
        self.policy = copy.deepcopy(policy).cpu().double().eval()
        actor = self.policy.actor
        self.state_dims: list[int] = list(actor.state_dims) if actor.state_size else []
        with torch.no_grad():  # |λ| per flat state element (Re and Im parts alike)
            radii = [block.lru.eigenvalues().abs() for block in getattr(actor, "blocks", [])]
        self.radii = np.concatenate([np.tile(r.numpy(), 2) for r in radii] or [np.zeros(0)])

    @torch.no_grad()
    def step(
        self, obs: np.ndarray, state: np.ndarray, episode_start: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``obs`` ``[B, obs_dim]``, ``state`` ``[B, S]`` (zeroed where ``episode_start``) ->
        deterministic ``(action [B, act_dim], new state [B, S])``, both float64."""
        obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float64))
        state_t = torch.as_tensor(np.asarray(state, dtype=np.float64))
        start = None if episode_start is None else torch.as_tensor(episode_start, dtype=torch.bool)
        policy = self.policy
        action, _, new_state = policy.act(
            policy.obs_norm(obs_t), state_t, start, deterministic=True
        )
        if action.dtype != torch.float64 or new_state.dtype != torch.float64:
            # A float32 cast anywhere on the way would make this reference no better than
            # the float32 paths it judges.
            raise TypeError(f"float64 reference computed in {action.dtype}/{new_state.dtype}")
        return action.numpy(), new_state.numpy()

    def state_scale(self, new_state: np.ndarray, incoming: np.ndarray) -> np.ndarray:
        """The tolerance scale of each element of ``new_state`` ``[B, S]`` (float64, from
        ``incoming``, already zeroed at episode starts): the larger of the modulus
        ``|h'|`` of the complex state the element is a part of, and of the carried term
        ``|λ|·|h|``.

        Not the element itself: rounding is a fraction of the numbers that were added, not
        of their sum. A state rotating by λ trades magnitude between its Re and Im parts,
        so a part passes through 0 while ``|h'|`` is 4; and a fast mode (|λ| = 0.4) whose
        input cancels the carried state leaves ``|h'|`` = 0.01 from terms of 3.5.
        Measured on a trained compressed policy: one-step errors of 5e-6 on such elements,
        half of ``atol`` (1e-5) when judged against the element, 1% against this scale.
        """
        return np.maximum(
            _modulus(new_state, self.state_dims),
            self.radii * _modulus(incoming, self.state_dims),
        )


def _modulus(state: np.ndarray, state_dims: list[int]) -> np.ndarray:
    """``|h|`` of the complex state each element of flat ``[B, S]`` states is a part of."""
    out, offset = np.empty(state.shape, np.float64), 0
    for n in state_dims:
        modulus = np.hypot(state[:, offset : offset + n], state[:, offset + n : offset + 2 * n])
        out[:, offset : offset + n] = out[:, offset + n : offset + 2 * n] = modulus
        offset += 2 * n
    return out


def _state_element(j: int, state_dims: list[int]) -> str:
    """``"layer l, Re h[i]"`` for flat state index ``j``."""
    offset = 0
    for layer, n in enumerate(state_dims):
        if j < offset + 2 * n:
            part, i = ("Re", j - offset) if j < offset + n else ("Im", j - offset - n)
            return f"layer {layer}, {part} h[{i}]"
        offset += 2 * n
    return "?"


class _Judge:
    """One float32 path's one-step check, and the worst figures it has seen."""

    def __init__(self, label: str, atol: float, rtol: float, state_dims: list[int]) -> None:
        self.label, self.atol, self.rtol, self.state_dims = label, atol, rtol, state_dims
        self.max_abs = self.max_rel = self.max_state = self.tolerance_used = 0.0

    def check(
        self,
        where: tuple[str, int],
        what: str,
        got: np.ndarray,
        ref: np.ndarray,
        scale: np.ndarray,
        other_err: np.ndarray,
    ) -> None:
        """Raise ``ParityError`` unless ``|got - ref| <= atol + rtol·scale`` everywhere.

        ``where``: ``(env_id, step)``; ``what``: ``"action"`` or ``"state"``; ``got``
        float32 and ``ref`` float64 ``[B, dim]``; ``other_err``: the other float32 path's
        one-step errors, quoted in the message for comparison.
        """
        if got.size == 0:
            return
        err = np.abs(got.astype(np.float64) - ref)
        allowed = self.atol + self.rtol * scale
        bad = ~(err <= allowed)  # NaN counts as bad
        if bad.any():
            k, j = (int(i) for i in np.argwhere(bad)[0])
            if what == "action":
                element, scale_name = f"action dim {j}", "|float64|"
            else:
                element = f"state element {j} ({_state_element(j, self.state_dims)})"
                scale_name = f"|h| (= {scale[k, j]:.4g})"
            raise ParityError(
                f"{where[0]}: {self.label} {what} mismatch at step {where[1]}, env {k}, "
                f"{element}: {self.label} {got[k, j]:.8g} vs float64 {ref[k, j]:.8g} from the "
                f"same obs and incoming state (abs err {err[k, j]:.3g}, allowed atol "
                f"{self.atol} + rtol {self.rtol}·{scale_name} = {allowed[k, j]:.3g}; "
                f"{int(bad.sum())} of {bad.size} {what} elements out, max abs err this step "
                f"{np.nanmax(err):.3g}; the other float32 path's one-step error there: "
                f"{other_err[k, j]:.3g})"
            )
        self.tolerance_used = max(self.tolerance_used, float((err / allowed).max()))
        if what == "action":
            self.max_abs = max(self.max_abs, float(err.max()))
            self.max_rel = max(self.max_rel, float((err / (np.abs(ref) + self.atol)).max()))
        else:
            self.max_state = max(self.max_state, float(err.max()))


def _gym_make(env_id: str):
    import gymnasium

    return gymnasium.make(env_id)


def check_parity(
    policy: ActorCritic,
    candidate: str | os.PathLike | object,
    env_id: str,
    steps: int = 500,
    batch: int | None = None,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    make_env: Callable[[str], object] | None = None,
    provider: str = "CPUExecutionProvider",
) -> dict:
    """Run ``batch`` envs for ``steps`` steps; raise on any one-step mismatch.

    Args:
        policy: the torch policy the candidate was exported from (copied to CPU if needed).
        candidate: the exported policy: a path to an ``.onnx`` file (run as
            ``OnnxPolicy(path, provider, batch_size=batch)``), or an object with
            ``OnnxPolicy``'s stepping interface: ``reset(mask)``, ``act(obs)``, ``state``
            (a copy, ``[batch_size, S]`` float32), ``recurrent``, ``obs_dim``, ``act_dim``,
            ``batch_size``. It is reset at step 0 and stepped in place.
        env_id: environment id passed to ``make_env``.
        steps: control steps per env.
        batch: envs stepped together; None: 1 for a path, ``candidate.batch_size`` for an
            object (which must equal ``batch`` when both are given).
        seed: env ``k`` is first reset with ``seed + k``; later resets continue its RNG.
        rtol, atol: each action and state element must be within ``atol + rtol·scale`` of
            the float64 step from the same obs and incoming state, ``scale`` being
            ``|ref|`` for an action and ``Float64Actor.state_scale`` (the complex state's
            size) for a state; enforced for the candidate and for torch float32.
        make_env: ``env_id -> gymnasium.Env`` (default ``gymnasium.make``; pass
            ``envs.make_env`` for this project's POMDP ids).
        provider: ORT execution provider (a path candidate only).

    Returns:
        ``{"env_id", "steps", "batch", "episodes_started", "max_abs_err", "max_rel_err",
        "max_state_abs_err", "max_tolerance_used", "max_torch_abs_err",
        "max_torch_state_abs_err", "max_torch_tolerance_used",
        "torch_vs_candidate_max_abs_err", "rtol", "atol"}``. ``max_abs_err``,
        ``max_rel_err`` (``|Δ| / (|ref| + atol)``, finite where the action is 0) and
        ``max_state_abs_err`` are the candidate's worst one-step action and state errors
        against float64, ``max_torch_*`` torch float32's; ``*_tolerance_used`` is the
        worst ``err / allowed`` over actions and states (above 1 fails).
        ``torch_vs_candidate_max_abs_err`` is the end-to-end action difference between
        the two float32 paths, each on its own state: information only (float32 rounding
        integrated over the rollout, not a one-step error).

    Raises:
        ParityError: at the first step where an action or state element of the candidate
            or of torch float32 is out of tolerance (the candidate is judged first), or
            when the candidate's sizes are not the policy's.
        ValueError: ``batch`` differs from an object candidate's ``batch_size``.
    """
    make_env = make_env or _gym_make
    if next(policy.parameters()).device.type != "cpu":
        policy = copy.deepcopy(policy).cpu()
    if isinstance(candidate, (str, os.PathLike)):
        label = "onnx"
        batch = 1 if batch is None else batch
        candidate = OnnxPolicy(candidate, provider=provider, batch_size=batch)
    else:
        label = type(candidate).__name__
        if batch is None:
            batch = int(candidate.batch_size)
        elif int(candidate.batch_size) != batch:
            raise ValueError(f"batch={batch}, but the candidate steps {candidate.batch_size} rows")
    state_size = int(policy.actor.state_size)
    sizes = (candidate.obs_dim, candidate.act_dim, candidate.state.shape[-1])
    if sizes != (policy.obs_dim, policy.act_dim, state_size):
        raise ParityError(
            f"the {label} candidate has obs/act/state sizes {'/'.join(map(str, sizes))}, the "
            f"policy {policy.obs_dim}/{policy.act_dim}/{state_size}: not exported from this policy"
        )
    reference = Float64Actor(policy)
    judges = {
        "candidate": _Judge(label, atol, rtol, reference.state_dims),
        "torch": _Judge("torch float32", atol, rtol, reference.state_dims),
    }
    envs = [make_env(env_id) for _ in range(batch)]
    # One torch thread: at these sizes more threads only add synchronisation, and on a
    # busy machine they cost 40x (13 ms instead of 0.3 ms per step measured on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        obs = np.stack([env.reset(seed=seed + k)[0] for k, env in enumerate(envs)])
        start = np.ones(batch, dtype=bool)
        episodes = batch
        torch_state = None
        # Each path's state after its previous step, float32 [B, S]: its incoming state
        # once the episode starts are zeroed (the float64 step zeroes them itself, so a
        # candidate whose reset() leaves a row as it was is caught).
        held = {
            "candidate": np.zeros((batch, state_size), np.float32),
            "torch": np.zeros((batch, state_size), np.float32),
        }
        end_to_end = 0.0
        for t in range(steps):
            obs32 = np.asarray(obs, dtype=np.float32)  # what both float32 paths see
            torch_act, torch_state = policy.predict(
                obs32, torch_state, episode_start=start, deterministic=True
            )
            candidate.reset(start)
            cand_act = np.asarray(candidate.act(obs32))
            got = {
                "candidate": (cand_act, np.asarray(candidate.state)),
                "torch": (torch_act, torch_state.actor.numpy()),
            }
            # One float64 call for both paths: rows [candidate's B | torch's B].
            ref_act, ref_state = reference.step(
                np.concatenate([obs32, obs32]),
                np.concatenate([held["candidate"], held["torch"]]),
                np.concatenate([start, start]),
            )
            rows = {"candidate": slice(0, batch), "torch": slice(batch, None)}
            refs, errs = {}, {}
            for key, r in rows.items():
                incoming = np.where(start[:, None], 0.0, held[key].astype(np.float64))
                scales = (np.abs(ref_act[r]), reference.state_scale(ref_state[r], incoming))
                refs[key] = (ref_act[r], ref_state[r]), scales
                errs[key] = [np.abs(g - w) for g, w in zip(got[key], refs[key][0], strict=True)]
            for key, judge in judges.items():  # the candidate first
                other = errs["torch" if key == "candidate" else "candidate"]
                (want_act, want_state), (act_scale, state_scale) = refs[key]
                judge.check((env_id, t), "action", got[key][0], want_act, act_scale, other[0])
                judge.check((env_id, t), "state", got[key][1], want_state, state_scale, other[1])
            end_to_end = max(end_to_end, float(np.abs(cand_act - torch_act).max()))
            held = {key: got[key][1] for key in got}

            for k, env in enumerate(envs):
                o, _, terminated, truncated, _ = env.step(cand_act[k])
                start[k] = terminated or truncated
                if start[k]:
                    o, _ = env.reset()
                    episodes += 1
                obs[k] = o
    finally:
        torch.set_num_threads(threads)
        for env in envs:
            env.close()
    cand, torch_judge = judges["candidate"], judges["torch"]
    return {
        "env_id": env_id,
        "steps": steps,
        "batch": batch,
        "episodes_started": episodes,
        "max_abs_err": cand.max_abs,
        "max_rel_err": cand.max_rel,
        "max_state_abs_err": cand.max_state,
        "max_tolerance_used": cand.tolerance_used,
        "max_torch_abs_err": torch_judge.max_abs,
        "max_torch_state_abs_err": torch_judge.max_state,
        "max_torch_tolerance_used": torch_judge.tolerance_used,
        "torch_vs_candidate_max_abs_err": end_to_end,
        "rtol": rtol,
        "atol": atol,
    }
