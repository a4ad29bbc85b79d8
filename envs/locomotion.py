"""One step of N copies of a Gymnasium MuJoCo locomotion task, the Python done once.

Gymnasium's ``Hopper-v5``, ``Walker2d-v5`` and ``HalfCheetah-v5`` spend more time in
Python than in the physics: a Hopper-v5 step is ~210 µs on the AMD EPYC VM, of which
``mj_step`` (4 RK4 frames) is ~115 µs; the rest is the health check (computed twice per
step), ``state_vector``, ``clip``, the reward terms and three wrappers, once per env.
:class:`LocomotionStep` keeps the physics per env (``mujoco.mj_step`` on each env's own
``MjModel``/``MjData``) and computes observations, rewards, terminations and the time
limit once for all N envs with numpy, with the same float operations in the same order
as Gymnasium's code, so every number is bit-identical to stepping the envs one by one
(``tests/test_envs.py`` checks it step for step, resets included).

It reads each task's settings (reward weights, health ranges, ``frame_skip``,
``max_episode_steps``, ...) from the env instances when it is built, so ``gym.make``
keyword arguments hold; the timestep is read at every step (``MujocoEnv.dt``). Envs it
does not know (other tasks, other or repeated wrappers, subclasses, rendering) are not
batched: :func:`locomotion_step` returns None and the caller steps them one by one.
The ctrl cost is ``w * float32 sum`` as in Gymnasium under NumPy 2's promotion rules
(NumPy 1 would promote Gymnasium's scalar to float64 but not this array).

Left out on purpose: ``mj_rnePostConstraint`` (Gymnasium calls it after each step to fill
``cacc``/``cfrc_*``, which these three tasks' observations do not read and the next
``mj_step`` recomputes; in ``env.unwrapped.data`` they are stale), and the per-step
``info`` dicts (reward terms, positions).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv
from gymnasium.wrappers import OrderEnforcing, PassiveEnvChecker, TimeLimit

from envs.dynamics import RandomizedDynamics
from envs.physics import parallel_physics
from envs.pomdp import KeepPartObservation

# Wrappers whose step does nothing a batched step must repeat (checks only), or what it
# does itself (the time limit, the observation part, the randomized dynamics' delay,
# pushes and noise); matched by exact type, each at most once (a subclass may change what
# step does; a second TimeLimit would count on its own).
_HANDLED_WRAPPERS = (
    TimeLimit,
    OrderEnforcing,
    PassiveEnvChecker,
    KeepPartObservation,
    RandomizedDynamics,
)
_TASKS = (HopperEnv, Walker2dEnv, HalfCheetahEnv)


def _handled_wrappers(env: gym.Env) -> dict[type, gym.Wrapper] | None:
    """``env``'s wrappers by type, or None if one is not handled or comes twice."""
    found: dict[type, gym.Wrapper] = {}
    while isinstance(env, gym.Wrapper):
        if type(env) not in _HANDLED_WRAPPERS or type(env) in found:
            return None
        found[type(env)] = env
        env = env.env
    return found


@dataclass
class _Task:
    """The settings of one task, read from an env instance (all copies must agree)."""

    kind: type
    frame_skip: int
    forward_weight: float
    ctrl_weight: float
    healthy_reward: float
    terminate_when_unhealthy: bool
    exclude_x: bool
    has_health: bool  # Hopper, Walker2d: health checks and clipped velocities
    healthy_z: tuple
    healthy_angle: tuple
    healthy_state: tuple | None  # Hopper only: (low, high), scalars or per-element arrays
    keep: np.ndarray | None  # observation indices kept by KeepPartObservation

    @classmethod
    def of(cls, env: gym.Env) -> _Task | None:
        wrappers = _handled_wrappers(env)
        layer = env.unwrapped
        if wrappers is None or type(layer) not in _TASKS or layer.render_mode is not None:
            return None
        if wrappers.get(RandomizedDynamics, env) is not env:  # its noise must come last
            return None
        keep = wrappers.get(KeepPartObservation)
        hopper = type(layer) is HopperEnv
        has_health = type(layer) is not HalfCheetahEnv
        return cls(
            kind=type(layer),
            frame_skip=layer.frame_skip,
            forward_weight=layer._forward_reward_weight,
            ctrl_weight=layer._ctrl_cost_weight,
            healthy_reward=layer._healthy_reward if has_health else 0.0,
            terminate_when_unhealthy=layer._terminate_when_unhealthy if has_health else False,
            exclude_x=layer._exclude_current_positions_from_observation,
            has_health=has_health,
            healthy_z=tuple(layer._healthy_z_range) if has_health else (0.0, 0.0),
            healthy_angle=tuple(layer._healthy_angle_range) if has_health else (0.0, 0.0),
            healthy_state=tuple(layer._healthy_state_range) if hopper else None,
            keep=None if keep is None else keep._index,
        )

    def same_as(self, other: _Task) -> bool:
        return all(_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


def _equal(a, b) -> bool:
    if a is None or b is None or isinstance(a, type):
        return a is b
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except ValueError:  # ragged, e.g. a scalar bound beside a per-element one
        return False


class LocomotionStep:
    """Steps ``envs`` (N copies of one task) at once; see the module docstring.

    Args:
        envs: the vector env's sub-envs, each as ``gym.make`` (and ``make_env``) built it.
        task: their common settings (:func:`locomotion_step` checks and builds both).
        physics_threads: ``mj_step`` on this many threads (``envs.physics``; bit-identical
            to one); 1 steps the envs one by one in this thread.
    """

    def __init__(self, envs: list[gym.Env], task: _Task, physics_threads: int = 1) -> None:
        self.task = task
        self._sims = [(env.unwrapped.model, env.unwrapped.data) for env in envs]
        self.physics, self.physics_note = parallel_physics(self._sims, physics_threads)
        if self.physics is None and physics_threads > 1:
            warnings.warn(self.physics_note, stacklevel=4)  # at the vector env's maker
        # The TimeLimit wrappers keep counting, so a sub-env stepped or reset on its own
        # afterwards still sees the right elapsed time.
        self._limits = [_handled_wrappers(env).get(TimeLimit) for env in envs]
        # Each env's own draws (delay, pushes, noise), made as its own step makes them.
        self._dynamics = [_handled_wrappers(env).get(RandomizedDynamics) for env in envs]
        model = self._sims[0][0]
        self._qpos = np.empty((len(envs), model.nq))
        self._qvel = np.empty((len(envs), model.nv))

    def __call__(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        """Step every env once with ``actions [N, nu]``.

        Returns ``(obs [N, obs_dim] float64, reward [N] float64, terminated [N] bool,
        truncated [N] bool)`` of the step, before any autoreset.
        """
        task, qpos, qvel = self.task, self._qpos, self._qvel
        n = len(self._sims)
        actions = self._before_step(actions)
        x_before, dt = np.empty(n), np.empty(n)
        truncated = np.zeros(n, dtype=bool)
        for i, (model, data) in enumerate(self._sims):
            x_before[i] = data.qpos[0]
            dt[i] = model.opt.timestep * task.frame_skip  # MujocoEnv.dt, read as it is now
            data.ctrl[:] = actions[i]
            if self.physics is None:
                mujoco.mj_step(model, data, nstep=task.frame_skip)
        if self.physics is not None:
            self.physics.step(task.frame_skip)
        for i, (_, data) in enumerate(self._sims):
            qpos[i] = data.qpos
            qvel[i] = data.qvel
            limit = self._limits[i]
            if limit is not None:
                limit._elapsed_steps += 1
                truncated[i] = limit._elapsed_steps >= limit._max_episode_steps

        # Gymnasium's arithmetic, elementwise over the envs (same dtypes, same order).
        x_velocity = (qpos[:, 0] - x_before) / dt
        velocity = np.clip(qvel, -10, 10) if task.has_health else qvel
        obs = np.concatenate((qpos[:, 1:] if task.exclude_x else qpos, velocity), axis=1)
        if task.keep is not None:
            obs = obs[:, task.keep]
        self._after_step(obs)
        ctrl_cost = task.ctrl_weight * np.sum(np.square(actions), axis=1)
        forward_reward = task.forward_weight * x_velocity
        if not task.has_health:
            return obs, forward_reward - ctrl_cost, np.zeros(n, dtype=bool), truncated

        z, angle = qpos[:, 1], qpos[:, 2]
        healthy = (task.healthy_z[0] < z) & (z < task.healthy_z[1])
        healthy &= (task.healthy_angle[0] < angle) & (angle < task.healthy_angle[1])
        if task.healthy_state is not None:
            state = np.concatenate((qpos[:, 2:], qvel), axis=1)
            low, high = (np.asarray(bound) for bound in task.healthy_state)
            healthy &= np.all((low < state) & (state < high), axis=1)
        reward = forward_reward + healthy * task.healthy_reward - ctrl_cost
        terminated = ~healthy if task.terminate_when_unhealthy else np.zeros(n, dtype=bool)
        return obs, reward, terminated, truncated

    def _before_step(self, actions: np.ndarray) -> np.ndarray:
        """The actions applied now ``[N, nu]`` (delayed where an env's dynamics delay
        them; its push, if any, made): ``RandomizedDynamics.step``'s first half."""
        if not any(self._dynamics):
            return actions
        applied = np.array(actions, copy=True)
        for i, dynamics in enumerate(self._dynamics):
            if dynamics is not None:
                applied[i] = dynamics.before_step(actions[i])
        return applied

    def _after_step(self, obs: np.ndarray) -> None:
        """Observation noise, in place on ``obs [N, obs_dim]``: the step's second half."""
        for i, dynamics in enumerate(self._dynamics):
            if dynamics is not None:
                obs[i] = dynamics.after_step(obs[i])


def locomotion_step(envs: list[gym.Env], physics_threads: int = 1) -> LocomotionStep | None:
    """A batched step for ``envs`` if they are copies of one known task, else None."""
    tasks = [_Task.of(env) for env in envs]
    if not tasks or any(t is None for t in tasks):
        return None
    if not all(t.same_as(tasks[0]) for t in tasks[1:]):
        return None
    return LocomotionStep(envs, tasks[0], physics_threads)
