"""The C step timed on a target device: cross-built here, run there, read back.

    compressm-rl bench policy_c/ --target aarch64 --ssh pi@robot [--cpu cortex-a72]
    compressm-rl bench policy_c/ --target aarch64                  # qemu-aarch64: emulated
    compressm-rl bench policy_c/ --target aarch64 --runner "adb shell"   # a phone or board

The C export is built with the target's portable flags (``TARGETS``; ``--cpu`` tunes for
a named core), the timing harness (``export.c_bench``'s ``bench.c``) and the I/O harness
(``export.c_build.IO_HARNESS``) are copied to the device and run there, and the rows are
computed here from the raw samples, as on the host. A device is reached through a
*runner*: a command that runs its last argument as a shell command on the device
(``ssh USER@HOST``, ``adb shell``, ``sh -c`` for this machine). Files travel through the
runner's stdin (``cat >``), so nothing but a POSIX shell with ``mktemp`` is needed there;
everything is removed from the device afterwards. Without a runner an aarch64 build runs
under ``qemu-aarch64`` here: its rows are tagged ``emulated`` (an emulated time is not a
device time: it says how the build behaves, not how fast the board is).

Before timing, the device's build is checked against this machine's x86 build on the same
1,000 observations with resets (``parity_vs_host``): a cross-built step that disagrees is
not worth timing.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.bench import c_row_info, cpu_model, latency_stats
from export.c_bench import BenchResult, compile_bench, raw_arguments
from export.c_build import (
    AARCH64_FLAGS,
    HOST_FLAGS,
    ToolchainError,
    build_io,
    find_tool,
    read_header_dims,
    run_io,
    run_tool,
    source_dir,
)

PARITY_STEPS = 1000
SSH_OPTIONS = ["-o", "BatchMode=yes"]  # never wait for a password prompt
DEVICE_TIMEOUT_S = 600.0  # a device command running longer is a hung device or link


@dataclass(frozen=True)
class Target:
    """A build target: its compiler, portable flags, the ``--cpu`` flag, and the user-mode
    emulator that runs its programs on another architecture."""

    name: str
    compiler: str
    flags: tuple[str, ...]
    cpu_flag: str  # "-mcpu" or "-march", given ``--cpu NAME``
    machine: str  # what ``uname -m`` says on it
    emulator: str | None


def _native() -> Target:
    machine = platform.machine()
    cpu_flag = "-mcpu" if machine in ("aarch64", "arm64") else "-march"
    return Target("native", "gcc", tuple(HOST_FLAGS), cpu_flag, machine, None)


# -static: the program runs on a board whatever its C library (and under qemu-aarch64
# without a sysroot).
TARGETS = {
    "native": _native(),
    "aarch64": Target(
        "aarch64", "aarch64-linux-gnu-gcc", tuple(AARCH64_FLAGS), "-mcpu", "aarch64", "qemu-aarch64"
    ),
}


def target_flags(target: Target, cpu: str | None) -> list[str]:
    """The target's portable flags, plus ``-mcpu=CPU`` / ``-march=CPU`` when a CPU is named
    (an object tuned that way may not run on other CPUs of the architecture)."""
    if cpu is not None and not cpu.replace("-", "").replace(".", "").replace("+", "").isalnum():
        raise ValueError(f"--cpu {cpu!r} is not a CPU name such as cortex-a72 or x86-64-v3")
    return [*target.flags, *([f"{target.cpu_flag}={cpu}"] if cpu else [])]


class Device:
    """Where the programs run: this machine (``runner`` None, optionally under
    ``emulator``), or a device behind a runner command (a list, e.g. ``["ssh", "pi@robot"]``).
    Use as a context manager: programs copied to a device are removed at exit."""

    def __init__(self, runner: list[str] | None = None, emulator: str | None = None) -> None:
        self.runner, self.emulator = runner, emulator
        self.emulated = runner is None and emulator is not None
        self._remote_dir: str | None = None

    def __enter__(self) -> Device:
        if self.runner is not None:
            find_tool(self.runner[0])
            script = 'd=$(mktemp -d "${TMPDIR:-/tmp}/compressm-bench.XXXXXX") && echo "$d"'
            lines = self._shell(script, what="making a directory on the device").decode()
            made = (lines.strip().splitlines() or [""])[-1]
            if not made.startswith("/"):
                raise ToolchainError(f"the device gave {made!r} for a temporary directory")
            self._remote_dir = made
        elif self.emulator is not None:
            find_tool(self.emulator)
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self._remote_dir is None:
            return
        there, self._remote_dir = self._remote_dir, None
        try:
            self._shell(f"rm -rf {shlex.quote(there)}", what="cleaning up")
        except ToolchainError as cleanup:
            if kind is not None:  # the first error is the one worth reading
                return
            # The measurement is done: say what was left behind rather than lose it.
            warnings.warn(f"{cleanup}; {there} is left on the device", stacklevel=2)

    def _shell(self, script: str, stdin: bytes | None = None, what: str = "") -> bytes:
        """Run ``script`` on the device; its stdout. Without ``stdin`` the runner reads
        nothing (ssh would otherwise swallow this process's stdin)."""
        what = what or f"running on the device ({' '.join(self.runner)})"
        feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
        try:
            return run_tool([*self.runner, script], what, timeout=DEVICE_TIMEOUT_S, **feed).stdout
        except subprocess.TimeoutExpired:
            raise ToolchainError(
                f"{what} took over {DEVICE_TIMEOUT_S:g} s: the device or the link hangs"
            ) from None

    def install(self, program: Path) -> str:
        """Copy an executable to the device; returns how to name it there."""
        if self.runner is None:
            return str(program)
        there = f"{self._remote_dir}/{program.name}"
        quoted = shlex.quote(there)
        self._shell(
            f"cat > {quoted} && chmod +x {quoted}",
            program.read_bytes(),
            f"copying {program.name} to the device",
        )
        return there

    def run_io(self, program: str, sources: Path, obs, resets):
        """``export.c_build.run_io`` of an installed I/O harness, on the device."""
        where = shlex.quote(program) if self.runner is not None else program
        return run_io(Path(where), sources, obs, resets, runner=self.prefix())

    def prefix(self) -> list[str]:
        """What precedes an installed program's path to run it (``run_io``'s runner)."""
        if self.runner is not None:
            return list(self.runner)
        return [self.emulator] if self.emulator else []

    def run(self, program: str, arguments: list[str]) -> bytes:
        """Run an installed program; its stdout."""
        if self.runner is not None:
            script = " ".join(shlex.quote(part) for part in [program, *arguments])
            return self._shell(script, what=f"running {Path(program).name} on the device")
        command = [*self.prefix(), program, *arguments]
        return run_tool(command, f"running {Path(program).name}").stdout

    def describe(self) -> dict:
        """``{"machine": uname -m, "cpu": model name or "", "emulated": bool}`` of the
        device (for qemu: the emulated architecture, on this machine's CPU)."""
        if self.runner is None:
            host = cpu_model()
            if self.emulator:
                return {"machine": "aarch64", "cpu": f"{self.emulator} on {host}", "emulated": True}
            return {"machine": platform.machine(), "cpu": host, "emulated": False}
        script = (
            "uname -m; (lscpu 2>/dev/null | sed -n 's/^Model name: *//p'; "
            "sed -n 's/^\\(model name\\|Model\\|Hardware\\)[[:space:]]*: *//p' /proc/cpuinfo"
            " 2>/dev/null) | head -n 1"
        )
        lines = self._shell(script, what="reading the device's CPU").decode().splitlines()
        lines = [line.strip() for line in lines if line.strip()]
        return {
            "machine": lines[0] if lines else "unknown",
            "cpu": lines[1] if len(lines) > 1 else "",
            "emulated": False,
        }


def runner_command(
    ssh: str | None, runner: str | None, ssh_config: str | None = None
) -> list[str] | None:
    """The runner for ``--ssh DEST`` (``ssh -o BatchMode=yes [-F CONFIG] DEST``) or
    ``--runner "CMD"`` (split like a shell would), or None for this machine."""
    if ssh and runner:
        raise ValueError("--ssh and --runner both name a device: give one")
    if ssh_config and not ssh:
        raise ValueError("--ssh-config is for --ssh: give the destination too")
    if ssh:
        if ssh.startswith("-"):
            raise ValueError(f"--ssh {ssh!r} is not a destination such as pi@robot")
        return ["ssh", *SSH_OPTIONS, *(["-F", ssh_config] if ssh_config else []), ssh]
    if runner:
        parts = shlex.split(runner)
        if not parts:
            raise ValueError('--runner is empty: give a command such as "adb shell"')
        return parts
    return None


def parity_inputs(
    obs_dim: int, steps: int = PARITY_STEPS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed observation sequence ``[steps, obs_dim]`` (normal, std 2) and resets
    ``[steps]`` (the first step and ~2% of the others), for comparing two builds."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(0.0, 2.0, (steps, obs_dim)).astype(np.float32)
    resets = rng.random(steps) < 0.02
    resets[0] = True
    return obs, resets


def bench_on_target(
    path: str | Path,
    target: str = "native",
    runner: list[str] | None = None,
    cpu: str | None = None,
    steps: int = 5000,
    warmup: int = 500,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Build a C export for ``target``, check it against this machine's build, time it on
    the device, and return ``(row, floor row)`` like ``export.bench.bench_c_export``'s,
    tagged with ``target``, ``emulated``, the device (``device_machine``, ``device_cpu``),
    ``c_compiler`` and ``parity_vs_host`` (max |Δ| of actions and states over
    ``PARITY_STEPS`` steps).

    ``runner`` None: this machine runs it, under the target's emulator if it is another
    architecture (``emulated`` True). Raises ``ToolchainError`` (a tool missing, a build
    or a run failing, the device's build disagreeing with this machine's beyond 1e-4
    relative + 1e-5) and ValueError (an unknown target or CPU name).
    """
    if target not in TARGETS:
        raise ValueError(f"--target {target!r} is not one of {', '.join(TARGETS)} (or cortex-m4)")
    spec = TARGETS[target]
    flags = target_flags(spec, cpu)
    sources = source_dir(path)
    emulator = None
    if runner is None and spec.machine != platform.machine():
        emulator = spec.emulator
    if runner is not None and "-static" not in flags:
        flags = [*flags, "-static"]  # whatever C library the device has
    with (
        tempfile.TemporaryDirectory(prefix="compressm-c-target-") as tmp,
        Device(runner, emulator) as device,
    ):
        info = device.describe()
        _check_machine(info, device.runner is not None, spec)
        build = Path(tmp)
        bench = compile_bench(sources, build / "policy_bench", spec.compiler, flags)
        io = build_io(sources, build, spec.compiler, flags)
        parity = _check_parity(sources, build, device, device.install(io))
        raw = device.run(device.install(bench), raw_arguments(steps, warmup, seed))
    result = BenchResult.from_raw(raw, steps)
    tags = dict(
        target=target,
        emulated=device.emulated,
        device_machine=info["machine"],
        device_cpu=info["cpu"],
        c_compiler=spec.compiler,
        parity_vs_host=parity,
    )
    suffix = f" [{target}{', emulated' if device.emulated else ''}]"
    row = latency_stats(
        f"C {sources.name}{suffix}", result.times_ns, **c_row_info(sources, flags), **tags
    )
    floor = latency_stats(
        f"C clock floor (clock_gettime pair){suffix}", result.floor_ns, kind="floor", **tags
    )
    return row, floor


def _check_machine(info: dict, remote: bool, spec: Target) -> None:
    """ToolchainError, before anything is built, when a remote device's ``uname -m``
    (``info``, ``Device.describe``) is not the target's architecture."""
    if not remote:
        return
    machine = info["machine"]
    aliases = {"arm64": "aarch64", "amd64": "x86_64"}
    if aliases.get(machine, machine) != aliases.get(spec.machine, spec.machine):
        others = [t.name for t in TARGETS.values() if t.machine == machine]
        hint = f"--target {others[0]}" if others else "a target of its architecture"
        raise ToolchainError(
            f"the device is {machine}, not {spec.machine} (--target {spec.name}): give {hint}"
        )


def _check_parity(sources: Path, build: Path, device: Device, io_there: str) -> dict:
    """Actions and states of the device's build against this machine's on the same
    ``parity_inputs``; ``{"steps", "max_abs_action", "max_abs_state"}``."""
    obs, resets = parity_inputs(read_header_dims(sources)[0])
    host_io = build_io(sources, build / "host", "gcc", list(HOST_FLAGS))
    want_actions, want_states = run_io(host_io, sources, obs, resets)
    got_actions, got_states = device.run_io(io_there, sources, obs, resets)
    for what, got, want in (
        ("action", got_actions, want_actions),
        ("state", got_states, want_states),
    ):
        if not np.all(np.abs(got - want) <= 1e-5 + 1e-4 * np.abs(want)):
            worst = float(np.nanmax(np.abs(got - want)))
            raise ToolchainError(
                f"the target's build disagrees with this machine's: {what}s differ by up to "
                f"{worst:.3g} over {len(obs)} steps (allowed 1e-4 relative + 1e-5); not timed"
            )
    return {
        "steps": len(obs),
        "max_abs_action": float(np.abs(got_actions - want_actions).max()),
        "max_abs_state": float(np.abs(got_states - want_states).max()) if got_states.size else 0.0,
    }
