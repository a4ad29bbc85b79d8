"""C export: generated sources, gcc builds, parity with onnxruntime in MuJoCo, an
independent ONNX-to-C reference, aarch64 under qemu, Cortex-M4 sizes. Real compilers,
real sessions, real physics; tools that are missing skip with the package to install."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_export import make_policy

from export.c_build import (
    AARCH64_FLAGS,
    C_STANDARD,
    PACKAGES,
    ToolchainError,
    build_io,
    compile_c,
    cortex_m4_size,
    find_tool,
    run_io,
)
from export.c_codegen import UnsupportedGraphError, generate
from export.c_runtime import CPolicy
from export.onnx_export import build_model
from export.parity import check_parity
from export.runtime import OnnxPolicy

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="needs gcc (apt-get install gcc)"
)

POLICIES = {
    "ssm_full": dict(policy="ssm", state_dims=[128, 128]),
    "ssm_compressed": dict(policy="ssm", state_dims=[25, 7]),
    "mlp": dict(policy="mlp"),
}


def write_sources(model: onnx.ModelProto, out: Path) -> Path:
    sources = generate(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy.c").write_text(sources.source)
    (out / "policy.h").write_text(sources.header)
    onnx.save(model, str(out / "policy.onnx"))
    return out


def require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: apt-get install {PACKAGES.get(tool, tool)}")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (torch policy, C export directory with its policy.onnx), Hopper-v5."""
    out = tmp_path_factory.mktemp("c")
    result = {}
    for i, (name, kwargs) in enumerate(POLICIES.items()):
        policy = make_policy("Hopper-v5", seed=10 + i, stress=name == "ssm_compressed", **kwargs)
        model = build_model(
            policy, "Hopper-v5", merged=False if kwargs["policy"] == "ssm" else None
        )
        result[name] = (policy, write_sources(model, out / name))
    return result


# ----- the sources ------------------------------------------------------------------------
def test_header_declares_exactly_the_interface(exports):
    _, directory = exports["ssm_compressed"]
    header = (directory / "policy.h").read_text()
    defines = dict(re.findall(r"#define (POLICY_\w+) (\d+)", header))
    assert defines == {"POLICY_OBS_DIM": "11", "POLICY_ACTION_DIM": "3", "POLICY_STATE_DIM": "64"}
    code = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    declarations = [line for line in code.splitlines() if "(" in line and line.strip()]
    assert declarations == [
        "void policy_step(const float *obs, const float *state, float *action, float *state_out);"
    ]


@pytest.mark.parametrize("name", list(POLICIES))
def test_builds_pedantic_with_no_heap_and_no_writable_globals(exports, name, tmp_path):
    _, directory = exports[name]
    obj = tmp_path / "policy.o"
    flags = ["-O2", "-pedantic", "-Wshadow", "-Wconversion", "-Wno-sign-conversion", "-c"]
    subprocess.run(
        ["gcc", *C_STANDARD, *flags, str(directory / "policy.c"), "-o", str(obj)],
        check=True,
        capture_output=True,
    )
    symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    entries = [line.split()[-2:] for line in symbols.splitlines()]
    exported = [sym for kind, sym in entries if kind.isupper() and kind != "U"]
    assert exported == ["policy_step"]  # weights and helpers are static
    assert not [sym for kind, sym in entries if kind in "dDbBcC"]  # nothing writable
    undefined = {sym for kind, sym in entries if kind == "U"}
    assert undefined <= {"sqrtf", "memcpy", "floorf"}, undefined  # no malloc, no libm beyond


# ----- agreement with onnxruntime --------------------------------------------------------
@pytest.mark.parametrize("name", list(POLICIES))
def test_one_step_matches_onnxruntime_from_random_states(exports, name):
    _, directory = exports[name]
    c_policy, onnx_policy = CPolicy(directory), OnnxPolicy(directory / "policy.onnx")
    rng = np.random.default_rng(0)
    obs = rng.normal(0, 3, (64, c_policy.obs_dim))  # beyond the clip range too
    state = rng.normal(0, 1, (64, c_policy.state_size))
    got, got_state = c_policy.run(obs, state)
    want, want_state = onnx_policy.run(obs, state)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_state, want_state, rtol=1e-4, atol=1e-5)
    assert np.abs(got).max() > 0.1  # not a vacuous comparison


@pytest.mark.parametrize("name", list(POLICIES))
def test_closed_loop_in_mujoco_matches_onnxruntime_with_resets(exports, name):
    """500 steps of 4 Hopper envs driven by the C actions; ORT steps the same obs and
    resets: actions agree within rtol 1e-4, atol 1e-5 at every step, end to end."""
    import gymnasium as gym

    _, directory = exports[name]
    batch = 4
    c_policy = CPolicy(directory, batch_size=batch)
    onnx_policy = OnnxPolicy(directory / "policy.onnx", batch_size=batch)
    envs = [gym.make("Hopper-v5") for _ in range(batch)]
    obs = np.stack([env.reset(seed=k)[0] for k, env in enumerate(envs)])
    episodes, worst = batch, 0.0
    for _ in range(500):
        action = c_policy.act(obs)
        reference = onnx_policy.act(obs)
        np.testing.assert_allclose(action, reference, rtol=1e-4, atol=1e-5)
        worst = max(worst, float(np.abs(action - reference).max()))
        done = np.zeros(batch, bool)
        for k, env in enumerate(envs):
            obs[k], _, terminated, truncated, _ = env.step(action[k])
            if terminated or truncated:
                obs[k], _ = env.reset()
                done[k], episodes = True, episodes + 1
        c_policy.reset(done)
        onnx_policy.reset(done)
    print(f"{name}: {episodes} episodes, max |C - ORT| {worst:.2e}")
    assert episodes > 2 * batch  # resets happened along the way


@pytest.mark.parametrize("name", ["ssm_compressed", "mlp"])
def test_parity_check_accepts_the_c_policy(exports, name):
    policy, directory = exports[name]
    report = check_parity(policy, CPolicy(directory, batch_size=2), "Hopper-v5", steps=300)
    assert report["episodes_started"] > 2


def test_in_place_state_update_equals_separate_buffers(exports, tmp_path):
    """The I/O harness calls policy_step(obs, state, action, state): same as two buffers."""
    _, directory = exports["ssm_compressed"]
    exe = build_io(directory, tmp_path)
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(50, 11)).astype(np.float32)
    resets = np.zeros(50, bool)
    resets[[0, 20, 21]] = True
    actions, states = run_io(exe, directory, obs, resets)
    c_policy = CPolicy(directory)
    for t in range(50):
        if resets[t]:
            c_policy.reset()
        np.testing.assert_array_equal(c_policy.act(obs[t]), actions[t])
        np.testing.assert_array_equal(c_policy.state[0], states[t])


def test_merged_graph_path_gives_the_same_c_step(tmp_path):
    policy = make_policy("Hopper-v5", seed=3, policy="ssm", state_dims=[6, 9])
    rng = np.random.default_rng(2)
    obs, state = rng.normal(size=(8, 11)), rng.normal(size=(8, 30))
    outputs = []
    for merged in (True, False):
        directory = write_sources(build_model(policy, merged=merged), tmp_path / str(merged))
        outputs.append(CPolicy(directory).run(obs, state))
    np.testing.assert_allclose(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outputs[0][1], outputs[1][1], rtol=1e-4, atol=1e-5)


def test_opset_17_erf_form_and_per_dimension_bounds(tmp_path):
    """Gelu written as Div/Erf/Add/Mul (opset 17) and Min/Max action bounds."""
    policy = make_policy("Hopper-v5", seed=4, policy="ssm", state_dims=[5, 5])
    with np.errstate(all="ignore"):
        policy.action_low[:] = policy.action_low.new_tensor([-1.0, -0.5, -0.2])
        policy.action_high[:] = policy.action_high.new_tensor([1.0, 0.3, 0.9])
    model = build_model(policy, opset=17, merged=False)
    ops = {node.op_type for node in model.graph.node}
    assert {"Erf", "Div", "Min", "Max"} <= ops
    directory = write_sources(model, tmp_path / "c")
    rng = np.random.default_rng(3)
    obs, state = rng.normal(0, 2, size=(32, 11)), rng.normal(size=(32, 20))
    got, got_state = CPolicy(directory).run(obs, state)
    want, want_state = OnnxPolicy(directory / "policy.onnx").run(obs, state)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_state, want_state, rtol=1e-4, atol=1e-5)
    assert (got == policy.action_high.numpy()).any() or (got == policy.action_low.numpy()).any()


def _one_op_model(op: str, n: int) -> onnx.ModelProto:
    """``action = op(obs)`` over ``n`` values, with the metadata a policy export carries."""
    graph = helper.make_graph(
        [helper.make_node(op, ["obs"], ["action"])],
        "one_op",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, [1, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    meta = dict(obs_dim=n, act_dim=n, state_size=0, layer_state_dims="[]", policy_type="test")
    helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    return model


@pytest.mark.parametrize("op", ["Gelu", "Tanh", "Erf"])
def test_vectorised_gelu_tanh_erf_against_float64(op, tmp_path):
    from scipy.special import erf

    x = np.concatenate([np.linspace(-12, 12, 4001), [-100.0, -1e-6, 0.0, 1e-6, 100.0]])
    directory = write_sources(_one_op_model(op, x.size), tmp_path)
    got = CPolicy(directory).run(x[None])[0][0].astype(np.float64)
    x32 = x.astype(np.float32).astype(np.float64)
    exact = {
        "Gelu": 0.5 * x32 * (1 + erf(x32 / np.sqrt(2))),
        "Tanh": np.tanh(x32),
        "Erf": erf(x32),
    }[op]
    error = np.abs(got - exact) / np.maximum(1.0, np.abs(exact))
    print(f"{op}: max error {error.max():.2e}")
    assert error.max() < 1e-6  # a few float32 ulps
    if op != "Gelu":  # odd functions keep their sign near 0
        assert np.all(np.sign(got) == np.sign(exact))


def test_unsupported_graph_is_refused_naming_the_node():
    model = _one_op_model("Softmax", 4)
    model.graph.node[0].name = "my_softmax"
    with pytest.raises(UnsupportedGraphError, match="my_softmax.*Softmax"):
        generate(model)
    with pytest.raises(ValueError, match="metadata"):
        del model.metadata_props[:]
        generate(model)


def test_missing_sources_and_failed_builds_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="--format c"):
        CPolicy(tmp_path)
    (tmp_path / "policy.c").write_text("int broken(void) { return x; }\n")
    (tmp_path / "policy.h").write_text("#define POLICY_OBS_DIM 1\n")
    with pytest.raises(ValueError, match="compressm-rl metadata"):
        CPolicy(tmp_path)
    with pytest.raises(ToolchainError, match="compiling"):
        compile_c(tmp_path, tmp_path / "lib.so", shared=True)
    with pytest.raises(ToolchainError, match="apt-get install no-such-cc"):
        find_tool("no-such-cc")


def test_bad_observations_are_rejected_before_the_c_step(exports):
    c_policy = CPolicy(exports["ssm_compressed"][1])
    before = c_policy.state
    with pytest.raises(ValueError, match="NaN or inf"), np.errstate(over="ignore"):
        c_policy.act(np.full(11, 1e300))  # finite in float64, inf in float32
    with pytest.raises(ValueError, match="shape"):
        c_policy.act(np.zeros(12))
    with pytest.raises(ValueError, match="state contains NaN"):
        c_policy.run(np.zeros((1, 11)), np.full((1, 64), np.nan))
    np.testing.assert_array_equal(c_policy.state, before)


# ----- an independent ONNX-to-C compiler as reference -----------------------------------
def test_emx_onnx_cgen_reference_agrees(tmp_path):
    """emmtrix's generic ONNX-to-C compiler, on the same graph, built with gcc."""
    pytest.importorskip("emx_onnx_cgen", reason="pip install emx-onnx-cgen (a dev dependency)")
    emx = shutil.which("emx-onnx-cgen") or str(Path(sys.executable).parent / "emx-onnx-cgen")
    policy = make_policy("Hopper-v5", seed=5, policy="ssm", state_dims=[6, 4])
    model = build_model(policy, "Hopper-v5", merged=False)
    directory = write_sources(model, tmp_path / "ours")
    ref = tmp_path / "emx"
    ref.mkdir()
    subprocess.run(
        [
            emx,
            "compile",
            "--input-dim",
            "batch=1",
            "--large-temp-threshold",
            "0",
            "--large-weight-threshold",
            "0",
            "--model-name",
            "emx_step",
            str(directory / "policy.onnx"),
            str(ref / "emx.c"),
        ],
        check=True,
        capture_output=True,
    )
    main = ref / "main.c"
    main.write_text(
        '#include <stdio.h>\n#include "emx.c"\nint main(void) {\n'
        "  float obs[1][11], state[1][20], action[1][3], out[1][20];\n"
        "  while (fread(obs, sizeof obs, 1, stdin) == 1 && fread(state, sizeof state, 1, stdin) == 1) {\n"
        "    emx_step(obs, state, action, out);\n"
        "    fwrite(action, sizeof action, 1, stdout); fwrite(out, sizeof out, 1, stdout);\n"
        "  }\n  return 0;\n}\n"
    )
    subprocess.run(["gcc", "-O2", "-std=c99", "-o", str(ref / "emx"), str(main), "-lm"], check=True)
    rng = np.random.default_rng(6)
    obs, state = rng.normal(0, 2, (64, 11)), rng.normal(size=(64, 20))
    records = np.concatenate([obs, state], axis=1).astype(np.float32)
    out = subprocess.run(
        [str(ref / "emx")], input=records.tobytes(), capture_output=True, check=True
    )
    reference = np.frombuffer(out.stdout, np.float32).reshape(64, 23)
    got, got_state = CPolicy(directory).run(obs, state)
    np.testing.assert_allclose(got, reference[:, :3], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_state, reference[:, 3:], rtol=1e-4, atol=1e-5)


# ----- other targets ------------------------------------------------------------------------
def test_aarch64_build_under_qemu_matches_x86(exports, tmp_path):
    require("aarch64-linux-gnu-gcc", "qemu-aarch64")
    _, directory = exports["ssm_compressed"]
    rng = np.random.default_rng(7)
    obs = rng.normal(0, 2, (300, 11)).astype(np.float32)
    resets = rng.random(300) < 0.02
    resets[0] = True
    arm = build_io(directory, tmp_path, cc="aarch64-linux-gnu-gcc", flags=AARCH64_FLAGS)
    arm_actions, arm_states = run_io(arm, directory, obs, resets, runner=["qemu-aarch64"])
    x86_actions, x86_states = run_io(build_io(directory, tmp_path), directory, obs, resets)
    np.testing.assert_allclose(arm_actions, x86_actions, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arm_states, x86_states, rtol=1e-4, atol=1e-5)
    print(f"aarch64 vs x86: max |Δaction| {np.abs(arm_actions - x86_actions).max():.2e}")


def test_cortex_m4_size_report(exports, tmp_path):
    require("arm-none-eabi-gcc", "arm-none-eabi-size")
    # gcc-arm-none-eabi installed without its recommended C library has no math.h.
    probe = tmp_path / "probe.c"
    probe.write_text("#include <math.h>\nfloat f(float x) { return sqrtf(x); }\n")
    compiled = subprocess.run(
        ["arm-none-eabi-gcc", "-c", str(probe), "-o", str(tmp_path / "probe.o")],
        capture_output=True,
    )
    if compiled.returncode != 0 and b"math.h" in compiled.stderr:
        pytest.skip(
            "arm-none-eabi-gcc has no C library headers: apt-get install libnewlib-arm-none-eabi"
        )
    sizes = {name: cortex_m4_size(exports[name][1]) for name in ("ssm_compressed", "mlp")}
    print(sizes)
    for name, size in sizes.items():
        weights = sum(
            np.prod(t.dims) * 4
            for t in onnx.load(exports[name][1] / "policy.onnx").graph.initializer
            if t.data_type == TensorProto.FLOAT
        )
        assert 0.9 * weights <= size["weights"] <= weights + 2048  # the weights, in flash
        assert 0 < size["code"] < 32_768 and size["ram"] == 0 and size["stack"] > 0
        assert "sqrtf" not in size["undefined"]  # one vsqrt.f32 with -fno-math-errno


def test_tempfile_builds_leave_no_files_beside_the_sources(exports):
    _, directory = exports["mlp"]
    before = sorted(p.name for p in directory.iterdir())
    CPolicy(directory)
    assert sorted(p.name for p in directory.iterdir()) == before
    assert not list(Path(tempfile.gettempdir()).glob("compressm-c-*/libpolicy.so"))


# ----- the commands -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, tiny_config):
    """A tiny real training run on Hopper-v5 and its post-training compression."""
    from compressm_rl.posthoc import compress_run
    from compressm_rl.train import train

    root = tmp_path_factory.mktemp("runs")
    train(tiny_config("Hopper-v5", total_steps=128, width=16), root / "full", progress=False)
    compress_run(root / "full", root / "small", state_dims=[4, 3])
    return root / "full", root / "small"


@pytest.mark.parametrize("which", ["full", "small"])
def test_export_c_command_then_eval_equals_onnx(trained_runs, which, tmp_path, capsys):
    from compressm_rl.cli import main

    run = trained_runs[which == "small"]
    out = tmp_path / "policy_c"
    assert (
        main(["export", str(run), "--format", "c", "--out", str(out), "--parity-steps", "200"]) == 0
    )
    assert "parity ok" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "policy.c",
        "policy.h",
        "policy.onnx",
    ]
    assert "policy_step(obs, state, action, state)" in (out / "README.md").read_text()
    onnx_path = tmp_path / "policy.onnx"
    assert main(["export", str(run), "--out", str(onnx_path), "--parity-steps", "0"]) == 0
    capsys.readouterr()
    results = []
    for target in (out, out / "policy.c", onnx_path):
        assert main(["eval", str(target), "--episodes", "3", "--seed", "7", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    np.testing.assert_allclose(results[0]["returns"], results[2]["returns"], rtol=1e-3)
    if which == "small":
        assert CPolicy(out).layer_state_dims == [4, 3]


def test_export_c_refuses_an_unrelated_directory_before_writing(trained_runs, tmp_path, capsys):
    from compressm_rl.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    argv = ["export", str(trained_runs[0]), "--format", "c", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "not a previous export" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert main([*argv[:-1], str(tmp_path / "c"), "--opset", "17"]) == 2  # ONNX-only option
    assert not (tmp_path / "c").exists()


def test_failed_c_parity_keeps_the_previous_export(trained_runs, tmp_path, monkeypatch, capsys):
    import compressm_rl.deploy as deploy
    from compressm_rl.cli import main

    out = tmp_path / "policy_c"
    argv = [
        "export",
        str(trained_runs[0]),
        "--format",
        "c",
        "--out",
        str(out),
        "--parity-steps",
        "50",
    ]
    assert main(argv) == 0
    before = (out / "policy.c").read_text()
    other = make_policy("Hopper-v5", seed=12, policy="ssm", state_dims=[12, 12])
    real = deploy.build_model
    monkeypatch.setattr(deploy, "build_model", lambda p, *a, **k: real(other, *a, **k))
    capsys.readouterr()
    assert main(argv) == 1
    assert "does not match" in capsys.readouterr().err
    assert (out / "policy.c").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy_c"]  # no temporaries left


def test_bench_command_times_c_inside_c(exports, tmp_path):
    from compressm_rl.cli import main

    _, directory = exports["ssm_compressed"]
    argv = ["bench", str(directory / "policy.onnx"), str(directory), "--steps", "300"]
    assert main([*argv, "--warmup", "10", "--json", str(tmp_path / "b.json")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    c_row = rows[f"C {directory.name}"]
    assert c_row["kind"] == "c" and c_row["steps"] == 300 and c_row["state_dims"] == [25, 7]
    assert "C clock floor (clock_gettime pair)" in rows
    assert 0 < c_row["p50_us"] < rows["policy.onnx"]["p50_us"]  # below ORT's per-call floor


def test_a_prebuilt_shared_library_is_loaded_as_is(exports, tmp_path):
    """`compressm-rl eval DIR/libpolicy.so`: the library a user built, its policy.c beside it."""
    from compressm_rl.runs import load_controller

    _, directory = exports["mlp"]
    copy = shutil.copytree(directory, tmp_path / "c")
    library = compile_c(copy, copy / "libpolicy.so", shared=True)
    controller, env_id = load_controller(library)
    assert env_id == "Hopper-v5" and isinstance(controller, CPolicy)
    obs = np.random.default_rng(8).normal(size=(5, 11))
    np.testing.assert_array_equal(controller.run(obs)[0], CPolicy(copy).run(obs)[0])
