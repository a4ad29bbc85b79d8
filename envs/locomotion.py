"""One step of N copies of a Gymnasium MuJoCo locomotion task, the Python done once.

Gymnasium's locomotion tasks spend more time in Python than in the physics: a Hopper-v5
step is ~210 µs on the AMD EPYC VM, of which ``mj_step`` (4 RK4 frames) is ~115 µs; the
rest is the health check (computed twice per step), ``state_vector``, ``clip``, the
reward terms and three wrappers, once per env. :class:`LocomotionStep` keeps the physics
per env (``mujoco.mj_step`` on each env's own ``MjModel``/``MjData``) and computes
observations, rewards, terminations and the time limit once for all N envs with numpy,
with the same float operations in the same order as Gymnasium's code, so every number is
bit-identical to stepping the envs one by one (``tests/test_envs.py`` checks it step for
step, resets included). Batched: Hopper-v5, Walker2d-v5, HalfCheetah-v5, Swimmer-v5,
Ant-v5 and Humanoid-v5.

It reads each task's settings (reward weights, health ranges, ``frame_skip``,
``max_episode_steps``, the observation's optional parts, ...) from the env instances
when it is built, so ``gym.make`` keyword arguments hold; the timestep is read at every
step (``MujocoEnv.dt``). Envs it does not know (other tasks, other or repeated wrappers,
subclasses, rendering) are not batched: :func:`locomotion_step` returns None and the
caller steps them one by one. The ctrl cost is ``w * float32 sum`` as in Gymnasium under
NumPy 2's promotion rules (NumPy 1 would promote Gymnasium's scalar to float64 but not
this array).

Contact forces: Ant-v5 and Humanoid-v5 read ``cfrc_ext`` (their contact cost, and by
default their observation), which ``mj_step`` leaves stale; as Gymnasium does, each env
runs ``mj_rnePostConstraint`` after its step. The other tasks' observations and rewards
do not read it, so they skip it (in their ``env.unwrapped.data``, ``cacc``/``cfrc_*``
are stale). The per-step ``info`` dicts (reward terms, positions) are left out.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.humanoid_v5 import HumanoidEnv, mass_center
from gymnasium.envs.mujoco.swimmer_v5 import SwimmerEnv
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
_TASKS = (HopperEnv, Walker2dEnv, HalfCheetahEnv, SwimmerEnv, AntEnv, HumanoidEnv)
# The planar walkers: health from the torso's height and angle (qpos[1], qpos[2]) and
# velocities clipped to ±10 in the observation.
_WALKERS = (HopperEnv, Walker2dEnv)
# The rows of each MjData array the observation takes (``include_*_in_observation``).
_EXTRA_ROWS = {"cinert": 1, "cvel": 1, "qfrc_actuator": 6, "cfrc_ext": 1}


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
class TaskSettings:
    """The settings of one task, read from an env instance (all copies must agree): the
    one reader of Gymnasium's private task attributes (the C control loop reads them here
    too)."""

    kind: type
    frame_skip: int
    forward_weight: float
    ctrl_weight: float
    healthy_reward: float
    terminate_when_unhealthy: bool
    skip_qpos: int  # leading qpos entries left out of the observation (0, 1 or 2)
    healthy_z: tuple | None  # None: the task has no health (HalfCheetah, Swimmer)
    healthy_angle: tuple | None  # the walkers only
    healthy_state: tuple | None  # Hopper only: (low, high), scalars or per-element arrays
    main_body: int  # Ant: the body whose x position gives the forward velocity
    contact_weight: float  # Ant, Humanoid; 0 elsewhere
    contact_clip: tuple | None  # Ant: clip of each force; Humanoid: clip of the cost
    extra_obs: tuple  # MjData arrays appended to the observation (Ant, Humanoid)
    keep: np.ndarray | None  # observation indices kept by KeepPartObservation

    @classmethod
    def of(cls, env: gym.Env) -> TaskSettings | None:
        wrappers = _handled_wrappers(env)
        layer = env.unwrapped
        kind = type(layer)
        if wrappers is None or kind not in _TASKS or layer.render_mode is not None:
            return None
        if wrappers.get(RandomizedDynamics, env) is not env:  # its noise must come last
            return None
        keep = wrappers.get(KeepPartObservation)
        health = kind in (*_WALKERS, AntEnv, HumanoidEnv)
        planar = kind in (*_WALKERS, HalfCheetahEnv)
        exclude = layer._exclude_current_positions_from_observation
        return cls(
            kind=kind,
            frame_skip=layer.frame_skip,
            forward_weight=layer._forward_reward_weight,
            ctrl_weight=layer._ctrl_cost_weight,
            healthy_reward=layer._healthy_reward if health else 0.0,
            terminate_when_unhealthy=layer._terminate_when_unhealthy if health else False,
            skip_qpos=(1 if planar else 2) if exclude else 0,
            healthy_z=tuple(layer._healthy_z_range) if health else None,
            healthy_angle=tuple(layer._healthy_angle_range) if kind in _WALKERS else None,
            healthy_state=tuple(layer._healthy_state_range) if kind is HopperEnv else None,
            main_body=layer.data.body(layer._main_body).id if kind is AntEnv else 0,
            contact_weight=layer._contact_cost_weight if kind in (AntEnv, HumanoidEnv) else 0.0,
            contact_clip=(
                tuple(layer._contact_force_range)
                if kind is AntEnv
                else tuple(layer._contact_cost_range)
                if kind is HumanoidEnv
                else None
            ),
            extra_obs=_extra_observations(layer),
            keep=None if keep is None else keep._index,
        )

    def same_as(self, other: TaskSettings) -> bool:
        return all(_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


def _extra_observations(layer) -> tuple:
    """The MjData arrays ``layer`` appends to its observation after qpos and qvel."""
    if type(layer) is AntEnv:
        return ("cfrc_ext",) if layer._include_cfrc_ext_in_observation else ()
    if type(layer) is HumanoidEnv:
        return tuple(
            name
            for name in _EXTRA_ROWS
            if getattr(layer, f"_include_{name}_in_observation") is True
        )
    return ()


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

    def __init__(self, envs: list[gym.Env], task: TaskSettings, physics_threads: int = 1) -> None:
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
        self._contacts = task.kind in (AntEnv, HumanoidEnv)
        model, data = self._sims[0]
        self._qpos = np.empty((len(envs), model.nq))
        self._qvel = np.empty((len(envs), model.nv))
        # The MjData arrays the step reads besides qpos and qvel, gathered over the envs.
        read = {*task.extra_obs, *(("cfrc_ext", "ctrl") if self._contacts else ())}
        self._arrays = {name: np.empty((len(envs), *getattr(data, name).shape)) for name in read}

    def __call__(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        """Step every env once with ``actions [N, nu]``.

        Returns ``(obs [N, obs_dim] float64, reward [N] float64, terminated [N] bool,
        truncated [N] bool)`` of the step, before any autoreset.
        """
        task, qpos, qvel = self.task, self._qpos, self._qvel
        n = len(self._sims)
        actions = self._before_step(actions)
        x_before, x_after, dt = np.empty(n), np.empty(n), np.empty(n)
        truncated = np.zeros(n, dtype=bool)
        for i, (model, data) in enumerate(self._sims):
            x_before[i] = self._forward_position(model, data)
            dt[i] = model.opt.timestep * task.frame_skip  # MujocoEnv.dt, read as it is now
            data.ctrl[:] = actions[i]
            if self.physics is None:
                mujoco.mj_step(model, data, nstep=task.frame_skip)
        if self.physics is not None:
            self.physics.step(task.frame_skip)
        for i, (model, data) in enumerate(self._sims):
            if self._contacts:
                mujoco.mj_rnePostConstraint(model, data)
            x_after[i] = self._forward_position(model, data)
            qpos[i] = data.qpos
            qvel[i] = data.qvel
            for name, array in self._arrays.items():
                array[i] = getattr(data, name)
            limit = self._limits[i]
            if limit is not None:
                limit._elapsed_steps += 1
                truncated[i] = limit._elapsed_steps >= limit._max_episode_steps

        # Gymnasium's arithmetic, elementwise over the envs (same dtypes, same order).
        x_velocity = (x_after - x_before) / dt
        obs = self._observation(qpos, qvel)
        self._after_step(obs)
        forward_reward = task.forward_weight * x_velocity
        if task.kind is HumanoidEnv:  # its ctrl cost reads data.ctrl (float64)
            ctrl_cost = task.ctrl_weight * np.sum(np.square(self._arrays["ctrl"]), axis=1)
        else:
            ctrl_cost = task.ctrl_weight * np.sum(np.square(actions), axis=1)
        if task.healthy_z is None:
            return obs, forward_reward - ctrl_cost, np.zeros(n, dtype=bool), truncated

        healthy = self._healthy(qpos, qvel)
        rewards = forward_reward + healthy * task.healthy_reward
        costs = ctrl_cost + self._contact_cost() if self._contacts else ctrl_cost
        reward = rewards - costs
        terminated = ~healthy if task.terminate_when_unhealthy else np.zeros(n, dtype=bool)
        return obs, reward, terminated, truncated

    def _forward_position(self, model: mujoco.MjModel, data: mujoco.MjData) -> float:
        """The x position whose change per step is the task's forward velocity."""
        kind = self.task.kind
        if kind is AntEnv:
            return data.xpos[self.task.main_body, 0]
        if kind is HumanoidEnv:
            return mass_center(model, data)[0]
        return data.qpos[0]

    def _observation(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """``[N, obs_dim]``: qpos (less the skipped entries), qvel (clipped for the walkers)
        and the task's optional MjData arrays, each flattened row by row."""
        task, n = self.task, len(qpos)
        velocity = np.clip(qvel, -10, 10) if task.kind in _WALKERS else qvel
        parts = [qpos[:, task.skip_qpos :], velocity]
        for name in task.extra_obs:
            array = self._arrays[name]
            if task.kind is AntEnv:  # Ant observes the clipped forces
                array = np.clip(array, *task.contact_clip)
            parts.append(array[:, _EXTRA_ROWS[name] :].reshape(n, -1))
        obs = np.concatenate(parts, axis=1)
        return obs if task.keep is None else obs[:, task.keep]

    def _healthy(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """``[N]`` bool: each task's own health rule (its comparisons, its bounds)."""
        task = self.task
        low, high = task.healthy_z
        z = qpos[:, 1] if task.kind in _WALKERS else qpos[:, 2]
        if task.kind is AntEnv:  # inclusive bounds, and a finite state
            state = np.concatenate((qpos, qvel), axis=1)
            return np.isfinite(state).all(axis=1) & (low <= z) & (z <= high)
        healthy = (low < z) & (z < high)
        if task.kind in _WALKERS:
            angle = qpos[:, 2]
            healthy &= (task.healthy_angle[0] < angle) & (angle < task.healthy_angle[1])
        if task.healthy_state is not None:
            state = np.concatenate((qpos[:, 2:], qvel), axis=1)
            low, high = (np.asarray(bound) for bound in task.healthy_state)
            healthy &= np.all((low < state) & (state < high), axis=1)
        return healthy

    def _contact_cost(self) -> np.ndarray:
        """``[N]``: Ant's ``w · Σ clip(cfrc_ext)²``, Humanoid's ``clip(w · Σ cfrc_ext²)``.
        Summed env by env, as Gymnasium sums one env's ``[nbody, 6]`` array: numpy's
        pairwise sum adds in an order that a reduction over the stacked array need not
        keep."""
        task, forces = self.task, self._arrays["cfrc_ext"]
        if task.kind is AntEnv:
            forces = np.clip(forces, *task.contact_clip)
        sums = np.array([np.sum(np.square(f)) for f in forces])
        cost = task.contact_weight * sums
        return np.clip(cost, *task.contact_clip) if task.kind is HumanoidEnv else cost

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
    tasks = [TaskSettings.of(env) for env in envs]
    if not tasks or any(t is None for t in tasks):
        return None
    if not all(t.same_as(tasks[0]) for t in tasks[1:]):
        return None
    return LocomotionStep(envs, tasks[0], physics_threads)
