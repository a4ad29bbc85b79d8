"""Build and run a generated C policy (``policy.c`` / ``policy.h``): host shared library,
the I/O harness, aarch64 cross-builds run under qemu, Cortex-M size report (the timing
harness is ``export.c_bench``'s ``bench.c``).

Needs only numpy and a C compiler (no torch, gymnasium, onnx): it runs on the target
device like ``export.bench``. Every build goes into a fresh directory; nothing is written
next to the sources.

Flags (measured, docs/design.md §8): ``HOST_FLAGS``, ``-O3 -fno-trapping-math
-ffp-contract=fast``, portable: the object runs on every CPU of the architecture.
``-fno-trapping-math`` lets gcc turn the clamps of erf/exp into vector min/max, so GELU
vectorises (1.2 µs vs 3.3 µs a step, n = 25, AMD EPYC); it changes no result.
``-ffp-contract=fast`` fuses multiply-adds (rounding once instead of twice) where the
instruction set has them. ``NATIVE_FLAGS`` adds ``-march=native``, opt-in, for a build
that runs only on the machine that built it: it may use FMA, AVX2 or AVX-512, and dies
with SIGILL on a CPU without them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE_NAME, HEADER_NAME = "policy.c", "policy.h"
METADATA_TAG = "compressm-rl metadata:"  # a line of policy.c: this tag, then the JSON
C_STANDARD = ["-std=c99", "-Wall", "-Wextra", "-Werror"]
HOST_FLAGS = ["-O3", "-fno-trapping-math", "-ffp-contract=fast"]  # portable
NATIVE_FLAGS = [*HOST_FLAGS, "-march=native"]  # only for the machine that builds it
AARCH64_FLAGS = ["-O3", "-fno-trapping-math", "-ffp-contract=fast", "-static"]
CORTEX_M4_FLAGS = [
    "-mcpu=cortex-m4",
    "-mthumb",
    "-mfloat-abi=hard",
    "-mfpu=fpv4-sp-d16",
    "-Os",
    "-fno-math-errno",  # sqrtf becomes one vsqrt.f32
    "-ffunction-sections",
    "-fdata-sections",
    "-fstack-usage",
]
# Debian packages behind each tool (named in skip reasons and errors).
PACKAGES = {
    "gcc": "gcc",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu (and libc6-dev-arm64-cross)",
    "qemu-aarch64": "qemu-user",
    "arm-none-eabi-gcc": "gcc-arm-none-eabi (and libnewlib-arm-none-eabi: math.h)",
    "arm-none-eabi-size": "binutils-arm-none-eabi",
    "arm-none-eabi-nm": "binutils-arm-none-eabi",
    "qemu-system-arm": "qemu-system-arm",
}

# Steps through policy_step with observations and reset flags read from stdin, writing
# every action and new state to stdout (float32, native byte order). Used to compare two
# builds (x86 vs aarch64 under qemu) on the same inputs.
IO_HARNESS = r"""#include <stdio.h>
#include <string.h>
#include "policy.h"

int main(void)
{
    float obs[POLICY_OBS_DIM], action[POLICY_ACTION_DIM];
    float state[POLICY_STATE_DIM + 1] = {0};
    unsigned char reset;
    while (fread(&reset, 1, 1, stdin) == 1) {
        if (fread(obs, sizeof obs, 1, stdin) != 1) return 2;
        if (reset) memset(state, 0, sizeof state);
        policy_step(obs, state, action, state);
        fwrite(action, sizeof action, 1, stdout);
        fwrite(state, sizeof(float), POLICY_STATE_DIM, stdout);
    }
    return 0;
}
"""


class ToolchainError(RuntimeError):
    """A compiler or emulator is missing, or a build or run failed.

    ``str(error)`` is one line: what failed (naming the file) and the tool's first error
    line. ``command``, ``returncode`` and ``stderr`` hold the whole story (None for a
    missing tool).
    """

    def __init__(
        self,
        message: str,
        command: list[str] | None = None,
        returncode: int | None = None,
        stderr: str | None = None,
    ) -> None:
        super().__init__(message)
        self.command, self.returncode, self.stderr = command, returncode, stderr


def first_error_line(stderr: str) -> str:
    """The line of a compiler's (or program's) output that says what went wrong: the first
    with ``error`` in it, else the first non-empty one; "" for no output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b", line, re.IGNORECASE):
            return line
    return lines[0] if lines else ""


def find_tool(name: str) -> str:
    """The path of ``name`` on PATH, or a ToolchainError naming the package to install."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGES.get(name, name)
        raise ToolchainError(
            f"{name} not found on PATH; install it (Debian: apt-get install {package})"
        )
    return path


def source_dir(path: str | os.PathLike) -> Path:
    """The directory holding ``policy.c`` and ``policy.h`` for ``path`` (that directory, or
    ``policy.c`` or a built library inside it), or a clear error."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    missing = [n for n in (SOURCE_NAME, HEADER_NAME) if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} has no {' or '.join(missing)}; write them with "
            f"`compressm-rl export RUN_DIR --format c --out DIR`"
        )
    return directory


def is_c_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a C export: a ``.c`` file or a directory holding ``policy.c``."""
    path = Path(path)
    return path.suffix == ".c" or (path / SOURCE_NAME).is_file()


def run_tool(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command`` (stdout and stderr captured, as bytes); a ``ToolchainError`` naming
    ``what`` failed, with the tool's first error line, if it exits non-zero."""
    result = subprocess.run(command, capture_output=True, **kwargs)
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else ""
        first = first_error_line(stderr)
        status = (
            f"signal {-result.returncode}" if result.returncode < 0 else f"exit {result.returncode}"
        )
        raise ToolchainError(
            f"{what} failed ({status})" + (f": {first}" if first else ""),
            command,
            result.returncode,
            stderr,
        )
    return result


def compile_c(
    sources: Path,
    out: Path,
    harness: str | None = None,
    cc: str = "gcc",
    flags: list[str] | None = None,
    shared: bool = False,
) -> Path:
    """Compile ``sources/policy.c`` (plus a harness's ``main``) into ``out``.

    Args:
        sources: directory with ``policy.c`` and ``policy.h``.
        out: the executable or shared library to write (its directory must exist).
        harness: C source of a ``main`` (``IO_HARNESS``, ``export.c_bench``'s ``bench.c``)
            or None.
        cc: the compiler (``gcc``, ``aarch64-linux-gnu-gcc``, ...).
        flags: optimisation flags (``HOST_FLAGS`` by default).
        shared: build a shared library (``-shared -fPIC``) for ``ctypes``.
    """
    command = [find_tool(cc), *C_STANDARD, *(HOST_FLAGS if flags is None else flags)]
    command += ["-I", str(sources), str(sources / SOURCE_NAME)]
    if harness is not None:
        main = out.with_name(out.name + "_main.c")
        main.write_text(harness)
        command.append(str(main))
    if shared:
        command += ["-shared", "-fPIC"]
    run_tool([*command, "-o", str(out), "-lm"], f"compiling {sources / SOURCE_NAME}")
    return out


def read_header_dims(sources: Path) -> tuple[int, int, int]:
    """``(POLICY_OBS_DIM, POLICY_ACTION_DIM, POLICY_STATE_DIM)`` from ``policy.h``."""
    text = (sources / HEADER_NAME).read_text()
    dims = []
    for name in ("POLICY_OBS_DIM", "POLICY_ACTION_DIM", "POLICY_STATE_DIM"):
        match = re.search(rf"#define {name} (\d+)", text)
        if match is None:
            raise ValueError(f"{sources / HEADER_NAME} does not define {name}")
        dims.append(int(match.group(1)))
    return dims[0], dims[1], dims[2]


def build_io(
    sources: Path, build_dir: Path, cc: str = "gcc", flags: list[str] | None = None
) -> Path:
    """An ``IO_HARNESS`` executable of ``sources`` in ``build_dir`` (see ``run_io``)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    return compile_c(sources, build_dir / f"policy_io_{Path(cc).name}", IO_HARNESS, cc, flags)


def read_metadata(sources: Path) -> dict[str, str]:
    """The ONNX model's metadata, as ``policy.c`` records it (``METADATA_TAG`` line)."""
    match = re.search(
        rf"{re.escape(METADATA_TAG)} (\{{.*\}}) \*/", (sources / SOURCE_NAME).read_text()
    )
    if match is None:
        raise ValueError(
            f"{sources / SOURCE_NAME} has no '{METADATA_TAG}' line: not written by compressm-rl; "
            f"export it with `compressm-rl export RUN_DIR --format c --out DIR`"
        )
    return json.loads(match.group(1))


def safe_action(meta: dict[str, str]) -> np.ndarray:
    """The action a policy step gives for non-finite input: 0 clipped into the action
    bounds (metadata ``action_low``/``action_high``, JSON lists; 0 where absent), float32
    ``[act_dim]``. The C step (``policy.h``) and ``export.runtime.StepPolicy`` both use it.

    Raises ValueError for bounds that are not ``act_dim`` numbers with low <= high, or
    that leave it non-finite.
    """
    act_dim = int(meta["act_dim"])
    bounds = []
    for key, default in (("action_low", -np.inf), ("action_high", np.inf)):
        text = meta.get(key)
        try:
            value = np.full(act_dim, default) if text is None else json.loads(text)
            value = np.asarray(value, np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"metadata {key} {text!r} is not a list of numbers: {err}") from err
        if value.shape != (act_dim,) or np.isnan(value).any():
            raise ValueError(f"metadata {key} {text!r} is not {act_dim} numbers")
        bounds.append(value)
    low, high = bounds
    if (low > high).any():
        raise ValueError(f"metadata action bounds {low.tolist()} > {high.tolist()}")
    with np.errstate(over="ignore"):
        action = np.clip(np.zeros(act_dim), low, high).astype(np.float32)
    if not np.isfinite(action).all():
        raise ValueError(f"no finite safe action within bounds {low.tolist()}, {high.tolist()}")
    return action


_FLOAT_ARRAY = re.compile(r"static const float (\w+)\[\d+\] = \{([^}]*)\};")
_FLOAT_LITERAL = re.compile(
    r"[+-]?(?:0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?\d+"
    r"|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[fF]?"
)
_GENERATED_ITEM = r"\s*-?(?:0x1(?:\.[0-9a-f]*)?p[+-]\d+|0\.0)f\s*"
_GENERATED_BODY = re.compile(rf"(?:{_GENERATED_ITEM},)*{_GENERATED_ITEM},?\s*")
_EXPONENT_BEYOND_FLOAT32 = re.compile(r"p\+(?:12[7-9]|1[3-9]\d|[2-9]\d\d|\d{4,})")
_NON_FINITE_NAMES = re.compile(
    r"\b(?:NAN|INFINITY|HUGE_VALF?|HUGE_VALL|nan[fl]?|inf[fl]?|__builtin_(?:nan|inf|huge_val)\w*)\b"
)


def check_weights_finite(sources: Path) -> None:
    """ValueError naming the array if ``policy.c``'s weights are not all finite float32
    literals (NaN, inf, a literal beyond float32's range, or an expression such as
    ``0.0f/0.0f`` or ``NAN``), or if its code names NaN or infinity anywhere."""
    path = sources / SOURCE_NAME
    # Comments out (blanked, so line numbers stay).
    code = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m[0]), path.read_text(), flags=re.S)
    hint = (
        "a policy with NaN or inf weights computes NaN; re-export it with `compressm-rl "
        "export RUN_DIR --format c --out DIR` from a checkpoint with finite weights"
    )
    for match in _FLOAT_ARRAY.finditer(code):
        body = match.group(2)
        # As written by the emitter (hex floats of float32 values, no exponent above 127):
        # finite, known in one scan. Anything else is parsed literal by literal.
        if _GENERATED_BODY.fullmatch(body) and not _EXPONENT_BEYOND_FLOAT32.search(body):
            continue
        for index, item in enumerate(body.split(",")):
            item = item.strip()
            if not item and index:  # a trailing comma
                continue
            value = None
            if _FLOAT_LITERAL.fullmatch(item):
                text = item.rstrip("fF")
                value = float.fromhex(text) if "x" in text.lower() else float(text)
            with np.errstate(over="ignore"):
                finite = value is not None and bool(np.isfinite(np.float32(value)))
            if not finite:
                raise ValueError(
                    f"{path}: weight array {match.group(1)} element {index} is {item!r}, not "
                    f"a finite float32 literal; {hint}"
                )
    rest = _FLOAT_ARRAY.sub(lambda m: "\n" * m[0].count("\n"), code)  # arrays: checked
    named = _NON_FINITE_NAMES.search(rest)
    if named:
        line = rest.count("\n", 0, named.start()) + 1
        raise ValueError(f"{path}:{line}: the code uses {named.group(0)} (NaN or inf); {hint}")


def run_io(
    executable: Path,
    sources: Path,
    obs: np.ndarray,
    resets: np.ndarray,
    runner: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run a ``build_io`` executable of ``sources`` on ``obs`` ``[T, obs_dim]`` with
    ``resets`` ``[T]`` bool (True: zero the state before that step).

    ``runner`` prefixes the command (``["qemu-aarch64"]``). Returns ``(actions [T, act_dim],
    states [T, S])`` float32, the state after each step.
    """
    obs_dim, act_dim, state_dim = read_header_dims(sources)
    obs = np.ascontiguousarray(obs, np.float32)
    if obs.ndim != 2 or obs.shape[1] != obs_dim or resets.shape != (len(obs),):
        raise ValueError(
            f"obs must be [T, {obs_dim}] and resets [T], got {obs.shape}, {resets.shape}"
        )
    records = np.zeros(len(obs), dtype=[("reset", "u1"), ("obs", "<f4", (obs_dim,))])
    records["reset"], records["obs"] = resets, obs
    command = [*(runner or []), str(executable)]
    result = run_tool(command, f"running {executable.name}", input=records.tobytes())
    out = np.frombuffer(result.stdout, np.float32).reshape(len(obs), act_dim + state_dim)
    return out[:, :act_dim].copy(), out[:, act_dim:].copy()


def cortex_m4_size(path: str | os.PathLike) -> dict:
    """Bytes of code, weights and stack of ``policy_step`` for a Cortex-M4 (``-Os``).

    Compiles ``policy.c`` to an object with ``arm-none-eabi-gcc`` (``CORTEX_M4_FLAGS``) and
    reads its sections: ``code`` is ``.text*``, ``weights`` is ``.rodata*`` (flash),
    ``ram`` is ``.data*``/``.bss*`` (0: nothing is written outside the stack), ``stack``
    is ``policy_step``'s frame from ``-fstack-usage``; ``undefined`` lists the symbols it
    needs at link time (none, or ``sqrtf`` without ``-fno-math-errno``).
    """
    sources = source_dir(path)
    size_tool = find_tool("arm-none-eabi-size")
    nm_tool = find_tool("arm-none-eabi-nm") if shutil.which("arm-none-eabi-nm") else None
    with tempfile.TemporaryDirectory(prefix="compressm-c-m4-") as tmp:
        obj = Path(tmp) / "policy.o"
        command = [find_tool("arm-none-eabi-gcc"), *C_STANDARD, *CORTEX_M4_FLAGS, "-c"]
        run_tool(
            [*command, "-I", str(sources), str(sources / SOURCE_NAME), "-o", str(obj)],
            f"cross-compiling {sources / SOURCE_NAME}",
        )
        sections = run_tool([size_tool, "-A", str(obj)], "arm-none-eabi-size").stdout.decode()
        sizes = {"code": 0, "weights": 0, "ram": 0}
        for line in sections.splitlines():
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                continue
            name, size = parts[0], int(parts[1])
            if name.startswith(".text"):
                sizes["code"] += size
            elif name.startswith(".rodata"):
                sizes["weights"] += size
            elif name.startswith((".data", ".bss")):
                sizes["ram"] += size
        stack = 0
        for line in (Path(tmp) / "policy.su").read_text().splitlines():
            if ":policy_step\t" in line or line.split("\t")[0].endswith("policy_step"):
                stack = int(line.split("\t")[1])
        undefined = []
        if nm_tool:
            listing = run_tool([nm_tool, "-u", str(obj)], "arm-none-eabi-nm").stdout.decode()
            undefined = [line.split()[-1] for line in listing.splitlines() if line.strip()]
    return {**sizes, "stack": stack, "undefined": undefined, "flags": " ".join(CORTEX_M4_FLAGS)}
