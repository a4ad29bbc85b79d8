"""Run a generated C policy (``policy.c`` / ``policy.h``) on an emulated Cortex-M4F: QEMU's
``mps2-an386`` board, bare metal, with its own startup code, linker script and harness.

What ``run_cortex_m4`` checks and measures, on a fixed, seeded observation sequence:

- parity: every action and new state of the board's ``policy_step`` against the same
  sequence through the host build (``export.c_build.build_io``, gcc on x86); every step must
  return ``POLICY_OK`` and agree within ``ACTION_TOLERANCE``;
- sizes of the *linked* image (``arm-none-eabi-gcc``, ``export.c_build.CORTEX_M4_FLAGS`` for
  ``policy.c``, ``--gc-sections``): the policy's code with the C-library functions it pulls
  in, its weights, RAM, the static stack frame and the measured stack depth (the stack is
  painted with a pattern at reset and scanned after the run);
- executed instructions per step, counted exactly by the emulator (below).

Instruction counting. QEMU runs with ``-icount shift=7``: its virtual clock advances exactly
2^7 = 128 ns per executed guest instruction, independent of the host and its load. The
harness restarts the board's CMSDK APB timer 0 (32-bit, clocked at the board's 25 MHz
SYSCLK: a tick every 40 ns of virtual time) just before each ``policy_step`` call and reads
it just after. In icount mode QEMU makes each device access the last instruction of its
translation block, so both accesses see the instruction count at exactly that instruction.
A tick is 40/128 = 0.3125 instructions, so ``round(ticks * 40 / 128)`` is the exact count
(the rounding error is below 0.32); with ``shift=0`` (1 ns an instruction) a tick would be
40 instructions. The count of an empty restart-read interval (the floor) is subtracted, so
a step's count is the call of ``policy_step`` (argument set-up, ``bl``, storing the status:
6 instructions) and everything it executes. Each run also times a block of
``CALIBRATION_NOPS`` ``nop`` instructions and fails unless it measures exactly that many,
and the tests check the per-step counts against a single-step execution trace of the same
calls (equal, up to the call's fixed set-up).

An instruction count is not a device time, and the board is emulated (``"emulated": True``
in every report). As an estimate only: a Cortex-M4 running from zero-wait-state memory
retires roughly one instruction per cycle (loads, stores, floating-point divides and
square roots take more, flash wait states add more), so 100,000 instructions a step is
about 0.6 ms at 168 MHz (an STM32F4), 100,000 / 168e6 s.

Needs numpy, ``arm-none-eabi-gcc`` (with newlib: ``memcpy``/``memset``), ``arm-none-eabi-size``
and ``arm-none-eabi-nm`` (binutils) and ``qemu-system-arm``; no torch, gymnasium or onnx.
Everything is built in a fresh directory; nothing is written next to the sources.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.c_build import (
    C_STANDARD,
    CORTEX_M4_FLAGS,
    HEADER_NAME,
    SOURCE_NAME,
    ToolchainError,
    build_io,
    find_tool,
    read_header_dims,
    run_io,
    run_tool,
    source_dir,
)
from export.cortex_m4_c import BOARD_C, LINKER_SCRIPT

TARGET = "cortex-m4"
MACHINE = "mps2-an386"  # QEMU's MPS2 board with the AN386 FPGA image: a Cortex-M4F
BOARD = f"{MACHINE} (QEMU)"
ICOUNT_SHIFT = 7  # 2^7 ns of virtual time per instruction: a timer tick is < 1 instruction
TIMER_HZ = 25_000_000  # CMSDK APB timer 0's clock on mps2-an386 (QEMU's SYSCLK_FRQ): 40 ns
CALIBRATION_NOPS = 1000  # the nops timed on every run: the count must come out exact
RESET_EVERY = 250  # the state is zeroed (an episode start) every this many steps
ACTION_TOLERANCE = 1e-5  # max |board action - x86 action|; actions are O(1) (bounded)
STACK_BYTES = 256 * 1024  # far beyond policy_step's needs (n = [128, 128]: 8.8 KB)
TIMEOUT_S = 300.0  # a run over this is a hang (1000 steps of n = [128, 128]: ~3 s)
STATUS_OK = 0  # POLICY_OK in policy.h

CPU_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]
# The harness: no libc calls (loop idioms would become memset/memcpy calls without
# -fno-tree-loop-distribute-patterns), so every C-library function in the image is there
# for policy.o, and nothing but policy_step runs below the harness's stack pointer.
HARNESS_FLAGS = [
    *CPU_FLAGS,
    "-Os",
    "-ffreestanding",
    "-fno-tree-loop-distribute-patterns",
    "-ffunction-sections",
    "-fdata-sections",
]
# No crt0: the startup is ours. newlib's libc (memcpy, memset) and libgcc at link time.
LINK_FLAGS = [*CPU_FLAGS, "-nostartfiles", "-Wl,--gc-sections"]

RECORD_MAGIC = 0x344D4D43  # "CMM4": the harness's trailer starts with it
# The trailer BOARD_C writes after the steps' records: uint32 each.
TRAILER_FIELDS = ("magic", "floor_ticks", "nop_ticks", "nops", "caller_sp", "deepest")
TRAILER_FIELDS += ("stack_limit", "stack_top")

# Exit statuses of the image (through semihosting SYS_EXIT_EXTENDED): what went wrong, and
# what to do about it.
_RERUN = "build with build_dir=DIR and run qemu_command(DIR/image.elf) with -d int to see it"
EXIT_MESSAGES = {
    2: "could not open board_out.bin through semihosting (is the build directory writable?)",
    3: "could not write board_out.bin through semihosting (is the disk full?)",
    4: f"took a fault (HardFault, MemManage, BusFault, UsageFault or NMI); {_RERUN}",
    5: f"overflowed its {STACK_BYTES}-byte stack; raise export.cortex_m4.STACK_BYTES",
}

HARNESS_EXTERNALS = {"policy_step", "cm_obs", "cm_resets", "__data_load", "__data_start"}
HARNESS_EXTERNALS |= {"__data_end", "__bss_start", "__bss_end", "__stack_limit", "__stack_top"}

# Output sections of the linked image -> report keys (bytes).
SECTION_KEYS = {
    ".policy_code": "flash_policy_o_code",
    ".library_code": "flash_library_code",
    ".policy_weights": "flash_weights",
    ".isr_vector": "flash_harness",
    ".text": "flash_harness",
    ".rodata": "flash_harness",
    ".ARM.exidx": "flash_harness",
    ".inputs": "flash_inputs",
    ".data": "ram_data",
    ".bss": "ram_bss",
}


@dataclass(frozen=True)
class BoardRun:
    """What the image reported, per step ``t`` of ``T``.

    ``statuses`` ``[T]`` int32 (``policy_step``'s return), ``actions`` ``[T, act_dim]`` and
    ``states`` ``[T, state_dim]`` float32 (the state after the step), ``instructions``
    ``[T]`` int64 (executed in the call, floor subtracted); ``floor_instructions``, the
    empty interval's count; ``stack_measured``, bytes below the caller's stack pointer the
    calls wrote (the deepest painted word overwritten); ``stack_region``, the stack's size
    (``STACK_BYTES``).
    """

    statuses: np.ndarray
    actions: np.ndarray
    states: np.ndarray
    instructions: np.ndarray
    floor_instructions: int
    stack_measured: int
    stack_region: int


def observation_sequence(
    obs_dim: int, steps: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal observations ``[steps, obs_dim]`` float32 from
    ``np.random.default_rng(seed)`` and resets ``[steps]`` bool (True: zero the state before
    that step), every ``RESET_EVERY`` steps from step 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    obs = np.random.default_rng(seed).standard_normal((steps, obs_dim)).astype(np.float32)
    return obs, np.arange(steps) % RESET_EVERY == 0


def ticks_to_instructions(ticks: np.ndarray | int) -> np.ndarray:
    """Timer ticks (25 MHz) -> executed instructions under ``-icount shift=ICOUNT_SHIFT``:
    ``round(ticks * 40 ns / 128 ns)``, exact (see the module docstring), int64."""
    ticks = np.asarray(ticks, np.int64)
    ns_per_tick, ns_per_instruction = 1_000_000_000 // TIMER_HZ, 2**ICOUNT_SHIFT  # 40, 128
    return (2 * ticks * ns_per_tick + ns_per_instruction) // (2 * ns_per_instruction)


def inputs_source(obs: np.ndarray, resets: np.ndarray) -> tuple[str, str]:
    """``(inputs.h, inputs.c)``: the observations as float32 bit patterns (exact, NaN and
    inf included) in a union with floats (type punning through a union is defined in C99),
    and the reset flags."""
    steps, obs_dim = obs.shape
    bits = np.ascontiguousarray(obs, np.float32).view(np.uint32).ravel()
    header = (
        "/* The board's inputs: observations, resets, calibration. Generated by compressm-rl. */\n"
        "#include <stdint.h>\n"
        f"#define CM_STEPS {steps}u\n"
        f"#define CM_CALIBRATION_NOPS {CALIBRATION_NOPS}u\n"
        f'#define CM_CALIBRATION_NOPS_TEXT "{CALIBRATION_NOPS}"\n'
        f"typedef union {{ uint32_t bits[{steps * obs_dim}]; float values[{steps * obs_dim}]; }}"
        " cm_obs_t;\n"
        "extern const cm_obs_t cm_obs;\n"
        f"extern const unsigned char cm_resets[{steps}];\n"
    )
    rows = (", ".join(f"0x{b:08x}u" for b in bits[i : i + 8]) for i in range(0, bits.size, 8))
    source = (  # {{ ... }}: the union's first member, an array
        '#include "inputs.h"\n'
        "const cm_obs_t cm_obs = {{\n    " + ",\n    ".join(rows) + "\n}};\n"
        "const unsigned char cm_resets[] = {" + ", ".join(str(int(r)) for r in resets) + "};\n"
    )
    return header, source


def build_image(sources: Path, build_dir: Path, obs: np.ndarray, resets: np.ndarray) -> Path:
    """``build_dir/image.elf``: ``sources/policy.c`` (``CORTEX_M4_FLAGS``), the harness
    (``BOARD_C``) and the inputs, linked for mps2-an386 (``LINKER_SCRIPT``). Writes its
    sources, objects, ``policy.su`` and ``image.map`` into ``build_dir`` (must exist)."""
    obs_dim = read_header_dims(sources)[0]
    obs = np.asarray(obs, np.float32)
    resets = np.asarray(resets, bool)
    if obs.ndim != 2 or obs.shape[1] != obs_dim or resets.shape != (len(obs),) or not len(obs):
        raise ValueError(
            f"obs must be [T, {obs_dim}] and resets [T] with T >= 1, got {obs.shape}, "
            f"{resets.shape}"
        )
    cc = find_tool("arm-none-eabi-gcc")
    header, source = inputs_source(obs, resets)
    (build_dir / "inputs.h").write_text(header)
    (build_dir / "inputs.c").write_text(source)
    (build_dir / "board.c").write_text(BOARD_C)
    (build_dir / "board.ld").write_text(LINKER_SCRIPT.replace("@STACK_BYTES@", str(STACK_BYTES)))
    policy_o = build_dir / "policy.o"
    run_tool(
        [cc, *C_STANDARD, *CORTEX_M4_FLAGS, "-c", "-I", str(sources), str(sources / SOURCE_NAME)]
        + ["-o", str(policy_o)],
        f"cross-compiling {sources / SOURCE_NAME}",
    )
    objects = [policy_o]
    for name in ("board", "inputs"):
        objects.append(build_dir / f"{name}.o")
        run_tool(
            [cc, *C_STANDARD, *HARNESS_FLAGS, "-c", "-I", str(sources), "-I", str(build_dir)]
            + [str(build_dir / f"{name}.c"), "-o", str(objects[-1])],
            f"compiling the Cortex-M4 harness {build_dir / name}.c",
        )
    check_harness_calls_no_library(build_dir / "board.o")
    image = build_dir / "image.elf"
    # -Xlinker, not -Wl,: a -Wl, argument is split at commas, and paths may hold them.
    run_tool(
        [cc, *LINK_FLAGS, "-T", str(build_dir / "board.ld"), *map(str, objects)]
        + ["-Xlinker", f"-Map={build_dir / 'image.map'}", "-o", str(image)],
        f"linking the Cortex-M4 image of {sources / SOURCE_NAME}",
    )
    return image


def undefined_symbols(obj: Path) -> list[str]:
    """The symbols ``obj`` needs from elsewhere (``arm-none-eabi-nm -u``)."""
    listing = run_tool([find_tool("arm-none-eabi-nm"), "-u", str(obj)], "arm-none-eabi-nm")
    return [line.split()[-1] for line in listing.stdout.decode().splitlines() if line.strip()]


def check_harness_calls_no_library(board_o: Path) -> None:
    """RuntimeError if the harness object calls a C-library function: then the image's
    library code would not all be the policy's, and a frame other than policy_step's could
    lie below the harness's stack pointer."""
    calls = [s for s in undefined_symbols(board_o) if s not in HARNESS_EXTERNALS]
    if calls:
        raise RuntimeError(
            f"{board_o} calls {', '.join(calls)}: the harness must not use the C library "
            f"(compile it with {' '.join(HARNESS_FLAGS)})"
        )


def section_sizes(image: Path) -> dict[str, int]:
    """Bytes of each allocated output section of ``image`` (``arm-none-eabi-size -A``)."""
    listing = run_tool([find_tool("arm-none-eabi-size"), "-A", str(image)], "arm-none-eabi-size")
    sizes = {}
    for line in listing.stdout.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[0].startswith("."):
            sizes[parts[0]] = int(parts[1])
    return sizes


def symbol_addresses(image: Path) -> dict[str, int]:
    """Addresses of ``image``'s symbols (``arm-none-eabi-nm``), for the linker-script marks."""
    listing = run_tool([find_tool("arm-none-eabi-nm"), str(image)], "arm-none-eabi-nm")
    symbols = {}
    for line in listing.stdout.decode().splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    return symbols


def static_stack(build_dir: Path) -> int:
    """``policy_step``'s frame in bytes from gcc's ``-fstack-usage`` (``policy.su``)."""
    for line in (build_dir / "policy.su").read_text().splitlines():
        fields = line.split("\t")
        if fields[0].endswith(":policy_step"):
            return int(fields[1])
    raise ValueError(f"{build_dir / 'policy.su'} has no policy_step line")


def image_sizes(image: Path) -> dict[str, int]:
    """Bytes of the linked image, by part.

    ``flash_code``: ``policy.o``'s code plus the C-library code linked in for it (the harness
    calls none; ``flash_policy_o_code`` and ``flash_library_code`` separately);
    ``flash_weights``: ``policy.o``'s read-only data (the weights and constants);
    ``flash_harness``: vector table, startup and harness; ``flash_inputs``: the embedded
    observation sequence (a test fixture, not part of a deployment); ``ram``: ``.data`` +
    ``.bss`` of the whole image (the harness's buffers; the stack comes on top);
    ``ram_policy``: ``policy.o``'s own ``.data`` + ``.bss`` (0: it writes no globals).
    """
    sizes = dict.fromkeys(SECTION_KEYS.values(), 0)
    for section, size in section_sizes(image).items():
        if section in SECTION_KEYS:
            sizes[SECTION_KEYS[section]] += size
    marks = symbol_addresses(image)
    ram_policy = sum(
        marks[f"__policy_{part}_end"] - marks[f"__policy_{part}_start"] for part in ("data", "bss")
    )
    return {
        "flash_code": sizes["flash_policy_o_code"] + sizes["flash_library_code"],
        "flash_policy_o_code": sizes["flash_policy_o_code"],
        "flash_library_code": sizes["flash_library_code"],
        "flash_weights": sizes["flash_weights"],
        "flash_harness": sizes["flash_harness"],
        "flash_inputs": sizes["flash_inputs"],
        "ram": sizes["ram_data"] + sizes["ram_bss"],
        "ram_policy": ram_policy,
    }


def qemu_command(image: Path) -> list[str]:
    """The ``qemu-system-arm`` command line that runs ``image`` with exact instruction
    counting and semihosting to the host (files in its working directory)."""
    return [
        find_tool("qemu-system-arm"),
        "-M",
        MACHINE,
        "-nographic",
        "-monitor",
        "none",
        "-semihosting-config",
        "enable=on,target=native",
        "-icount",
        f"shift={ICOUNT_SHIFT}",
        "-kernel",
        str(image),
    ]


def emulator_version() -> str:
    """``qemu-system-arm --version``'s first line ("QEMU emulator version 7.2.22 ...")."""
    listing = run_tool([find_tool("qemu-system-arm"), "--version"], "qemu-system-arm --version")
    return listing.stdout.decode().splitlines()[0].strip()


def run_image(image: Path, sources: Path, steps: int, timeout_s: float = TIMEOUT_S) -> BoardRun:
    """Run a ``build_image`` image of ``sources`` built for ``steps`` steps under QEMU and
    read back what it wrote (``board_out.bin`` beside the image). ToolchainError in one
    line for a hang (over ``timeout_s``), an exit status other than 0, a short output or a
    calibration that does not come out exact."""
    _, act_dim, state_dim = read_header_dims(sources)
    out = image.parent / "board_out.bin"
    out.unlink(missing_ok=True)
    command = qemu_command(image)
    try:
        result = subprocess.run(
            command,
            cwd=image.parent,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as err:
        raise ToolchainError(
            f"qemu-system-arm ran {image} for over {timeout_s:.0f} s without exiting (a hang "
            f"in the image, or a slow machine: pass a larger timeout_s)",
            command,
        ) from err
    stderr = result.stderr.decode(errors="replace")
    if result.returncode != 0:
        why = EXIT_MESSAGES.get(result.returncode, f"exited with status {result.returncode}")
        detail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
        raise ToolchainError(
            f"the Cortex-M4 image {image} on qemu-system-arm -M {MACHINE} {why}"
            + (f": {detail[0]}" if detail else ""),
            command,
            result.returncode,
            stderr,
        )
    record = np.dtype(
        [
            ("status", "<i4"),
            ("ticks", "<u4"),
            ("action", "<f4", (act_dim,)),
            ("state", "<f4", (state_dim,)),
        ]
    )
    trailer = np.dtype([(name, "<u4") for name in TRAILER_FIELDS])
    data = out.read_bytes() if out.is_file() else b""
    if len(data) != steps * record.itemsize + trailer.itemsize:
        raise ToolchainError(
            f"the Cortex-M4 image wrote {len(data)} bytes to {out}, not the "
            f"{steps * record.itemsize + trailer.itemsize} of {steps} steps (built for other "
            f"sources or step count?)",
            command,
            result.returncode,
            stderr,
        )
    records = np.frombuffer(data, record, count=steps)
    tail = np.frombuffer(data, trailer, offset=steps * record.itemsize)[0]
    if tail["magic"] != RECORD_MAGIC:
        raise ToolchainError(f"{out} does not end in the harness's trailer", command)
    floor = int(ticks_to_instructions(tail["floor_ticks"]))
    nops = int(ticks_to_instructions(tail["nop_ticks"])) - floor
    if nops != tail["nops"]:
        raise ToolchainError(
            f"qemu-system-arm counted {nops} instructions for {tail['nops']} nops: instruction "
            f"counting is not exact with this QEMU (-icount shift={ICOUNT_SHIFT}); do not "
            "trust instructions_per_step from it",
            command,
        )
    return BoardRun(
        statuses=records["status"].astype(np.int32),
        actions=records["action"].astype(np.float32).reshape(steps, act_dim),
        states=records["state"].astype(np.float32).reshape(steps, state_dim),
        instructions=ticks_to_instructions(records["ticks"]) - floor,
        floor_instructions=floor,
        stack_measured=int(tail["caller_sp"]) - int(tail["deepest"]),
        stack_region=int(tail["stack_top"]) - int(tail["stack_limit"]),
    )


def run_cortex_m4(
    path: str | os.PathLike,
    steps: int = 1000,
    seed: int = 0,
    build_dir: Path | None = None,
    timeout_s: float = TIMEOUT_S,
) -> dict:
    """Build a C export for QEMU's mps2-an386 (Cortex-M4F), run ``steps`` steps of
    ``observation_sequence(obs_dim, steps, seed)`` on it and on the host (gcc, x86), check
    parity, and report sizes and executed instructions.

    Args:
        path: a C export directory (``policy.c`` and ``policy.h``) or a file in it.
        steps: control steps to run (the state is zeroed every ``RESET_EVERY`` steps).
        seed: the observation sequence's seed (standard normal float32).
        build_dir: where to build (kept, for inspection); a fresh temporary directory,
            removed afterwards, by default.
        timeout_s: the QEMU run's limit in seconds.

    Returns a dict (sizes in bytes; instructions are emulated counts, not device time):
        ``target`` "cortex-m4", ``board`` "mps2-an386 (QEMU)", ``emulated`` True,
        ``policy`` the export directory's name, ``steps``;
        ``flash_code``, ``flash_weights``, ``flash_policy_o_code``, ``flash_library_code``,
        ``flash_harness``, ``flash_inputs``, ``ram``, ``ram_policy`` (see ``image_sizes``);
        ``ram_state``: the recurrent state the caller keeps between steps (4 bytes a
        float, ``POLICY_STATE_DIM`` floats; 0 for an MLP);
        ``library``: the C-library symbols policy.o needs (linked from newlib);
        ``stack``: policy_step's frame from ``-fstack-usage``; ``stack_measured``: the
        deepest the calls wrote below the caller's stack pointer (painted stack), its
        callees included;
        ``instructions_per_step`` (mean over the steps, float), ``instructions_per_step_min``
        and ``instructions_per_step_max`` (int): executed instructions per ``policy_step``
        call, counted exactly by QEMU (``-icount``), calibrated on every run;
        ``max_action_diff``, ``max_state_diff``: max |board - x86| over all steps and
        elements (float32 values, compared in float64);
        ``flags``: the ``arm-none-eabi-gcc`` flags of policy.c; ``icount_shift``;
        ``emulator``: ``emulator_version()``.

    Raises ToolchainError (one line) for a missing tool, a failed build, a QEMU hang or
    failure, and ValueError when a step does not return POLICY_OK or an action differs
    from the x86 build's by more than ``ACTION_TOLERANCE``.
    """
    sources = source_dir(path)
    for tool in ("arm-none-eabi-gcc", "arm-none-eabi-size", "arm-none-eabi-nm", "qemu-system-arm"):
        find_tool(tool)  # a missing tool is reported before anything is built
    find_tool("gcc")  # the x86 reference
    obs_dim = read_header_dims(sources)[0]
    obs, resets = observation_sequence(obs_dim, steps, seed)
    if build_dir is None:
        with tempfile.TemporaryDirectory(prefix="compressm-c-m4-board-") as tmp:
            return _run_in(sources, Path(tmp), obs, resets, timeout_s)
    Path(build_dir).mkdir(parents=True, exist_ok=True)
    return _run_in(sources, Path(build_dir), obs, resets, timeout_s)


def _run_in(
    sources: Path, build_dir: Path, obs: np.ndarray, resets: np.ndarray, timeout_s: float
) -> dict:
    steps = len(obs)
    image = build_image(sources, build_dir, obs, resets)
    board = run_image(image, sources, steps, timeout_s)
    bad = np.flatnonzero(board.statuses != STATUS_OK)
    if bad.size:
        raise ValueError(
            f"{sources / SOURCE_NAME} on the Cortex-M4: policy_step returned "
            f"{int(board.statuses[bad[0]])}, not POLICY_OK, at step {int(bad[0])} "
            f"({bad.size} of {steps} steps) on finite observations: an overflow inside the "
            f"step (see {HEADER_NAME}); check the exported weights"
        )
    host_actions, host_states = run_io(build_io(sources, build_dir), sources, obs, resets)
    action_diff = _max_abs_diff(board.actions, host_actions)
    state_diff = _max_abs_diff(board.states, host_states)
    if not action_diff <= ACTION_TOLERANCE:
        raise ValueError(
            f"{sources / SOURCE_NAME}: the Cortex-M4 actions differ from the x86 build's by "
            f"up to {action_diff:.3g} (> {ACTION_TOLERANCE:g}) over {steps} steps; the C "
            "is not portable (undefined behaviour or a libm difference?)"
        )
    return {
        "target": TARGET,
        "board": BOARD,
        "emulated": True,
        "policy": sources.name,
        "steps": steps,
        **image_sizes(image),
        "ram_state": 4 * read_header_dims(sources)[2],
        "library": undefined_symbols(build_dir / "policy.o"),
        "stack": static_stack(build_dir),
        "stack_measured": board.stack_measured,
        "instructions_per_step": float(board.instructions.mean()),
        "instructions_per_step_min": int(board.instructions.min()),
        "instructions_per_step_max": int(board.instructions.max()),
        "max_action_diff": action_diff,
        "max_state_diff": state_diff,
        "flags": " ".join(CORTEX_M4_FLAGS),
        "icount_shift": ICOUNT_SHIFT,
        "emulator": emulator_version(),
    }


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| in float64 (0.0 for empty arrays; inf where only one is non-finite)."""
    if a.size == 0:
        return 0.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        return float(np.where(same, 0.0, np.abs(a - b)).max())


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table of ``run_cortex_m4`` results, one row each (named by ``policy``),
    with a legend: bytes of flash code and weights, RAM and stack, executed instructions
    per step (mean, and the max where it differs) and the largest action difference from
    the x86 build."""
    lines = [
        "| policy | flash code B | flash weights B | RAM B | stack B | instructions/step "
        "| max \\|Δaction\\| vs x86 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mean, peak = row["instructions_per_step"], row["instructions_per_step_max"]
        instructions = f"{mean:,.0f}" + (f" (max {peak:,})" if peak != round(mean) else "")
        lines.append(
            f"| {row['policy']} | {row['flash_code']:,} | {row['flash_weights']:,} | "
            f"{row['ram_policy'] + row['ram_state']:,} | {row['stack']:,} "
            f"({row['stack_measured']:,}) | {instructions} | {row['max_action_diff']:.1e} |"
        )
    first = rows[0] if rows else {"board": BOARD, "flags": " ".join(CORTEX_M4_FLAGS)}
    library = sorted({symbol for row in rows for symbol in row["library"]})
    globals_ = sorted({row["ram_policy"] for row in rows})
    legend = (
        f"{first['board']}, emulated: instruction counts, not device time (at roughly one "
        "instruction a cycle, 168,000 instructions are about 1 ms at 168 MHz). Flash code: "
        "policy.o's code and the C-library functions it links"
        + (f" ({', '.join(library)})" if library else " (none)")
        + "; RAM: policy.o's globals"
        + (" (none)" if globals_ in ([0], []) else "")
        + " plus the recurrent state the caller keeps between steps; stack: policy_step's "
        "frame (-fstack-usage), and in parentheses the deepest the calls wrote, measured on a "
        f"painted stack. policy.c built with `arm-none-eabi-gcc {first['flags']}`, linked "
        "with --gc-sections; max |Δaction| over every step and action element against the "
        "same C built by gcc for x86."
    )
    return "\n".join(lines) + "\n\n" + legend
