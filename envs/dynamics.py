"""Randomized dynamics: a per-episode draw of the model's physical parameters, an action
delay, observation noise and random pushes, so a policy meets more than one simulator.

A :class:`Dynamics` holds ranges (each optional: unset means nominal), written as
``mass=0.7:1.3,friction=0.5:1.5,delay=0:2`` or as a preset (``none``, ``mild``,
``wide``), optionally followed by overrides (``wide,delay=0:3``). :class:`RandomizedDynamics`
wraps one MuJoCo env: at every reset it draws the episode's values from its own
generator (seeded by ``reset(seed=s)``, so the seed fixes them), scales its own
``MjModel`` from the nominal values saved when it was built (never compounded), and
then delays the actions, kicks the root and adds noise to the observations.

The batched locomotion step (``envs.locomotion``) calls the same :meth:`before_step` and
:meth:`after_step` for each env, in the same order, so it stays bit-identical.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields, replace

import gymnasium as gym
import mujoco
import numpy as np

# The smallest value of each key, and whether that bound is exclusive.
_LOWEST = {
    "mass": (0.0, True),
    "friction": (0.0, True),
    "damping": (0.0, False),
    "gain": (0.0, True),
    "delay": (0, False),
    "obs_noise": (0.0, False),
    "push": (0.0, False),
    "push_prob": (0.0, False),
}
MAX_DELAY = 100  # control steps; more is a typo
# Draws the episode's values and the noise; salted so that it is not the stream of the
# env's own np_random, which Gymnasium seeds with the same reset seed.
_SALT = 0x44594E


@dataclass(frozen=True)
class Dynamics:
    """Ranges ``(low, high)`` of the randomized quantities; None keeps the nominal value.

    mass, friction, damping, gain: scales of the nominal ``body_mass``, sliding
    ``geom_friction[:, 0]``, ``dof_damping`` and motor strength (``actuator_gainprm[:, 0]``;
    with kp, kv of affine-bias actuators), one uniform draw per episode for the whole
    model. delay: actions held back this many control steps (integers, inclusive).
    obs_noise: std of Gaussian noise added to every observation entry (drawn per
    episode, then noise per step). push: speed (m/s; the planar walkers' root x, a free
    root's x and y) of a kick, drawn per push with a random sign; push_prob: the chance
    of a push at each control step (drawn per episode).
    """

    mass: tuple[float, float] | None = None
    friction: tuple[float, float] | None = None
    damping: tuple[float, float] | None = None
    gain: tuple[float, float] | None = None
    delay: tuple[int, int] | None = None
    obs_noise: tuple[float, float] | None = None
    push: tuple[float, float] | None = None
    push_prob: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for key, bounds in self.ranges().items():
            _check_range(key, bounds)
        if (self.push is None) != (self.push_prob is None):
            raise ValueError(
                "dynamics: push (kick speed) and push_prob (chance per step) go together; "
                "set both, e.g. push=0:0.5,push_prob=0.002"
            )

    def ranges(self) -> dict[str, tuple]:
        """The set keys and their ranges, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    @property
    def is_none(self) -> bool:
        """Nothing randomized: the env is built without the wrapper."""
        return not self.ranges()

    def fixed(self, **values: float) -> Dynamics:
        """A copy with each named key fixed to one value (a grid point)."""
        for key in values:
            _check_key(key, f"{key}={values[key]}")
        return replace(self, **{k: (v, v) for k, v in values.items()})

    def __str__(self) -> str:
        """The spec string ``parse_dynamics`` reads back (``none`` when empty)."""
        items = [f"{k}={_format(lo)}:{_format(hi)}" for k, (lo, hi) in self.ranges().items()]
        return ",".join(items) or "none"


def parse_dynamics(spec: str | Dynamics | None) -> Dynamics:
    """``'wide'``, ``'mass=0.7:1.3,delay=0:2'``, ``'mild,push=0:1,push_prob=0.01'``, ``''``
    or None (nothing) -> a ``Dynamics``; a one-line ``ValueError`` naming the bad part."""
    if isinstance(spec, Dynamics):
        return spec
    items = [item.strip() for item in (spec or "").split(",") if item.strip()]
    base = Dynamics()
    if items and "=" not in items[0]:
        name = items.pop(0)
        if name not in PRESETS:
            raise ValueError(f"dynamics {spec!r}: unknown preset {name!r}; {_FORM}")
        base = PRESETS[name]
    values: dict[str, tuple] = {}
    for item in items:
        key, _, text = item.partition("=")
        key = key.strip()
        _check_key(key, item)
        values[key] = _parse_range(key, text, item)
    return replace(base, **values)


def parse_grid(spec: str) -> dict[str, list[float]]:
    """``'mass=0.5:1.5:5,delay=0:2:3'`` -> ``{'mass': [0.5, 0.75, ..., 1.5], 'delay':
    [0, 1, 2]}``: ``key=low:high:count`` (evenly spaced, ends included) or ``key=value``."""
    grid: dict[str, list[float]] = {}
    for item in (i.strip() for i in spec.split(",") if i.strip()):
        key, _, text = item.partition("=")
        key = key.strip()
        _check_key(key, item)
        parts = text.split(":")
        try:
            numbers = [float(p) for p in parts]
            if len(parts) == 3 and (numbers[2] != int(numbers[2]) or numbers[2] < 2):
                raise ValueError
        except ValueError:
            numbers = []
        if len(numbers) not in (1, 3):
            raise ValueError(
                f"dynamics grid {item!r}: write key=low:high:count (count 2 or more) or "
                f"key=value, e.g. mass=0.5:1.5:5"
            )
        values = numbers if len(numbers) == 1 else np.linspace(*numbers[:2], int(numbers[2]))
        values = [float(v) for v in values]
        if key == "delay":
            if any(v != round(v) for v in values):
                raise ValueError(f"dynamics grid {item!r}: delay values must be whole steps")
            values = [int(round(v)) for v in values]
        for v in values:
            _check_range(key, (v, v))
        grid[key] = values
    if not grid:
        raise ValueError(f"dynamics grid {spec!r} is empty; e.g. mass=0.5:1.5:5,friction=0.3:2:5")
    return grid


def _check_key(key: str, item: str) -> None:
    if key not in KEYS:
        raise ValueError(f"dynamics {item!r}: unknown key {key!r}; {_FORM}")


def _parse_range(key: str, text: str, item: str) -> tuple:
    parts = text.split(":")
    kind = int if key == "delay" else float
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        low, high = kind(parts[0]), kind(parts[-1])
    except ValueError:
        what = "whole numbers of control steps" if key == "delay" else "numbers"
        raise ValueError(f"dynamics {item!r}: {key} takes {what}; {_FORM}") from None
    return (low, high)


def _check_range(key: str, bounds: tuple) -> None:
    """One-line ValueError unless ``bounds`` is a valid ``(low, high)`` for ``key``."""
    low, high = bounds
    lowest, exclusive = _LOWEST[key]
    top = {"delay": MAX_DELAY, "push_prob": 1.0}.get(key, np.inf)
    if key == "delay" and not all(isinstance(b, int | np.integer) for b in bounds):
        raise ValueError(f"dynamics {key}={low}:{high}: delay takes whole control steps")
    ok = np.isfinite(low) and np.isfinite(high) and low <= high <= top
    ok = ok and (low > lowest if exclusive else low >= lowest)
    if not ok:
        floor = f"above {lowest}" if exclusive else f"at least {lowest}"
        ceiling = f", at most {top}" if np.isfinite(top) else ""
        raise ValueError(
            f"dynamics {key}={_format(low)}:{_format(high)} is out of range: low <= high, "
            f"{floor}{ceiling}"
        )


def _format(value: float) -> str:
    """Shortest text that reads back to the same number."""
    return str(int(value)) if isinstance(value, int | np.integer) else repr(float(value))


PRESETS = {
    "none": Dynamics(),
    # A few percent around nominal: a policy should not notice.
    "mild": Dynamics(
        mass=(0.9, 1.1),
        friction=(0.8, 1.2),
        damping=(0.9, 1.1),
        gain=(0.95, 1.05),
        delay=(0, 1),
        obs_noise=(0.0, 0.005),
    ),
    # legged_gym / walk-these-ways style: friction 0.5-1.25 widened to 1.5, mass ±30%,
    # motor strength ±20% (their 0.9-1.1, widened), 0-2 control steps of delay (8-16 ms
    # at Hopper's 125 Hz), small noise, and a rare root kick of up to 0.5 m/s.
    "wide": Dynamics(
        mass=(0.7, 1.3),
        friction=(0.5, 1.5),
        damping=(0.7, 1.3),
        gain=(0.8, 1.2),
        delay=(0, 2),
        obs_noise=(0.0, 0.02),
        push=(0.0, 0.5),
        push_prob=(0.002, 0.002),
    ),
}
KEYS = tuple(f.name for f in fields(Dynamics))
_FORM = (
    f"write key=low:high or key=value with keys {', '.join(KEYS)}, comma-separated, "
    f"optionally after a preset ({', '.join(PRESETS)})"
)


class RandomizedDynamics(gym.Wrapper):
    """A MuJoCo env whose dynamics are drawn from ``dynamics`` at every reset.

    Must be the outermost wrapper for the batched locomotion step to take it (the noise
    goes on the observation the policy sees, POMDP variants included).

    Attributes:
        dynamics_params: the current episode's values, ``{key: float}`` (``delay``,
            an int), for the keys ``dynamics`` sets.
    """

    def __init__(self, env: gym.Env, dynamics: Dynamics | str) -> None:
        super().__init__(env)
        self.dynamics = parse_dynamics(dynamics)
        model = env.unwrapped.model
        self._nominal = {
            "body_mass": model.body_mass.copy(),
            "geom_friction": model.geom_friction.copy(),
            "dof_damping": model.dof_damping.copy(),
            "actuator_gainprm": model.actuator_gainprm.copy(),
            "actuator_biasprm": model.actuator_biasprm.copy(),
        }
        self._affine = model.actuator_biastype == mujoco.mjtBias.mjBIAS_AFFINE
        # The kicked velocity: the root's horizontal dofs (x, y of a free joint, else its
        # first dof: the planar walkers' x slide, the pendulum's cart).
        free = model.njnt and model.jnt_type[0] == mujoco.mjtJoint.mjJNT_FREE
        self._push_dofs = np.array([0, 1] if free else [0])
        self._rng: np.random.Generator | None = None
        self._queue: deque = deque()
        self.dynamics_params: dict[str, float] = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng([seed, _SALT])
        elif self._rng is None:
            self._rng = np.random.default_rng()  # unseeded, as Gymnasium's own
        self.dynamics_params = self._draw()
        self._apply()
        self._queue = deque()
        obs, info = self.env.reset(seed=seed, options=options)
        return self._noisy(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(self.before_step(action))
        return self.after_step(obs), reward, terminated, truncated, info

    def before_step(self, action: np.ndarray) -> np.ndarray:
        """The action to apply now (the one given ``delay`` steps ago; zeros before the
        first), after a push of the root when one is drawn. ``action [act_dim]``."""
        action = np.array(action, copy=True)  # the caller may reuse its buffer
        params = self.dynamics_params
        if "push_prob" in params and self._rng.random() < params["push_prob"]:
            self._kick()
        delay = params.get("delay", 0)
        if delay == 0:
            return action
        if not self._queue:
            self._queue.extend(np.zeros_like(action) for _ in range(delay))
        self._queue.append(action)
        return self._queue.popleft()

    def after_step(self, obs: np.ndarray) -> np.ndarray:
        """The observation the policy sees, ``[obs_dim]`` float64."""
        return self._noisy(obs)

    def _draw(self) -> dict[str, float]:
        """This episode's values, drawn in field order from the wrapper's generator."""
        params: dict[str, float] = {}
        for key, (low, high) in self.dynamics.ranges().items():
            if key == "delay":
                params[key] = int(self._rng.integers(low, high, endpoint=True))
            elif key != "push":  # a push's speed is drawn at each push
                params[key] = float(self._rng.uniform(low, high))
        return params

    def _apply(self) -> None:
        """Scale this env's model from the nominal values (never from the last episode's)."""
        model, data = self.env.unwrapped.model, self.env.unwrapped.data
        params, nominal = self.dynamics_params, self._nominal
        model.body_mass[:] = nominal["body_mass"] * params.get("mass", 1.0)
        model.geom_friction[:, 0] = nominal["geom_friction"][:, 0] * params.get("friction", 1.0)
        model.dof_damping[:] = nominal["dof_damping"] * params.get("damping", 1.0)
        gain = params.get("gain", 1.0)
        model.actuator_gainprm[:, 0] = nominal["actuator_gainprm"][:, 0] * gain
        # Position/affine actuators (kp, kv in the bias) scale with their gain; the four
        # tasks' motors (gain 1, no bias) need only the gain.
        biasprm = nominal["actuator_biasprm"].copy()
        biasprm[self._affine, :3] *= gain
        model.actuator_biasprm[:] = biasprm
        if "mass" in params:
            mujoco.mj_setConst(model, data)  # derived inertias; data is reset after this

    def _kick(self) -> None:
        """Add a velocity of random sign and a speed drawn from ``push`` to the root.

        A velocity kick, not an ``xfrc_applied`` force held for a control step: its size
        does not depend on the body's mass or the task's step length (Hopper 8 ms,
        HalfCheetah 50 ms), so one ``push`` range means the same on every task; it is
        legged_gym's ``push_robots``."""
        low, high = self.dynamics.push
        speed = self._rng.uniform(low, high, size=len(self._push_dofs))
        sign = np.where(self._rng.random(len(self._push_dofs)) < 0.5, -1.0, 1.0)
        self.env.unwrapped.data.qvel[self._push_dofs] += sign * speed

    def _noisy(self, obs: np.ndarray) -> np.ndarray:
        std = self.dynamics_params.get("obs_noise")
        if std is None:
            return obs
        return obs + self._rng.normal(0.0, std, size=np.shape(obs))
