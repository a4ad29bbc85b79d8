"""Deterministic evaluation of any controller: a trained run's torch policy, an exported
``.onnx`` file or a C export, through one stepping interface (``Controller``).

Convention: one env, episode k starts with ``env.reset(seed=seed + k)`` and the
controller's ``reset()``, actions are the deterministic (clipped mean) ones, and the
return is the sum of raw rewards until the episode terminates or is truncated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from envs import make_env
from policies.actor_critic import ActorCritic, RecurrentState


class Controller(Protocol):
    """What a control loop needs: ``reset()`` at an episode start, then ``act(obs)``
    (raw observation ``[obs_dim]`` -> bounded action ``[act_dim]``) every step.
    ``export.runtime.OnnxPolicy`` and ``export.c_runtime.CPolicy`` implement it;
    ``TorchController`` wraps an ``ActorCritic``."""

    def reset(self) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...


class TorchController:
    """An ``ActorCritic`` behind the ``Controller`` interface: deterministic actions, the
    recurrent state carried between calls (``state``: None at an episode start).

    ``frozen`` (default): the observation statistics and the weights read once
    (``ActorCritic.rollout_actor(deterministic=True)``: one compiled kernel call a step
    for the SSM where numba runs; an MLP body is read live), so Hopper-v5-P episodes are
    evaluated 2.3-3.6× faster (the rest is MuJoCo's). Build a new controller after the
    policy is trained further. Its actions equal the eager path's up to float32
    rounding, which a chaotic task can grow into a different episode (one of six
    Hopper-v5-P episodes: 3213 against 2007). ``frozen=False`` steps the module itself
    (``ActorCritic.predict``): the reference, and the "torch eager" latency row.
    """

    def __init__(self, policy: ActorCritic, frozen: bool = True) -> None:
        self.policy = policy
        self.frozen = frozen
        self.state: RecurrentState | None = None
        if frozen:
            self._normalize = policy.obs_norm.frozen()
            self._act = policy.rollout_actor(deterministic=True)
            self._zero = policy.initial_state(1)  # the sizes the frozen step was read at

    def reset(self) -> None:
        self.state = None

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Raw observation ``[obs_dim]`` -> action ``[act_dim]`` within the bounds."""
        if not self.frozen:
            action, self.state = self.policy.predict(obs, self.state, deterministic=True)
            return action
        state = self._zero if self.state is None else self.state
        obs_norm = self._normalize(np.reshape(obs, (1, self.policy.obs_dim)))
        action, _, actor_state = self._act(obs_norm, state.actor)
        self.state = RecurrentState(actor_state, state.critic)
        return action[0].numpy()


def load_controller(target: Path) -> tuple[Controller, str]:
    """The controller in ``target`` and its env id: a run directory, an ``.onnx`` file, or
    a C export (its directory, its ``policy.c``, or a shared library built from it)."""
    target = Path(target)
    if target.suffix == ".onnx":
        from export.runtime import OnnxPolicy

        policy = OnnxPolicy(target)
        return policy, policy.env_id
    if target.suffix in (".c", ".so") or (target / "policy.c").is_file():
        from export.c_runtime import CPolicy

        policy = CPolicy(target)  # compiles policy.c with the host's gcc
        return policy, policy.env_id
    from compressm_rl.runs.checkpoint import load_policy

    policy, meta = load_policy(target)
    return TorchController(policy), meta["env_id"]


def evaluate(controller: Controller, env_id: str, episodes: int = 10, seed: int = 0) -> np.ndarray:
    """Undiscounted returns of ``episodes`` deterministic episodes, ``[episodes]`` float64.

    Raises ValueError if the controller's observation or action size is not the env's
    (e.g. a policy trained on another task)."""
    env = make_env(env_id)
    sizes = {
        "observation": (_size(controller, "obs_dim"), env.observation_space.shape[0]),
        "action": (_size(controller, "act_dim"), env.action_space.shape[0]),
    }
    for what, (policy_size, env_size) in sizes.items():
        if policy_size is not None and policy_size != env_size:
            env.close()
            raise ValueError(
                f"the policy takes {what}s of size {policy_size} and {env_id}'s are of size "
                f"{env_size}: it was trained on another task (leave --env out to use its own)"
            )
    returns = np.zeros(episodes)
    try:
        for k in range(episodes):
            obs, _ = env.reset(seed=seed + k)
            controller.reset()
            done = False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(controller.act(obs))
                returns[k] += float(reward)
                done = terminated or truncated
    finally:
        env.close()
    return returns


def _size(controller: Controller, name: str) -> int | None:
    """``obs_dim`` / ``act_dim`` of any controller that has one (a TorchController's policy)."""
    value = getattr(controller, name, None)
    if value is None and isinstance(controller, TorchController):
        value = getattr(controller.policy, name)
    return None if value is None else int(value)
