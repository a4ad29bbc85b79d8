"""The C export on an emulated Cortex-M4F (QEMU's mps2-an386): parity with the x86 build,
linked sizes against ``cortex_m4_size``, instruction counts checked against a single-step
trace, non-finite input on the board, and one-line errors for a hang, a fault, a bad status
and a drifting result. Real compilers and a real emulator; missing tools skip with the
package to install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.c_build import (
    PACKAGES,
    ToolchainError,
    build_io,
    cortex_m4_size,
    read_metadata,
    run_io,
    safe_action,
)
from export.c_codegen import generate
from export.cortex_m4 import (
    build_image,
    markdown_table,
    observation_sequence,
    qemu_command,
    run_cortex_m4,
    run_image,
)
from export.onnx_export import build_model
from policies.actor_critic import ActorCritic

TOOLS = ("gcc", "arm-none-eabi-gcc", "arm-none-eabi-size", "arm-none-eabi-nm", "qemu-system-arm")
pytestmark = [
    pytest.mark.skipif(
        shutil.which(tool) is None,
        reason=f"{tool} not found: apt-get install {PACKAGES.get(tool, 'binutils-arm-none-eabi')}",
    )
    for tool in TOOLS
]

# Hopper-v5 sizes (obs 11, act 3), width 64, random weights: cost depends on the shapes.
POLICIES = {
    "mlp": dict(policy="mlp"),
    "ssm_small": dict(policy="ssm", state_dims=[25, 7]),
    "ssm_large": dict(policy="ssm", state_dims=[128, 128]),
}
POLICY_NONFINITE_INPUT = 1


@pytest.fixture(scope="module", autouse=True)
def newlib(tmp_path_factory):
    """Skip when arm-none-eabi-gcc has no C library (math.h, memcpy): libnewlib-arm-none-eabi."""
    probe = tmp_path_factory.mktemp("probe") / "probe.c"
    probe.write_text("#include <math.h>\nfloat f(float x) { return sqrtf(x); }\n")
    compiled = subprocess.run(
        ["arm-none-eabi-gcc", "-c", str(probe), "-o", str(probe.with_suffix(".o"))],
        capture_output=True,
    )
    if compiled.returncode != 0 and b"math.h" in compiled.stderr:
        pytest.skip("arm-none-eabi-gcc has no C library: apt-get install libnewlib-arm-none-eabi")


def write_export(out: Path, seed: int, **kwargs) -> Path:
    """A C export of a random Hopper-sized policy, its actions of order 1 (gain-1.5 head)."""
    torch.manual_seed(seed)
    bound = np.ones(3, np.float32)
    policy = ActorCritic(11, 3, -bound, bound, width=64, **kwargs)
    with torch.no_grad():
        torch.nn.init.orthogonal_(policy.actor_head.weight, gain=1.5)
        policy.actor_head.bias.normal_(0, 0.3)
    merged = False if kwargs["policy"] == "ssm" else None  # the C export's graph
    sources = generate(build_model(policy, "Hopper-v5", merged=merged))
    out.mkdir(parents=True)
    (out / "policy.c").write_text(sources.source)
    (out / "policy.h").write_text(sources.header)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("m4")
    return {
        name: write_export(out / name, seed=20 + i, **kwargs)
        for i, (name, kwargs) in enumerate(POLICIES.items())
    }


@pytest.fixture(scope="module")
def reports(exports) -> dict[str, dict]:
    """run_cortex_m4 of every export: 1000 steps on the board and on x86."""
    return {name: run_cortex_m4(directory) for name, directory in exports.items()}


# ----- parity, sizes, instructions ---------------------------------------------------------
@pytest.mark.parametrize("name", list(POLICIES))
def test_board_matches_x86_and_sizes_match_the_object(exports, reports, name):
    report = reports[name]
    print(name, report)
    assert report["target"] == "cortex-m4" and report["emulated"] is True
    assert report["steps"] == 1000 and report["policy"] == name
    assert report["max_action_diff"] <= 1e-5 and report["max_state_diff"] <= 1e-5

    size = cortex_m4_size(exports[name])
    assert report["flash_weights"] == size["weights"]  # the weights, all of them, in flash
    # The linked code is the object's (padding for alignment at most) plus its libc calls.
    assert size["code"] <= report["flash_policy_o_code"] <= size["code"] + 16
    assert report["library"] == size["undefined"] == ["memcpy", "memset"]
    assert 0 < report["flash_library_code"] < 2048
    assert report["flash_code"] == report["flash_policy_o_code"] + report["flash_library_code"]
    assert report["ram_policy"] == size["ram"] == 0  # no writable globals, linked or not
    assert report["ram_state"] == 4 * {"mlp": 0, "ssm_small": 64, "ssm_large": 512}[name]
    # The measured depth is the frame plus the small frames of memcpy/memset under it.
    assert report["stack"] == size["stack"] > 0
    assert report["stack"] <= report["stack_measured"] <= report["stack"] + 64

    low, mean, high = (report[f"instructions_per_step{s}"] for s in ("_min", "", "_max"))
    assert 0 < low <= mean <= high <= 1.01 * low  # branch-free code: nearly constant
    assert sorted(p.name for p in exports[name].iterdir()) == ["policy.c", "policy.h"]


def test_bigger_policy_executes_more_instructions(reports):
    counts = {name: report["instructions_per_step"] for name, report in reports.items()}
    assert counts["ssm_large"] > 2 * counts["ssm_small"] > 2 * counts["mlp"], counts


def test_instruction_count_matches_a_single_step_trace(exports, tmp_path):
    """QEMU single-stepping, logging every instruction executed inside the policy's code and
    the library code it calls: the timer's count is that plus the call's few instructions
    (argument set-up, bl, storing the status)."""
    sources = exports["mlp"]
    obs, resets = observation_sequence(11, steps=2, seed=3)
    image = build_image(sources, tmp_path, obs, resets)
    board = run_image(image, sources, steps=2)
    sections = {}
    listing = subprocess.run(
        ["arm-none-eabi-size", "-A", str(image)], capture_output=True, text=True, check=True
    )
    for name, size, address in re.findall(r"^(\.\w+)\s+(\d+)\s+(\d+)$", listing.stdout, re.M):
        sections[name] = (int(address), int(size))
    start = sections[".policy_code"][0]
    end = sum(sections[".library_code"]) - 1
    assert sections[".library_code"][0] == sum(sections[".policy_code"])  # one range
    log = tmp_path / "exec.log"
    trace = [
        *one_instruction_per_block(),
        "-d",
        "exec,nochain",
        "-dfilter",
        f"{start:#x}..{end:#x}",
    ]
    # Without -icount: a block cut short when the instruction budget runs out is logged
    # twice (once before the cut); this trace needs no virtual clock.
    command = qemu_command(image)
    command = command[: command.index("-icount")] + command[command.index("-icount") + 2 :]
    subprocess.run(
        [*command, *trace, "-D", str(log)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=True,
    )
    # "Trace 0: HOST [CS_BASE/PC/FLAGS/CFLAGS] SYMBOL": a call starts at policy_step's entry.
    entry = int(re.search(r"^([0-9a-f]+) T policy_step$", symbols(image), re.M).group(1), 16)
    pcs = [int(pc, 16) for pc in re.findall(r"^Trace \d+: \S+ \[\w+/(\w+)/", log.read_text(), re.M)]
    starts = [i for i, pc in enumerate(pcs) if pc == entry] + [len(pcs)]
    traced = np.diff(starts)
    overhead = board.instructions - traced
    print(f"counted {board.instructions}, traced {traced}")
    assert starts[0] == 0 and len(traced) == 2 and traced.min() > 10_000
    # The same few instructions of the call each step: argument set-up, bl, storing status.
    assert overhead[0] == overhead[1] and 1 <= overhead[0] <= 12


def one_instruction_per_block() -> list[str]:
    """QEMU's flag for a translation block per instruction (renamed in QEMU 8.1)."""
    version = subprocess.run(
        ["qemu-system-arm", "--version"], capture_output=True, text=True, check=True
    ).stdout
    major, minor = map(int, re.search(r"version (\d+)\.(\d+)", version).groups())
    return ["-accel", "tcg,one-insn-per-tb=on"] if (major, minor) >= (8, 1) else ["-singlestep"]


def symbols(image: Path) -> str:
    return subprocess.run(
        ["arm-none-eabi-nm", str(image)], capture_output=True, text=True, check=True
    ).stdout


def test_non_finite_observation_gives_the_safe_action_on_the_board(exports, tmp_path):
    sources = exports["ssm_small"]
    obs, resets = observation_sequence(11, steps=6, seed=4)
    obs[2, 5] = np.nan
    obs[4, 0] = np.inf
    board = run_image(build_image(sources, tmp_path, obs, resets), sources, steps=6)
    assert board.statuses.tolist() == [0, 0, 1, 0, 1, 0]
    safe = safe_action(read_metadata(sources))
    for t in (2, 4):
        np.testing.assert_array_equal(board.actions[t], safe)
        assert not board.states[t].any()  # an episode start: the next step begins afresh
    actions, states = run_io(build_io(sources, tmp_path), sources, obs, resets)
    np.testing.assert_array_equal(board.actions, actions)
    np.testing.assert_array_equal(board.states, states)


# ----- failures: one line each ---------------------------------------------------------------
FAKE_HEADER = """\
#define POLICY_OBS_DIM 4
#define POLICY_ACTION_DIM 2
#define POLICY_STATE_DIM 0
#define POLICY_OK 0
int policy_step(const float *obs, const float *state, float *action, float *state_out);
"""
FAKE_SOURCE = """\
#include "policy.h"
int policy_step(const float *obs, const float *state, float *action, float *state_out)
{{
    (void)state;
    (void)state_out;
    action[0] = obs[0];
    action[1] = obs[1];
    {body}
    return 0;
}}
"""
FAKES = {
    "hang": ("for (;;) {}", ToolchainError, "without exiting"),
    "fault": ("__builtin_trap();", ToolchainError, "took a fault"),
    "status": ("return 2;", ValueError, "returned 2, not POLICY_OK, at step 0"),
    # 320 KB of frame: past the stack's 256 KB, into RAM painted below it.
    "stack": (
        "volatile float big[80000];\n    big[0] = obs[2];\n    big[79999] = big[0];",
        ToolchainError,
        "overflowed its 262144-byte stack",
    ),
    # Only on the board: what a portability bug in the C would look like.
    "drift": ("#ifdef __arm__\n    action[1] += 1e-3f;\n#endif", ValueError, "differ from"),
}


@pytest.mark.parametrize("fake", list(FAKES))
def test_failures_raise_one_line_errors(fake, tmp_path):
    body, error, message = FAKES[fake]
    sources = tmp_path / "c"
    sources.mkdir()
    (sources / "policy.h").write_text(FAKE_HEADER)
    (sources / "policy.c").write_text(FAKE_SOURCE.format(body=body))
    with pytest.raises(error, match=message) as caught:
        run_cortex_m4(sources, steps=5, timeout_s=3 if fake == "hang" else 60)
    print(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_emulator_names_its_package(exports, tmp_path, monkeypatch):
    """A PATH with the compilers but no qemu-system-arm."""
    for tool in TOOLS[:-1]:
        os.symlink(shutil.which(tool), tmp_path / tool)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolchainError, match=r"apt-get install qemu-system-arm\)?$"):
        run_cortex_m4(exports["mlp"], steps=1)


def test_markdown_table_has_a_row_per_policy(reports):
    table = markdown_table(list(reports.values()))
    print(table)
    lines = table.splitlines()
    assert lines[0].startswith("| policy | flash code B | flash weights B | RAM B | stack B |")
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == [f"| {name}" for name in reports]
    large = reports["ssm_large"]
    assert f"| {large['flash_weights']:,} | {large['ram_state']:,} |" in rows[-1]
    assert "emulated" in table


def test_the_module_imports_neither_torch_nor_gym_nor_onnx():
    """export.cortex_m4 is device-side, like export.c_build."""
    code = (
        "import sys, export.cortex_m4; "
        "print(sorted({'torch', 'gymnasium', 'mujoco', 'onnx'} & set(sys.modules)))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
