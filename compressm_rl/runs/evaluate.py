"""Deterministic evaluation of any controller: a trained run's torch policy, an exported
``.onnx`` file or a C export, through one stepping interface (``Controller``).

Convention: one env, episode k starts with ``env.reset(seed=seed + k)`` and the
controller's ``reset()``, actions are the deterministic (clipped mean) ones, and the
return is the sum of raw rewards until the episode terminates or is truncated. With
randomized ``dynamics`` the same seed also fixes episode k's draw (``envs.dynamics``).

``evaluate_grid`` evaluates on held-out dynamics: each grid point fixes named parameters
(``mass``, ``friction``, ...) to one value, with the same episode seeds at every point.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from envs import Dynamics, make_env, parse_dynamics, parse_grid
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


def evaluate(
    controller: Controller,
    env_id: str,
    episodes: int = 10,
    seed: int = 0,
    dynamics: Dynamics | str | None = None,
) -> np.ndarray:
    """Undiscounted returns of ``episodes`` deterministic episodes, ``[episodes]`` float64,
    on the plain task or with ``dynamics`` (a ``Dynamics`` or spec, drawn per episode).

    Raises ValueError if the controller's observation or action size is not the env's
    (e.g. a policy trained on another task)."""
    env = make_env(env_id, dynamics)
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


@dataclass
class GridResult:
    """Returns over a grid of fixed dynamics: ``points[j]`` (``{key: value}``) gave the
    returns ``returns[j]`` (``[points, episodes]`` float64)."""

    env_id: str
    grid: dict[str, list[float]]
    points: list[dict[str, float]]
    returns: np.ndarray

    def rows(self) -> list[dict[str, float]]:
        """Each point's values with its ``mean`` and ``std`` return (JSON-ready)."""
        return [
            {**point, "mean": float(r.mean()), "std": float(r.std())}
            for point, r in zip(self.points, self.returns, strict=True)
        ]

    def markdown(self) -> str:
        """One row per grid point: its values, mean and std of the return."""
        keys = list(self.grid)
        rows = [f"| {' | '.join(keys)} | mean return | std |", "|" + "---|" * (len(keys) + 2)]
        for point, returns in zip(self.points, self.returns, strict=True):
            values = " | ".join(f"{point[k]:g}" for k in keys)
            rows.append(f"| {values} | {returns.mean():.1f} | {returns.std():.1f} |")
        return "\n".join(rows)


def evaluate_grid(
    controller: Controller,
    env_id: str,
    grid: dict[str, list[float]] | str,
    episodes: int = 10,
    seed: int = 0,
    dynamics: Dynamics | str | None = None,
) -> GridResult:
    """``evaluate`` at every point of ``grid`` (``{key: values}`` or a spec such as
    ``mass=0.5:1.5:5,friction=0.3:2:5``, ``envs.dynamics.parse_grid``): each point fixes
    its keys to one value on top of ``dynamics`` (unset keys: nominal, or drawn from
    ``dynamics`` where it sets them). Points are the product of the values, first key
    outermost."""
    grid = parse_grid_spec(grid)
    base = parse_dynamics(dynamics)
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    fixed = [base.fixed(**point) for point in points]  # every point checked before any runs
    returns = [evaluate(controller, env_id, episodes, seed, dynamics) for dynamics in fixed]
    return GridResult(env_id, grid, points, np.array(returns))


def parse_grid_spec(grid: dict[str, list[float]] | str) -> dict[str, list[float]]:
    """A grid as ``{key: values}``, from a spec string (``envs.parse_grid``) or a mapping;
    ``evaluate_grid`` checks every point before it evaluates any."""
    if isinstance(grid, str):
        return parse_grid(grid)
    grid = {key: list(values) for key, values in grid.items()}
    if not grid or not all(grid.values()):
        raise ValueError(f"dynamics grid {grid} needs one key or more, each with values")
    return grid


def write_grid(result: GridResult, out_dir: Path) -> list[Path]:
    """``dynamics_grid.md`` (the table) and, for a 1- or 2-key grid, ``dynamics_grid.png``
    (mean return against the key, or a heat map over the two) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "dynamics_grid.md"
    title = f"# {result.env_id}: mean return over held-out dynamics\n\n"
    table.write_text(title + result.markdown() + "\n")
    if len(result.grid) > 2:
        return [table]
    image = out_dir / "dynamics_grid.png"
    _plot_grid(result, image)
    return [table, image]


def _plot_grid(result: GridResult, path: Path) -> None:
    """A line (one key) or a heat map (two keys, first on the rows) of the mean return."""
    from matplotlib.figure import Figure  # no pyplot: no global backend to set

    keys = list(result.grid)
    means = result.returns.mean(axis=1)
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    if len(keys) == 1:
        ax.plot(result.grid[keys[0]], means, marker="o")
        ax.set(xlabel=keys[0], ylabel="mean return")
    else:
        rows, cols = (result.grid[k] for k in keys)
        image = ax.imshow(means.reshape(len(rows), len(cols)), origin="lower", aspect="auto")
        ax.set_xticks(range(len(cols)), [f"{v:g}" for v in cols])
        ax.set_yticks(range(len(rows)), [f"{v:g}" for v in rows])
        ax.set(xlabel=keys[1], ylabel=keys[0])
        fig.colorbar(image, ax=ax, label="mean return")
    ax.set_title(f"{result.env_id}: {result.returns.shape[1]} episodes per point")
    fig.savefig(path, dpi=100)
