"""An exported C policy driving MuJoCo in C, on a real-time schedule, without Python.

    result = run_loop(Path("runs/hopper/policy_c"), episodes=10, seed=10_000, rate_hz=1000)
    print(format_loop_report(result))

``run_loop`` builds one C program (``control_loop_c.LOOP_SOURCE``) from the export's
``policy.c`` and MuJoCo's own C library (``libmujoco`` and its headers, from the ``mujoco``
wheel), and runs it. The program loads the task's MJCF, forms the observation, reward and
termination of Gymnasium's v5 task in C (``SUPPORTED_TASKS``, and their ``-P``/``-V``
variants), and steps policy + physics on absolute deadlines (``clock_nanosleep``), under
``mlockall`` and ``SCHED_FIFO`` where the process may use them, timing every step.

Everything that differs between tasks is read here from a Gymnasium env instance (reward
weights, health ranges, ``frame_skip``, ``max_episode_steps``, the observation's parts)
and passed to the program in a file, with the initial state of each episode: episode k
starts from the state ``env.reset(seed=seed + k)`` leaves, the convention of
``compressm_rl.runs.evaluate``, so the returns equal ``compressm-rl eval``'s for the same
export, bit for bit (the same ``policy.c`` code and the same ``libmujoco``; the tests
check it). Build files go to a temporary directory, never beside the export.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.humanoid_v5 import HumanoidEnv
from gymnasium.envs.mujoco.inverted_pendulum_v5 import InvertedPendulumEnv
from gymnasium.envs.mujoco.swimmer_v5 import SwimmerEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv
from gymnasium.wrappers import OrderEnforcing, PassiveEnvChecker, TimeLimit

from compressm_rl.control_loop_c import (
    EXTRA_OBS,
    INPUT_HEADER,
    INPUT_MAGIC,
    INPUT_PARAMS,
    LOOP_SOURCE,
    OUTPUT_HEADER,
    OUTPUT_MAGIC,
    TASK_KINDS,
)
from envs import KeepPartObservation, make_env, split_env_id
from envs.locomotion import TaskSettings
from export.bench import cpu_model
from export.c_build import (
    C_STANDARD,
    HOST_FLAGS,
    SOURCE_NAME,
    ToolchainError,
    check_weights_finite,
    find_tool,
    read_header_dims,
    read_metadata,
    run_tool,
    source_dir,
)

SUPPORTED_TASKS = tuple(TASK_KINDS)  # and each with -P or -V (envs.pomdp)
MAX_RATE_HZ = 100_000.0  # a 10 µs period: below one MuJoCo step of these tasks
MAX_EPISODES = 1000  # per-step times are held in memory: 32 B a step, 1000 steps an episode
FIFO_PRIORITY = 80  # below the kernel's per-CPU threads (99), above ordinary RT work
# Constants of Gymnasium's v5 code (not attributes of the env): InvertedPendulum ends an
# episode when |qpos[1]| > 0.2; Hopper and Walker2d clip qvel into [-10, 10] in _get_obs.
PENDULUM_ANGLE_LIMIT = 0.2
VELOCITY_CLIP = 10.0
_TASK_CLASSES = {
    "InvertedPendulum-v5": InvertedPendulumEnv,
    "Hopper-v5": HopperEnv,
    "Walker2d-v5": Walker2dEnv,
    "HalfCheetah-v5": HalfCheetahEnv,
    "Swimmer-v5": SwimmerEnv,
    "Ant-v5": AntEnv,
    "Humanoid-v5": HumanoidEnv,
}
# policy.c is built with HOST_FLAGS, as CPolicy builds it. The loop's own code also goes
# without multiply-add fusion: its reward arithmetic must round each operation as NumPy does.
LOOP_FLAGS = [*HOST_FLAGS, "-ffp-contract=off"]
_WRAPPERS = (TimeLimit, OrderEnforcing, PassiveEnvChecker, KeepPartObservation)
# What a refusal (errno text, C locale) usually means, appended to the note.
_REFUSAL_HINTS = {
    ("mlockall", "Cannot allocate memory"): "RLIMIT_MEMLOCK (ulimit -l) is below the "
    "process's size; needs CAP_IPC_LOCK or a higher limit",
    ("mlockall", "Operation not permitted"): "needs CAP_IPC_LOCK",
    ("sched_fifo", "Operation not permitted"): "needs CAP_SYS_NICE or RLIMIT_RTPRIO (ulimit -r)",
}


@dataclass
class LoopTimes:
    """Per-control-step records of a run, ``[steps]`` int64 ns each: ``policy`` (the
    ``policy_step`` call), ``control`` (observation + policy + ctrl + physics + reward),
    ``wake`` (start minus release: scheduling latency) and ``late`` (end minus deadline;
    > 0 is a miss). ``wake`` and ``late`` are zeros without a rate."""

    policy: np.ndarray
    control: np.ndarray
    wake: np.ndarray
    late: np.ndarray


@dataclass
class _Task:
    """What the C program is told about a task (``INPUT_HEADER``/``INPUT_PARAMS`` values,
    the health ranges and the observation's indices) and the MJCF it loads."""

    header: dict[str, int]
    params: dict[str, float]
    state_low: np.ndarray  # [R] float64, R = 0 or nq - 2 + nv
    state_high: np.ndarray
    keep: np.ndarray  # [obs_dim] int64: the policy's observation within the task's
    model_path: Path


def check_arguments(episodes: int, seed: int, rate_hz: float | None, spin_us: float = 0.0) -> float:
    """ValueError for arguments the loop cannot run; the rate in Hz (0: as fast as
    possible)."""
    if isinstance(episodes, bool) or not isinstance(episodes, int | np.integer):
        raise ValueError(f"episodes must be an integer, got {episodes!r}")
    if not 1 <= episodes <= MAX_EPISODES:
        raise ValueError(f"episodes must be in [1, {MAX_EPISODES}], got {episodes}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rate = _rate(rate_hz)
    if not (isinstance(spin_us, int | float) and math.isfinite(spin_us) and spin_us >= 0):
        raise ValueError(f"spin_us must be a number of µs >= 0, got {spin_us!r}")
    if spin_us and not rate:
        raise ValueError("spin_us applies to a loop with a rate: give rate_hz too")
    if spin_us * 1e-6 * rate >= 1:
        raise ValueError(
            f"spin_us = {spin_us:g} is not shorter than the period at {rate:g} Hz "
            f"({1e6 / rate:g} µs)"
        )
    return rate


def _rate(rate_hz: float | None) -> float:
    """``rate_hz`` checked, in Hz; 0 for None or 0 (as fast as possible)."""
    if rate_hz is None:
        return 0.0
    try:
        rate = float(rate_hz)
    except (TypeError, ValueError):
        raise ValueError(f"rate_hz must be a number of Hz or None, got {rate_hz!r}") from None
    if rate != 0.0 and not (math.isfinite(rate) and 0.0 < rate <= MAX_RATE_HZ):
        raise ValueError(
            f"rate_hz must be in (0, {MAX_RATE_HZ:g}] Hz (or None / 0: as fast as "
            f"possible), got {rate_hz!r}"
        )
    return rate


def supported_base(env_id: str) -> str:
    """The supported v5 task behind ``env_id`` (``'Hopper-v5-P'`` -> ``'Hopper-v5'``), or a
    one-line ValueError naming the supported tasks."""
    base, _ = split_env_id(env_id)
    if base not in TASK_KINDS:
        raise ValueError(
            f"the C control loop does not support {env_id!r}; supported: "
            f"{', '.join(SUPPORTED_TASKS)} (each also with -P or -V)"
        )
    return base


def _wrappers(env: gym.Env) -> dict[type, gym.Wrapper]:
    """``env``'s wrappers by type; ValueError for one the C program does not reproduce."""
    found: dict[type, gym.Wrapper] = {}
    while isinstance(env, gym.Wrapper):
        if type(env) not in _WRAPPERS or type(env) in found:
            raise ValueError(f"the C control loop cannot reproduce the wrapper {type(env)}")
        found[type(env)] = env
        env = env.env
    return found


def _health_settings(settings: TaskSettings | None) -> dict[str, float]:
    """The health reward and ranges of the tasks that have them: height (Hopper,
    Walker2d, Ant, Humanoid) and angle (Hopper, Walker2d); zeros where a task has none."""
    values = dict.fromkeys(("healthy_reward", "z_low", "z_high", "angle_low", "angle_high"), 0.0)
    if settings is None or settings.healthy_z is None:
        return values
    values["healthy_reward"] = float(settings.healthy_reward)
    values["z_low"], values["z_high"] = (float(z) for z in settings.healthy_z)
    if settings.healthy_angle is not None:
        values["angle_low"], values["angle_high"] = (float(a) for a in settings.healthy_angle)
    return values


def _state_range(settings: TaskSettings | None, model) -> tuple[np.ndarray, np.ndarray]:
    """Hopper's ``healthy_state_range`` per element of ``state_vector()[2:]`` ``[nq - 2 +
    nv]`` (scalars broadcast), or two empty arrays for the other tasks."""
    if settings is None or settings.healthy_state is None:
        return np.zeros(0), np.zeros(0)
    size = model.nq - 2 + model.nv
    low, high = (
        np.broadcast_to(np.asarray(bound, np.float64), (size,)).copy()
        for bound in settings.healthy_state
    )
    return low, high


def read_task(
    env: gym.Env, env_id: str, episodes: int, rate_hz: float, realtime: bool, spin_us: float = 0.0
) -> _Task:
    """The settings of ``env`` (as ``make_env(env_id)`` built it) the C program needs."""
    base = supported_base(env_id)
    layer = env.unwrapped
    if type(layer) is not _TASK_CLASSES[base] or layer.render_mode is not None:
        raise ValueError(f"{env_id}: not Gymnasium's own {base} task (a subclass, or rendering)")
    wrappers = _wrappers(env)
    limit, part = wrappers.get(TimeLimit), wrappers.get(KeepPartObservation)
    if limit is None:
        raise ValueError(f"{env_id} has no time limit: the loop would not end")
    model = layer.model
    # The locomotion tasks' settings as the batched step reads them (the pendulum has none).
    settings = TaskSettings.of(env) if base != "InvertedPendulum-v5" else None
    if settings is None and base != "InvertedPendulum-v5":
        raise ValueError(f"{env_id}: its wrappers or settings are not the task's own")
    full_dim = layer.observation_space.shape[0]  # the task's, before KeepPartObservation
    keep = np.arange(full_dim) if part is None else np.asarray(part._index)
    extra_obs = settings.extra_obs if settings else ()
    contact_range = settings.contact_clip if settings and settings.contact_clip else (0.0, 0.0)
    state_low, state_high = _state_range(settings, model)
    header = {
        "magic": INPUT_MAGIC,
        "kind": TASK_KINDS[base],
        "nq": model.nq,
        "nv": model.nv,
        "nu": model.nu,
        "na": model.na,
        "frame_skip": layer.frame_skip,
        "max_episode_steps": limit._max_episode_steps,
        "episodes": episodes,
        "obs_dim": len(keep),
        "skip_qpos": settings.skip_qpos if settings else 0,
        "extra_obs": sum(EXTRA_OBS[name] for name in extra_obs),
        "main_body": settings.main_body if settings else 0,
        "clip_velocity": int(isinstance(layer, HopperEnv | Walker2dEnv)),
        # The pendulum always ends an episode when it falls.
        "terminate_when_unhealthy": int(settings is None or settings.terminate_when_unhealthy),
        "state_range_size": len(state_low),
        "realtime": int(realtime),
        "fifo_priority": FIFO_PRIORITY,
    }
    params = {
        "timestep": float(model.opt.timestep),
        "rate_hz": rate_hz,
        "spin_us": float(spin_us),
        "forward_weight": float(settings.forward_weight) if settings else 0.0,
        "ctrl_weight": float(settings.ctrl_weight) if settings else 0.0,
        **_health_settings(settings),
        "pendulum_angle_limit": PENDULUM_ANGLE_LIMIT,
        "velocity_clip": VELOCITY_CLIP,
        "contact_weight": float(settings.contact_weight) if settings else 0.0,
        "contact_low": float(contact_range[0]),
        "contact_high": float(contact_range[1]),
    }
    return _Task(header, params, state_low, state_high, keep.astype(np.int64), layer.fullpath)


def initial_states(env: gym.Env, episodes: int, seed: int) -> list[np.ndarray]:
    """``[qpos [E, nq], qvel [E, nv], act [E, na], obs [E, obs_dim]]`` float64: the state
    ``env.reset(seed=seed + k)`` leaves for episode k and the observation it returns."""
    data = env.unwrapped.data
    rows: list[list[np.ndarray]] = [[], [], [], []]
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        for row, value in zip(rows, (data.qpos, data.qvel, data.act, obs), strict=True):
            row.append(np.array(value, np.float64))
    return [np.stack(row) for row in rows]


def write_input(path: Path, task: _Task, states: list[np.ndarray]) -> None:
    """The C program's input file (layout: ``control_loop_c.LOOP_SOURCE``'s comment)."""
    header = np.array([task.header[name] for name in INPUT_HEADER], np.int64)
    params = np.array([task.params[name] for name in INPUT_PARAMS], np.float64)
    per_episode = np.concatenate(states, axis=1)  # episode-major: qpos, qvel, act, obs
    parts = [header, params, task.state_low, task.state_high, task.keep, per_episode]
    path.write_bytes(b"".join(np.ascontiguousarray(p).tobytes() for p in parts))


def mujoco_c_library() -> tuple[Path, Path]:
    """``(include directory, libmujoco)`` inside the ``mujoco`` wheel, or a
    ToolchainError saying what to install."""
    root = Path(mujoco.__file__).parent
    include = root / "include"
    if not (include / "mujoco" / "mujoco.h").is_file():
        raise ToolchainError(
            f"MuJoCo's C headers are not in {include}; install the mujoco wheel that ships "
            f"them (pip install 'mujoco>=3')"
        )
    libraries = sorted(root.glob("libmujoco.so*")) + sorted(root.glob("libmujoco*.dylib"))
    if not libraries:
        raise ToolchainError(
            f"libmujoco is not in {root}; install the mujoco wheel (pip install mujoco)"
        )
    return include, libraries[0]


def build_loop(sources: Path, build_dir: Path) -> Path:
    """The loop executable in ``build_dir``: ``LOOP_SOURCE`` + ``sources/policy.c``, linked
    with the wheel's ``libmujoco`` (found at run time through an rpath)."""
    gcc = find_tool("gcc")
    include, library = mujoco_c_library()
    loop_c, loop_o, policy_o = (build_dir / n for n in ("loop.c", "loop.o", "policy.o"))
    exe = build_dir / "loop"
    loop_c.write_text(LOOP_SOURCE)
    common = [gcc, *C_STANDARD, "-I", str(sources), "-c"]
    run_tool(
        [*common, *LOOP_FLAGS, "-I", str(include), str(loop_c), "-o", str(loop_o)],
        f"compiling {loop_c}",
    )
    run_tool(
        [*common, *HOST_FLAGS, str(sources / SOURCE_NAME), "-o", str(policy_o)],
        f"compiling {sources / SOURCE_NAME}",
    )
    link = [gcc, str(loop_o), str(policy_o), str(library), f"-Wl,-rpath,{library.parent}"]
    run_tool([*link, "-lm", "-o", str(exe)], f"linking {exe}")
    return exe


def read_output(path: Path) -> tuple[dict[str, int], np.ndarray, np.ndarray, LoopTimes]:
    """``(header, returns [E] float64, lengths [E] int64, times)`` from the program's
    output file."""
    raw = path.read_bytes()
    values = np.frombuffer(raw, np.int64, len(OUTPUT_HEADER)).tolist()
    header = dict(zip(OUTPUT_HEADER, values, strict=True))
    if header["magic"] != OUTPUT_MAGIC:
        raise ToolchainError(f"{path} is not the loop's output")
    episodes, steps = header["episodes"], header["steps"]
    offset = 8 * len(OUTPUT_HEADER)
    returns = np.frombuffer(raw, np.float64, episodes, offset)
    lengths = np.frombuffer(raw, np.int64, episodes, offset + 8 * episodes)
    series = np.frombuffer(raw, np.int64, 4 * steps, offset + 16 * episodes).reshape(4, steps)
    return header, returns.copy(), lengths.copy(), LoopTimes(*(s.copy() for s in series))


def _status(stdout: str) -> dict:
    """The program's report lines: ``mlockall``/``sched_fifo`` -> ``(applied, text)``,
    ``mujoco`` -> version, ``rusage`` -> ``[minor faults, major faults, voluntary,
    involuntary context switches]`` during the loop."""
    found: dict = {}
    for line in stdout.splitlines():
        name, _, rest = line.partition(" ")
        if name in ("mlockall", "sched_fifo"):
            flag, _, text = rest.partition(" ")
            found[name] = (flag == "1", text)
        elif name == "mujoco":
            found[name] = rest
        elif name == "rusage":
            found[name] = [int(v) for v in rest.split()]
    return found


def steal_ns() -> int | None:
    """Time the hypervisor ran something else on this VM's CPUs since boot, all CPUs
    together (``/proc/stat``'s steal column), ns; None where it is not available."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) * 10**9 // os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def latency_summary(ns: np.ndarray) -> dict[str, float | None]:
    """p50/p99/p99.9/max of ``ns`` ``[steps]`` int64 nanoseconds, in µs (None if empty)."""
    if ns.size == 0:
        return dict.fromkeys(("p50_us", "p99_us", "p999_us", "max_us"))
    p50, p99, p999 = np.percentile(ns, [50.0, 99.0, 99.9]) / 1e3
    return {
        "p50_us": float(p50),
        "p99_us": float(p99),
        "p999_us": float(p999),
        "max_us": float(ns.max()) / 1e3,
    }


def run_loop_detailed(
    c_export: Path,
    episodes: int = 10,
    seed: int = 10_000,
    rate_hz: float | None = None,
    env_id: str | None = None,
    build_dir: Path | None = None,
    realtime: bool = True,
    spin_us: float = 0.0,
) -> tuple[dict, LoopTimes]:
    """``run_loop``'s result and the per-step times behind it."""
    rate = check_arguments(episodes, seed, rate_hz, spin_us)
    sources = source_dir(c_export)
    env_id = env_id or read_metadata(sources).get("env_id", "")
    supported_base(env_id)
    obs_dim, act_dim, _ = read_header_dims(sources)
    check_weights_finite(sources)
    env = make_env(env_id)
    try:
        env_sizes = (env.observation_space.shape[0], env.action_space.shape[0])
        if (obs_dim, act_dim) != env_sizes:
            raise ValueError(
                f"the policy takes (observation, action) sizes {(obs_dim, act_dim)} and "
                f"{env_id}'s are {env_sizes}: it was trained on another task"
            )
        task = read_task(env, env_id, int(episodes), rate, realtime, spin_us)
        states = initial_states(env, int(episodes), int(seed))
    finally:
        env.close()
    with tempfile.TemporaryDirectory(prefix="compressm-loop-", dir=build_dir) as tmp:
        tmp = Path(tmp)
        exe = build_loop(sources, tmp)
        write_input(tmp / "input.bin", task, states)
        command = [str(exe), str(task.model_path), str(tmp / "input.bin"), str(tmp / "out.bin")]
        steal_before = steal_ns()
        status = _status(run_tool(command, f"running {exe.name}", cwd=tmp).stdout.decode())
        steal_after = steal_ns()
        header, returns, lengths, times = read_output(tmp / "out.bin")
    if steal_before is not None and steal_after is not None:
        status["steal_ms"] = (steal_after - steal_before) / 1e6
    if header["obs_mismatches"]:
        raise RuntimeError(
            f"{header['obs_mismatches']} of {episodes} episodes start, in C, from another "
            f"observation than {env_id}'s reset gives: the model file or the task settings "
            f"differ from the env's"
        )
    result = _result(env_id, int(seed), rate, header, returns, lengths, times, status)
    return {**result, "spin_us": float(spin_us) if rate else None}, times


def _applied(status: dict, name: str) -> tuple[bool, str]:
    """Whether the program applied ``name`` (``mlockall``/``sched_fifo``) and its note:
    "ok", "not requested", or the errno text with a hint."""
    applied, note = status.get(name, (False, "not reported"))
    hint = _REFUSAL_HINTS.get((name, note))
    return applied, f"{note}: {hint}" if hint else note


def _result(
    env_id: str,
    seed: int,
    rate: float,
    header: dict[str, int],
    returns: np.ndarray,
    lengths: np.ndarray,
    times: LoopTimes,
    status: dict,
) -> dict:
    """``run_loop``'s dictionary (JSON-ready) from the program's output."""
    fifo, fifo_note = _applied(status, "sched_fifo")
    lock, lock_note = _applied(status, "mlockall")
    rusage = status.get("rusage")
    return {
        "env_id": env_id,
        "episodes": int(header["episodes"]),
        "seed": seed,
        "returns": returns.tolist(),
        "episode_lengths": lengths.tolist(),
        "steps": int(header["steps"]),
        "rate_hz": rate or None,
        "period_ns": int(header["period_ns"]) or None,
        "deadline_misses": int(header["deadline_misses"]),
        **latency_summary(times.policy),
        "control_step": latency_summary(times.control),
        "wake_latency": latency_summary(times.wake) if rate else None,
        "max_lateness_us": float(times.late.max()) / 1e3 if rate and times.late.size else None,
        "sched_fifo": fifo,
        "sched_fifo_note": fifo_note,
        "mlockall": lock,
        "mlockall_note": lock_note,
        "nonfinite_steps": int(header["nonfinite_steps"]),
        "mujoco_warnings": int(header["mujoco_warnings"]),
        "mujoco_version": status.get("mujoco", mujoco.__version__),
        "page_faults": sum(rusage[:2]) if rusage else None,
        "involuntary_switches": rusage[3] if rusage else None,
        "steal_ms": status.get("steal_ms"),
        "machine": cpu_model(),
    }


def run_loop(
    c_export: Path,
    episodes: int = 10,
    seed: int = 10_000,
    rate_hz: float | None = None,
    env_id: str | None = None,
    build_dir: Path | None = None,
    realtime: bool = True,
    spin_us: float = 0.0,
) -> dict:
    """Run a C export in closed loop with MuJoCo in C: ``episodes`` episodes from the
    states ``compressm-rl eval --seed seed`` starts them in, one control step every
    ``1 / rate_hz`` s (None or 0: back to back).

    Args:
        c_export: the export directory (``policy.c``, ``policy.h``) or its ``policy.c``.
        episodes: 1 to ``MAX_EPISODES``; each ends at termination or the time limit.
        seed: episode k starts from ``env.reset(seed=seed + k)``.
        rate_hz: control rate, Hz, in (0, ``MAX_RATE_HZ``]; None or 0: as fast as possible.
        env_id: the task (default: the export's own); ``SUPPORTED_TASKS``, or one of them
            with ``-P``/``-V``.
        build_dir: where the temporary build directory is made (default: the system's).
        realtime: try ``mlockall`` and ``SCHED_FIFO`` (priority ``FIFO_PRIORITY``).
        spin_us: with a rate, sleep until this many µs before each release and busy-wait
            the rest (0: sleep all the way). Measured at 1 kHz on a shared 2-vCPU VM: 100
            µs takes the wake-up latency's p50 from 13-25 µs to 0.06 µs, at the price
            of that share of a core; deadline misses and the policy step's tail, set
            there by the hypervisor's preemptions, stay as they were.
            Without a rate the loop then holds one CPU for the whole run (the kernel's
            real-time throttling leaves other tasks 5% of it).

    Returns:
        ``env_id``, ``episodes``, ``seed``, ``returns`` (``[episodes]``), ``episode_lengths``,
        ``steps`` (control steps in all), ``rate_hz`` / ``period_ns`` (None without a
        rate), ``deadline_misses`` (steps whose work ended after their period), ``p50_us``
        / ``p99_us`` / ``p999_us`` / ``max_us`` of the ``policy_step`` call, the same four
        for the whole control step (``control_step``) and for the wake-up latency
        (``wake_latency``, None without a rate), ``max_lateness_us`` (end minus deadline;
        < 0 is slack), ``sched_fifo`` / ``mlockall`` (applied or not) with ``*_note`` (the
        errno text when not), ``nonfinite_steps`` (``policy_step`` returns other than
        ``POLICY_OK``), ``mujoco_warnings``, ``mujoco_version``; what may explain a slow
        step: ``page_faults`` and ``involuntary_switches`` (preemptions inside this
        machine) during the loop, ``steal_ms`` (time the hypervisor gave this VM's CPUs to
        others during the run, all CPUs; None where unknown); and ``machine``.

    Raises:
        ValueError: bad arguments, an unsupported task, or a policy of other sizes (before
            anything is built).
        FileNotFoundError: no ``policy.c``/``policy.h`` at ``c_export``.
        export.c_build.ToolchainError: no gcc or MuJoCo headers (naming what to install),
            or a failed build or run.
        RuntimeError: the C program's episodes do not start where Gymnasium's do.
    """
    return run_loop_detailed(
        c_export, episodes, seed, rate_hz, env_id, build_dir, realtime, spin_us
    )[0]


def _row(name: str, summary: dict[str, float | None] | None) -> str:
    values = [(summary or {}).get(k) for k in ("p50_us", "p99_us", "p999_us", "max_us")]
    cells = "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in values)
    return f"{name:<14}{cells}"


def _ms(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f} ms"


def format_loop_report(result: dict) -> str:
    """A short text report of a ``run_loop`` result."""
    returns = np.asarray(result["returns"], np.float64)
    rate = result["rate_hz"]
    schedule = f"at {rate:g} Hz" if rate else "back to back (no rate)"
    if rate and result.get("spin_us"):
        schedule += f", the last {result['spin_us']:g} µs of each wait spun"
    misses = result["deadline_misses"]
    share = f" ({100 * misses / result['steps']:.3f}%)" if result["steps"] else ""

    def flag(name: str) -> str:
        return "yes" if result[name] else f"no ({result[name + '_note']})"

    lines = [
        f"{result['env_id']}: {result['episodes']} episodes, {result['steps']} control steps "
        f"{schedule}; {result['machine']}, MuJoCo {result['mujoco_version']}",
        f"returns: mean {returns.mean():.3f}, min {returns.min():.3f}, max {returns.max():.3f}",
        f"deadline misses: {misses}{share}" if rate else "deadline misses: - (no rate)",
        f"{'µs':<14}{'p50':>10}{'p99':>10}{'p99.9':>10}{'max':>10}",
        _row("policy step", result),
        _row("control step", result["control_step"]),
    ]
    if result.get("wake_latency"):
        lines.append(_row("wake-up", result["wake_latency"]))
    lines.append(
        f"SCHED_FIFO: {flag('sched_fifo')}; mlockall: {flag('mlockall')}; "
        f"non-finite policy steps: {result['nonfinite_steps']}; "
        f"MuJoCo warnings: {result['mujoco_warnings']}"
    )
    lines.append(
        f"during the loop: page faults {result['page_faults']}, involuntary context "
        f"switches {result['involuntary_switches']}, VM steal {_ms(result['steal_ms'])}"
    )
    return "\n".join(lines)
