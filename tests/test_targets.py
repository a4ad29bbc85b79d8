"""The C step on a target: `make bench` in an export, bench.c's raw samples, cross-builds run
under qemu-aarch64, and a device reached over a real sshd on 127.0.0.1 (a throwaway key and
host key, started here). Tools that are missing skip with the package to install."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_c_export import POLICIES, require, write_sources
from test_export import make_policy

from export.c_bench import CBenchmark, bench_source, makefile
from export.c_build import AARCH64_FLAGS, HOST_FLAGS, ToolchainError, read_metadata
from export.c_codegen import generate
from export.onnx_export import build_model
from export.targets import TARGETS, bench_on_target, runner_command, target_flags

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="needs gcc (apt-get install gcc)"
)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A compressed-size SSM export of Hopper-v5 with its bench.c and Makefile."""
    policy = make_policy("Hopper-v5", seed=3, **POLICIES["ssm_compressed"])
    model = build_model(policy, "Hopper-v5", 0, merged=False)
    out = write_sources(model, tmp_path_factory.mktemp("target") / "policy_c")
    sources = generate(model, dir_name=str(out))
    for name, text in sources.files().items():
        (out / name).write_text(text)
    return out


def test_make_bench_prints_the_table_without_python(export_dir, tmp_path):
    require("make")
    work = shutil.copytree(export_dir, tmp_path / "copy")
    result = subprocess.run(
        ["make", "-s", "bench", "STEPS=300", "WARMUP=10"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    header = "| model | kind | state dims | nodes | p50 us | p90 us | p99 us | max us | steps/s |"
    assert header in lines
    row = next(line for line in lines if line.startswith("| C policy_c |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:4] == ["c", "[25, 7]", read_metadata(export_dir)["num_nodes"]]
    p50, p90, p99, top = (float(c) for c in cells[4:8])
    assert 0 < p50 <= p90 <= p99 <= top
    assert any(line.startswith("| C clock floor") for line in lines)


def test_bench_c_raw_samples_and_arguments(export_dir, tmp_path):
    with CBenchmark(export_dir, steps=200, warmup=5) as benchmark:
        first, second = benchmark.run(), benchmark.run()
    assert first.times_ns.shape == first.floor_ns.shape == (200,)
    assert (first.times_ns > 0).all() and (second.times_ns > 0).all()
    assert (first.floor_ns >= 0).all() and np.median(first.floor_ns) < np.median(first.times_ns)
    built = tmp_path / "bench"
    source = tmp_path / "bench.c"
    source.write_text(bench_source(read_metadata(export_dir), "x"))
    subprocess.run(
        [
            "gcc",
            "-std=c99",
            *HOST_FLAGS,
            "-I",
            str(export_dir),
            str(source),
            str(export_dir / "policy.c"),
            "-o",
            str(built),
            "-lm",
        ],
        check=True,
    )
    for bad in (["0"], ["--raw", "10"], ["--raw", "10", "-1", "0"], ["1", "2", "3"]):
        assert subprocess.run([str(built), *bad], capture_output=True).returncode == 2


def test_makefile_names_the_portable_flags():
    text = makefile(HOST_FLAGS, [f for f in AARCH64_FLAGS if f != "-static"])
    assert f"CFLAGS ?= {' '.join(HOST_FLAGS)}\n" in text
    assert "\n\t$(CC) -std=c99 $(CFLAGS)" in text and "-march=native" not in text.split("\n")[-12:]


def test_cpu_names_become_the_targets_flag():
    assert target_flags(TARGETS["aarch64"], "cortex-a72")[-1] == "-mcpu=cortex-a72"
    assert target_flags(TARGETS["aarch64"], None) == list(AARCH64_FLAGS)
    with pytest.raises(ValueError, match="not a CPU name"):
        target_flags(TARGETS["aarch64"], "a72; rm -rf /")


def test_aarch64_under_qemu_is_emulated_and_matches_the_host_build(export_dir):
    require("aarch64-linux-gnu-gcc", "qemu-aarch64")
    row, floor = bench_on_target(export_dir, "aarch64", steps=300, warmup=10)
    assert row["target"] == floor["target"] == "aarch64"
    assert row["emulated"] is floor["emulated"] is True
    assert row["device_machine"] == "aarch64" and "emulated" in row["name"]
    parity = row["parity_vs_host"]
    assert parity["steps"] == 1000 and parity["max_abs_action"] < 1e-4
    assert row["steps"] == 300 and row["p50_us"] > 0


def test_runner_and_flag_errors_are_clear(export_dir, capsys):
    from compressm_rl.cli import main

    with pytest.raises(ValueError, match="give one"):
        runner_command("root@host", "adb shell")
    assert runner_command(None, None) is None
    assert runner_command("pi@robot", None)[-1] == "pi@robot"
    onnx_file = export_dir / "policy.onnx"
    cases = [
        ([str(onnx_file), "--target", "aarch64"], "only C exports run on a target"),
        ([str(export_dir), "--target", "aarch64", "--native"], "--native builds"),
        ([str(export_dir), "--runner", "sh -c", "--run", "x"], "--run (torch rows)"),
        ([str(export_dir), "--target", "cortex-m4", "--ssh", "a@b"], "mps2-an386"),
        ([str(export_dir), "--runner", "no-such-runner-here"], "no-such-runner-here not found"),
        ([str(export_dir), "--ssh-config", "cfg"], "--ssh-config is for --ssh"),
        ([str(onnx_file), "--ssh-config", "cfg"], "--ssh-config is for --ssh"),
    ]
    for argv, message in cases:
        assert main(["bench", *argv, "--steps", "10"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_a_device_that_fails_is_one_line(export_dir, capsys):
    from compressm_rl.cli import main

    # `false` as the runner: the device refuses every command.
    assert main(["bench", str(export_dir), "--runner", "false", "--steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "making a directory on the device failed" in err and len(err.splitlines()) == 1


# ----- a real sshd on 127.0.0.1 -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """``(destination, client config)`` of an sshd on 127.0.0.1 that lets this user in with a
    throwaway key; stopped at the end of the module."""
    server = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin")
    if server is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("sshd/ssh not found: apt-get install openssh-server openssh-client")
    home = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / key)], check=True
        )
    (home / "authorized_keys").write_text((home / "client_key.pub").read_text())
    port = _free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home / 'host_key'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nPidFile {home / 'sshd.pid'}\n"
        "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nPermitRootLogin prohibit-password\nLogLevel ERROR\n"
    )
    (home / "ssh_config").write_text(
        f"Host 127.0.0.1\n  Port {port}\n  IdentityFile {home / 'client_key'}\n"
        f"  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        f"  UserKnownHostsFile {home / 'known_hosts'}\n  LogLevel ERROR\n"
    )
    if os.geteuid() == 0:  # Debian's sshd will not start without its privilege-separation dir
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = home / "sshd.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [server, "-D", "-e", "-f", str(home / "sshd_config")], stderr=stderr
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    pytest.skip(f"sshd did not start: {log.read_text().strip()[:300]}")
                time.sleep(0.1)
        user = (
            os.environ.get("USER")
            or subprocess.run(
                ["id", "-un"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        yield f"{user}@127.0.0.1", str(home / "ssh_config")
    finally:
        process.terminate()
        process.wait(10)


def test_bench_over_ssh_runs_on_the_device_end_to_end(export_dir, sshd, tmp_path, capsys):
    from compressm_rl.cli import main

    destination, config = sshd
    out = tmp_path / "ssh.json"
    argv = ["bench", str(export_dir), "--target", "native", "--ssh", destination]
    argv += ["--ssh-config", config, "--steps", "300", "--warmup", "10", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert f"target native on {platform.machine()}" in table
    rows = {row["kind"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["c"]["target"] == "native" and rows["c"]["emulated"] is False
    assert rows["c"]["device_machine"] == platform.machine()
    assert rows["c"]["parity_vs_host"]["max_abs_action"] == 0.0  # the same build, the same CPU
    assert rows["c"]["steps"] == 300 and rows["floor"]["steps"] == 300
    # Nothing is left on the device.
    leftover = subprocess.run(
        ["ssh", "-F", config, destination, "ls -d ${TMPDIR:-/tmp}/compressm-bench.* 2>/dev/null"],
        capture_output=True,
        text=True,
    )
    assert leftover.stdout.strip() == ""


def test_an_unreachable_device_is_one_line(export_dir, sshd, capsys):
    from compressm_rl.cli import main

    _, config = sshd
    argv = ["bench", str(export_dir), "--ssh", "nobody-here@127.0.0.1", "--ssh-config", config]
    assert main([*argv, "--steps", "10"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: making a directory on the device failed")
        and len(err.splitlines()) == 1
    )
    with pytest.raises(ToolchainError):
        bench_on_target(export_dir, "native", runner_command("x@127.0.0.1:1", None, config))


def test_a_device_of_another_architecture_is_refused_before_building(export_dir, capsys):
    from compressm_rl.cli import main

    argv = ["bench", str(export_dir), "--target", "aarch64", "--runner", "sh -c"]
    assert main([*argv, "--steps", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"the device is {platform.machine()}, not aarch64" in err
    assert "--target native" in err and len(err.splitlines()) == 1


def test_device_output_mixed_with_text_is_named():
    from export.c_bench import BenchResult

    with pytest.raises(ValueError, match="cut or mixed with other text"):
        BenchResult.from_raw(b"welcome\n" + bytes(160), 10)
