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
within ``atol + rtol * scale + norm`` of float64 at every step, or ``ParityError`` names
the step, the env, the element and whether the action or the state is out. ``scale`` is
``|ref|`` for an action; for a state element it is the size of the complex state it
belongs to, ``max(|h'|, |λ|·|h|)`` (``Float64Actor.state_scale``); ``norm`` is what
rounding the observation normaliser to float32 can do to the element (below): on tasks
with near-constant observation dimensions (Humanoid-v5's inertias and contact forces,
early in training) it reaches 5e-4 on a state of modulus 0.2, ten times the error that
two correct float32 paths show there.

Why not compare ONNX with torch directly: both are float32 and round differently, and a
recurrence with |λ| ≈ 1 integrates those differences over ~1/(1 - |λ|) steps, so the
end-to-end difference of two correct implementations reaches ~2e-5 and a fixed tolerance
either fails correct files now and then or is too loose to mean anything. A one-step error
is one step's rounding whatever the history, while a wrong graph (a weight, the state
layout, a reset) is wrong at the step where it acts. The end-to-end torch vs candidate
difference is still reported, as information. Imports torch and gymnasium: a
development-side tool, not for the device.

``atol`` and ``rtol`` (1e-5, 1e-4) are far above float32 rounding (~1e-7 relative): a
graph with one weight 0.1% off can stay inside them. So the candidate is also judged
against what float32 rounding explains, per output element ``p`` (each action dimension,
each state element) over the whole rollout (all steps and envs), once it has run::

    RMS_cand(p) <= factor · max(RMS_torch(p), eps · RMS(scale(p))) + RMS(norm(p))

``RMS_cand`` and ``RMS_torch`` are the root mean square one-step errors against float64 of
the candidate and of torch float32, each from its own state: torch float32 is the
measure of what float32 rounding does to this policy on this rollout. ``eps`` is
float32's machine epsilon (2⁻²³) and ``eps · RMS(scale)`` the floor where torch's error
is degenerate (an action clamped at its bound, a state that stays 0: float32 is exact
there and torch's error 0). ``norm(p)`` is what rounding the observation normaliser's
terms can add (``Float64Actor.normaliser_rounding``): where a dimension's mean is far
from 0 in units of its std (Hopper's torso height: m = 1.25, s = 0.015, terms of ~80)
one rounding of a float32 constant (m, or m/s) moves the normalised value by ~5e-6 for
the whole rollout, and torch's rounding can be near 0 by luck where the export's is not:
without this term a correct export reached 14x torch's error. ``factor`` is
``ROUNDING_FACTOR`` (5), for ONNX and C alike: the C step's own erf/exp/tanh add no
error beyond ONNX Runtime's at these sizes. Measured (``benchmarks/parity_sweep.py --seeds 100``,
width-64 Hopper-v5 policies: an SSM, a compressed SSM and an MLP, 100 correct exports each
in ONNX and in C): correct exports use at most 0.44 of the allowance (median 0.22-0.31);
scaling the largest element of any one initialiser by 1.001 fails every export where it
changes the rollout at all (3 policies a kind), the closest at 1.26x the allowance (an
SSM's layer-0 output weights), most at 10-1000x.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import numpy as np
import torch

from export.runtime import OnnxPolicy
from policies.actor_critic import ActorCritic

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one float32 ulp, relative
# The candidate's RMS one-step error may be this many times torch float32's (both against
# float64), plus the normaliser's rounding; ONNX and C alike. Measured
# (benchmarks/parity_sweep.py, width-64 Hopper-v5 SSM, compressed SSM and MLP): correct
# exports are up to ~4x torch's RMS error where the normaliser's rounding dominates and
# use at most 0.44 of the allowance; 1.001 on the largest element of an initialiser gives
# at least 1.26x it. 10 would pass that export for no gain on correct ones.
ROUNDING_FACTOR = 5.0


class ParityError(RuntimeError):
    """An exported policy (or torch float32 itself) differs from the float64 step of the
    same policy from the same state beyond the tolerance.

    ``rounding_used``: where the rounding rule failed (``check_parity``), the ratio of the
    candidate's RMS error to its allowance at the element named; otherwise None.
    """

    def __init__(self, message: str, rounding_used: float | None = None) -> None:
        super().__init__(message)
        self.rounding_used = rounding_used


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

    @torch.no_grad()
    def normaliser_rounding(
        self, obs: np.ndarray, state: np.ndarray, episode_start: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """What rounding the observation normaliser to float32 can do to the step's
        outputs: ``(action [B, act_dim], new state [B, S])``, float64, >= 0.

        For each observation dimension j the normalised value ``n_j = (x_j - m_j)/s_j``
        moves by one rounding of each of its terms, ``u·(|x_j| + |m_j|)/s_j`` with ``u =
        eps/2`` the unit roundoff (0 where it is clipped: the clip bound is exact), and
        the first-order changes of every output are added in absolute value:
        ``Σ_j |∂out/∂n_j|·u·(|x_j| + |m_j|)/s_j``, the derivatives by forward differences
        of this float64 step (one call on ``B·(1 + obs_dim)`` rows). A float32
        normaliser rounds ``m`` (or ``m/s``) once for the whole rollout, and ``x/s``
        every step: where ``|m|/s`` is large (Hopper's torso height, ~70) that fixed
        error dominates the step's rounding, and differs between two correct
        implementations (torch's can be near 0 by luck, the export's not).
        """
        norm = self.policy.obs_norm
        x = torch.as_tensor(np.asarray(obs, dtype=np.float64))
        n = norm(x)
        rows, dims = n.shape
        size = (x.abs() + norm.mean.abs()) * (EPS32 / 2) / torch.sqrt(norm.var + norm.eps)
        size = torch.where(n.abs() < norm.clip, size, torch.zeros_like(size))
        step = 2.0**-20 * torch.clamp(n.abs(), min=1.0)
        nudged = n[:, None, :].repeat(1, dims + 1, 1)  # row 0 as is, row 1 + j: n_j moved
        j = torch.arange(dims)
        nudged[:, 1 + j, j] += step
        state_t = torch.as_tensor(np.asarray(state, dtype=np.float64))
        start = torch.zeros(rows, dtype=torch.bool)
        if episode_start is not None:
            start = torch.as_tensor(episode_start, dtype=torch.bool)
        action, _, new_state = self.policy.act(
            nudged.reshape(rows * (dims + 1), dims),
            state_t.repeat_interleave(dims + 1, dim=0),
            start.repeat_interleave(dims + 1),
            deterministic=True,
        )
        weight = (size / step)[:, :, None]  # [B, obs_dim, 1]

        def spread(out: torch.Tensor) -> np.ndarray:
            if out.shape[1] == 0:  # an MLP's state
                return np.zeros((rows, 0))
            out = out.reshape(rows, dims + 1, -1)
            return ((out[:, 1:] - out[:, :1]).abs() * weight).sum(1).numpy()

        return spread(action), spread(new_state)

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


def _norm_term(norm: np.ndarray | None, k: int, j: int) -> str:
    """`` + normaliser rounding X`` for the message where there is one."""
    return "" if norm is None else f" + normaliser rounding {norm[k, j]:.3g}"


def _state_element(j: int, state_dims: list[int]) -> str:
    """``"layer l, Re h[i]"`` for flat state index ``j``."""
    offset = 0
    for layer, n in enumerate(state_dims):
        if j < offset + 2 * n:
            part, i = ("Re", j - offset) if j < offset + n else ("Im", j - offset - n)
            return f"layer {layer}, {part} h[{i}]"
        offset += 2 * n
    return "?"


class _Errors:
    """One path's one-step errors at each element of one output (action or state), over
    the rollout: sums of squares (of the error, its scale and the normaliser's rounding)
    and where the error was largest."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.err2, self.scale2, self.norm2 = np.zeros(dim), np.zeros(dim), np.zeros(dim)
        self.worst = np.full(dim, -1.0)
        self.step, self.env = np.zeros(dim, int), np.zeros(dim, int)
        self.got, self.ref = np.zeros(dim), np.zeros(dim)

    def add(
        self,
        step: int,
        err: np.ndarray,
        got: np.ndarray,
        ref: np.ndarray,
        scale: np.ndarray,
        norm: np.ndarray | None,
    ) -> None:
        self.count += err.shape[0]
        self.err2 += (err * err).sum(0)
        self.scale2 += (scale * scale).sum(0)
        if norm is not None:
            self.norm2 += (norm * norm).sum(0)
        rows, cols = err.argmax(0), np.arange(err.shape[1])
        larger = err[rows, cols] > self.worst
        self.worst[larger] = err[rows, cols][larger]
        self.step[larger], self.env[larger] = step, rows[larger]
        self.got[larger], self.ref[larger] = got[rows, cols][larger], ref[rows, cols][larger]

    def rms(self, sums: np.ndarray) -> np.ndarray:
        return np.sqrt(sums / max(self.count, 1))


class _Judge:
    """One float32 path's one-step check, and the worst figures it has seen."""

    def __init__(self, label: str, atol: float, rtol: float, state_dims: list[int]) -> None:
        self.label, self.atol, self.rtol, self.state_dims = label, atol, rtol, state_dims
        self.max_abs = self.max_rel = self.max_state = self.tolerance_used = 0.0
        self.errors: dict[str, _Errors] = {}

    def element(self, what: str, j: int) -> str:
        if what == "action":
            return f"action dim {j}"
        return f"state element {j} ({_state_element(j, self.state_dims)})"

    def check(
        self,
        where: tuple[str, int],
        what: str,
        got: np.ndarray,
        ref: np.ndarray,
        scale: np.ndarray,
        other_err: np.ndarray,
        norm: np.ndarray | None = None,
    ) -> None:
        """Raise ``ParityError`` unless ``|got - ref| <= atol + rtol·scale + norm``
        everywhere; then add the step's errors to the rollout's (``errors``, for
        ``_rounding_check``).

        ``where``: ``(env_id, step)``; ``what``: ``"action"`` or ``"state"``; ``got``
        float32 and ``ref`` float64 ``[B, dim]``; ``other_err``: the other float32 path's
        one-step errors, quoted in the message for comparison; ``norm``: the normaliser's
        rounding (``Float64Actor.normaliser_rounding``, ``[B, dim]``).
        """
        if got.size == 0:
            return
        err = np.abs(got.astype(np.float64) - ref)
        allowed = self.atol + self.rtol * scale + (0.0 if norm is None else norm)
        bad = ~(err <= allowed)  # NaN counts as bad
        if bad.any():
            k, j = (int(i) for i in np.argwhere(bad)[0])
            if what == "action":
                scale_name = "|float64|"
            else:
                scale_name = f"|h| (= {scale[k, j]:.4g})"
            raise ParityError(
                f"{where[0]}: {self.label} {what} mismatch at step {where[1]}, env {k}, "
                f"{self.element(what, j)}: {self.label} {got[k, j]:.8g} vs float64 "
                f"{ref[k, j]:.8g} from the same obs and incoming state (abs err "
                f"{err[k, j]:.3g}, allowed atol {self.atol} + rtol {self.rtol}·{scale_name}"
                f"{_norm_term(norm, k, j)} = {allowed[k, j]:.3g}; "
                f"{int(bad.sum())} of {bad.size} {what} elements out, "
                f"max abs err this step {np.nanmax(err):.3g}; the other float32 path's "
                f"one-step error there: {other_err[k, j]:.3g})"
            )
        self.tolerance_used = max(self.tolerance_used, float((err / allowed).max()))
        if what == "action":
            self.max_abs = max(self.max_abs, float(err.max()))
            self.max_rel = max(self.max_rel, float((err / (np.abs(ref) + self.atol)).max()))
        else:
            self.max_state = max(self.max_state, float(err.max()))
        errors = self.errors.setdefault(what, _Errors(err.shape[1]))
        errors.add(where[1], err, got, ref, scale, norm)


def _rounding_check(
    env_id: str, candidate: _Judge, torch_float32: _Judge, factor: float
) -> tuple[float, float]:
    """Raise ``ParityError`` where the candidate's RMS one-step error at an output element
    exceeds what float32 rounding explains (module docstring)::

        RMS_cand > factor · max(RMS_torch, eps · RMS(scale)) + RMS(norm)

    naming the element with the largest ratio and the step of its largest error. Returns
    ``(used, vs_torch)``: the largest ratio of ``RMS_cand`` to that allowance (above 1
    fails), and to ``max(RMS_torch, eps · RMS(scale))`` (the multiple of float32's own
    error, information).
    """
    used, vs_torch, worst = 0.0, 0.0, None
    for what, cand in candidate.errors.items():
        rms = cand.rms(cand.err2)
        torch_errors = torch_float32.errors[what]
        t_rms = torch_errors.rms(torch_errors.err2)
        floor = EPS32 * cand.rms(cand.scale2)
        rounding = np.maximum(t_rms, floor)
        allowed = factor * rounding + cand.rms(cand.norm2)
        # A zero allowance (an element that is 0 at every step, exactly, in torch too)
        # admits no error at all.
        ratio = np.divide(rms, allowed, out=np.where(rms > 0, np.inf, 0.0), where=allowed > 0)
        multiple = np.divide(rms, rounding, out=np.where(rms > 0, np.inf, 0.0), where=rounding > 0)
        vs_torch = max(vs_torch, float(multiple.max()))
        j = int(ratio.argmax())
        if worst is None or ratio[j] > used:
            used = float(ratio[j])
            worst = (what, cand, j, rms[j], t_rms[j], floor[j], multiple[j], allowed[j])
    if used > 1.0:
        what, cand, j, rms, t_rms, floor, multiple, allowed = worst
        raise ParityError(
            f"{env_id}: {candidate.label} {what} mismatch at step {cand.step[j]}, env "
            f"{cand.env[j]}, {candidate.element(what, j)}: beyond float32 rounding over the "
            f"rollout. Its one-step errors against float64 have RMS {rms:.3g} over "
            f"{cand.count} steps x envs, {multiple:.3g}x float32's (torch float32's RMS "
            f"{t_rms:.3g}, floor eps·RMS|scale| {floor:.3g}); allowed {factor:g}x that + the "
            f"normaliser's rounding {cand.rms(cand.norm2)[j]:.3g} = {allowed:.3g}. Its "
            f"largest error, at that step: {candidate.label} {cand.got[j]:.8g} vs float64 "
            f"{cand.ref[j]:.8g} (abs err {cand.worst[j]:.3g})",
            rounding_used=used,
        )
    return used, vs_torch


def _gym_make(env_id: str):
    import gymnasium

    return gymnasium.make(env_id)


def _open_candidate(
    policy: ActorCritic, candidate: str | os.PathLike | object, batch: int | None, provider: str
) -> tuple[object, str, int]:
    """``check_parity``'s ``candidate`` and ``batch`` resolved: ``(stepper, label, batch)``,
    a path opened as ``OnnxPolicy``; raises as ``check_parity`` says where ``batch`` is not
    an object's ``batch_size`` or the candidate's sizes are not the policy's."""
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
    return candidate, label, batch


def _judge_step(
    reference: Float64Actor,
    judges: dict[str, _Judge],
    where: tuple[str, int],
    obs32: np.ndarray,
    start: np.ndarray,
    held: dict[str, np.ndarray],
    got: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    """Judge one step of both float32 paths, the candidate first (``_Judge.check``), against
    the float64 step from the same obs ``obs32`` ``[B, obs_dim]`` and each path's own state.

    ``where``: ``(env_id, step)``; ``start`` ``[B]``: the episode starts; keyed ``"candidate"``
    and ``"torch"``: ``judges``, ``held`` (each path's state after its previous step, ``[B,
    S]`` float32) and ``got`` (its ``(action [B, act_dim], new state [B, S])`` this step).
    """
    batch = start.shape[0]
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
    # The allowance for the normaliser's rounding, from the candidate's state (the same
    # for torch's, whose state differs from the candidate's by float32 rounding only).
    norm = reference.normaliser_rounding(obs32, held["candidate"], start)
    for key, judge in judges.items():  # the candidate first
        other = errs["torch" if key == "candidate" else "candidate"]
        (want_act, want_state), (act_scale, state_scale) = refs[key]
        judge.check(where, "action", got[key][0], want_act, act_scale, other[0], norm[0])
        judge.check(where, "state", got[key][1], want_state, state_scale, other[1], norm[1])


def _rollout(
    policy: ActorCritic,
    candidate: object,
    reference: Float64Actor,
    judges: dict[str, _Judge],
    envs: list,
    env_id: str,
    steps: int,
    seed: int,
) -> tuple[int, float]:
    """Step ``envs`` (one per candidate row, env ``k`` first reset with ``seed + k``) for
    ``steps`` steps on the candidate's actions, torch float32 fed the same observations and
    episode starts, each step judged (``_judge_step``); closes ``envs``, whatever happens.
    Returns ``(episodes started, end-to-end max abs action difference torch vs candidate)``."""
    batch, state_size = len(envs), int(policy.actor.state_size)
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
        held = {key: np.zeros((batch, state_size), np.float32) for key in ("candidate", "torch")}
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
            _judge_step(reference, judges, (env_id, t), obs32, start, held, got)
            end_to_end = max(end_to_end, float(np.abs(cand_act - torch_act).max()))
            held = {key: got[key][1] for key in got}

            for k, env in enumerate(envs):  # the envs go on with the candidate's actions
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
    return episodes, end_to_end


def _report(
    env_id: str,
    steps: int,
    batch: int,
    episodes: int,
    end_to_end: float,
    judges: dict[str, _Judge],
    rounding: tuple[float, float],
    rounding_factor: float,
) -> dict:
    """``check_parity``'s result (its Returns); ``rounding``: ``_rounding_check``'s."""
    cand, torch_judge = judges["candidate"], judges["torch"]
    rounding_used, vs_torch = rounding
    return {
        "env_id": env_id,
        "steps": steps,
        "batch": batch,
        "episodes_started": episodes,
        "max_abs_err": cand.max_abs,
        "max_rel_err": cand.max_rel,
        "max_state_abs_err": cand.max_state,
        "max_tolerance_used": max(cand.tolerance_used, rounding_used),
        "rounding_used": rounding_used,
        "rms_err_vs_float32": vs_torch,
        "rounding_factor": rounding_factor,
        "max_torch_abs_err": torch_judge.max_abs,
        "max_torch_state_abs_err": torch_judge.max_state,
        "max_torch_tolerance_used": torch_judge.tolerance_used,
        "torch_vs_candidate_max_abs_err": end_to_end,
        "rtol": cand.rtol,
        "atol": cand.atol,
    }


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
    rounding_factor: float = ROUNDING_FACTOR,
) -> dict:
    """Run ``batch`` envs for ``steps`` steps; raise on any one-step mismatch, then on any
    output element whose errors over the rollout float32 rounding does not explain.

    Args:
        policy: the torch policy the candidate was exported from (copied to CPU if needed).
        candidate: the exported policy: a path to an ``.onnx`` file (run as ``OnnxPolicy(path,
            provider, batch_size=batch)``), or an object with ``OnnxPolicy``'s stepping
            interface: ``reset(mask)``, ``act(obs)``, ``state`` (a copy, ``[batch_size, S]``
            float32), ``recurrent``, ``obs_dim``, ``act_dim``, ``batch_size``. It is reset at
            step 0 and stepped in place.
        env_id: environment id passed to ``make_env``.
        steps: control steps per env.
        batch: envs stepped together; None: 1 for a path, ``candidate.batch_size`` for an
            object (which must equal ``batch`` when both are given).
        seed: env ``k`` is first reset with ``seed + k``; later resets continue its RNG.
        rtol, atol: each action and state element must be within ``atol + rtol·scale`` of the
            float64 step from the same obs and incoming state, ``scale`` being ``|ref|`` for an
            action and ``Float64Actor.state_scale`` (the complex state's size) for a state;
            enforced for the candidate and for torch float32.
        make_env: ``env_id -> gymnasium.Env`` (default ``gymnasium.make``; pass
            ``envs.make_env`` for this project's POMDP ids).
        provider: ORT execution provider (a path candidate only).
        rounding_factor: after the rollout, the candidate's RMS one-step error at each output
            element may be this many times float32's (torch float32's RMS error, floored at
            ``eps`` times the RMS scale), plus the normaliser's rounding (module docstring).
            Enforced for the candidate only.

    Returns:
        ``{"env_id", "steps", "batch", "episodes_started", "max_abs_err", "max_rel_err",
        "max_state_abs_err", "max_tolerance_used", "rounding_used", "rms_err_vs_float32",
        "rounding_factor", "max_torch_abs_err", "max_torch_state_abs_err",
        "max_torch_tolerance_used", "torch_vs_candidate_max_abs_err", "rtol", "atol"}``.
        ``max_abs_err``, ``max_rel_err`` (``|Δ| / (|ref| + atol)``, finite where the action is
        0) and ``max_state_abs_err`` are the candidate's worst one-step action and state errors
        against float64, ``max_torch_*`` torch float32's; ``rounding_used`` is the largest
        ratio of the candidate's RMS error at an element to its rounding allowance,
        ``rms_err_vs_float32`` the largest multiple of float32's RMS error (``max(RMS_torch,
        eps·RMS(scale))``) without the normaliser's term; ``max_torch_tolerance_used`` is
        torch's worst ``err / allowed`` (atol + rtol), ``max_tolerance_used`` the candidate's,
        or its ``rounding_used`` if larger (above 1 fails). ``torch_vs_candidate_max_abs_err``:
        the end-to-end action difference of the two float32 paths, each on its own state:
        information only (float32 rounding integrated over the rollout, not a one-step error).

    Raises:
        ParityError: at the first step where an action or state element of the candidate or
            of torch float32 is out of tolerance (the candidate is judged first); after the
            rollout, where the candidate's RMS error at an element is beyond the rounding
            allowance (naming the step of its largest error there); or when the candidate's
            sizes are not the policy's.
        ValueError: ``batch`` differs from an object candidate's ``batch_size``.
    """
    make_env = make_env or _gym_make
    if next(policy.parameters()).device.type != "cpu":
        policy = copy.deepcopy(policy).cpu()
    candidate, label, batch = _open_candidate(policy, candidate, batch, provider)
    reference = Float64Actor(policy)
    judges = {  # in the order they judge each step
        "candidate": _Judge(label, atol, rtol, reference.state_dims),
        "torch": _Judge("torch float32", atol, rtol, reference.state_dims),
    }
    envs = [make_env(env_id) for _ in range(batch)]
    episodes, end_to_end = _rollout(policy, candidate, reference, judges, envs, env_id, steps, seed)
    rounding = _rounding_check(env_id, judges["candidate"], judges["torch"], rounding_factor)
    return _report(env_id, steps, batch, episodes, end_to_end, judges, rounding, rounding_factor)
