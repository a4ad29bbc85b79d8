"""C export: generated sources, gcc builds, parity with onnxruntime in MuJoCo, an
independent ONNX-to-C reference, aarch64 under qemu, Cortex-M4 sizes. Real compilers,
real sessions, real physics; tools that are missing skip with the package to install."""

from __future__ import annotations

import json
import os
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
    CORTEX_M4_FLAGS,
    HOST_FLAGS,
    NATIVE_FLAGS,
    PACKAGES,
    ToolchainError,
    build_io,
    compile_c,
    cortex_m4_size,
    find_tool,
    run_io,
)
from export.c_codegen import C_LIBRARY_SYMBOLS, UnsupportedGraphError, generate
from export.c_runtime import CPolicy
from export.onnx_export import build_model
from export.parity import check_parity
from export.runtime import (
    STATUS_NONFINITE_INPUT,
    STATUS_NONFINITE_RESULT,
    STATUS_OK,
    OnnxPolicy,
)

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
    assert defines == {
        "POLICY_OBS_DIM": "11",
        "POLICY_ACTION_DIM": "3",
        "POLICY_STATE_DIM": "64",
        "POLICY_OK": str(STATUS_OK),
        "POLICY_NONFINITE_INPUT": str(STATUS_NONFINITE_INPUT),
        "POLICY_NONFINITE_RESULT": str(STATUS_NONFINITE_RESULT),
    }
    code = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    declarations = [line for line in code.splitlines() if "(" in line and line.strip()]
    assert declarations == [
        "int policy_step(const float *obs, const float *state, float *action, float *state_out);"
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
    assert undefined <= set(C_LIBRARY_SYMBOLS), undefined  # no malloc, no libm beyond


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
    assert error.max() < STATED_ERROR[op]  # a few float32 ulps (GELU: 1 + erf cancels)
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
    with pytest.raises(ToolchainError, match="compiling") as failed:
        compile_c(tmp_path, tmp_path / "lib.so", shared=True)
    # One line: the file, and the compiler's first error line; the rest kept aside.
    message = str(failed.value)
    assert "\n" not in message and str(tmp_path / "policy.c") in message
    assert re.search(r"policy\.c:1:\d+: error: .x. undeclared", message), message
    assert failed.value.returncode != 0 and "error" in failed.value.stderr
    with pytest.raises(ToolchainError, match="apt-get install no-such-cc"):
        find_tool("no-such-cc")


def test_an_export_that_does_not_compile_fails_in_one_line(exports, tmp_path, capsys):
    """`eval`/`bench` of a C directory whose policy.c is broken: ToolchainError, one line
    naming the file and the compiler's first error; `python -m export.bench` reports it."""
    from export.bench import main as bench_main

    directory = Path(shutil.copytree(exports["mlp"][1], tmp_path / "c"))
    with (directory / "policy.c").open("a") as source:
        source.write("\nint broken(void) { return undeclared_thing; }\n")
    with pytest.raises(ToolchainError) as failed:
        CPolicy(directory)
    message = str(failed.value)
    assert "\n" not in message, message
    assert str(directory / "policy.c") in message and "undeclared_thing" in message
    assert bench_main([str(directory), "--steps", "10", "--warmup", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: compiling") and err.count("\n") == 1, err


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


# ----- non-finite input: the C step's contract, the same in both Python wrappers ---------
@pytest.fixture(scope="module")
def libraries(exports, tmp_path_factory):
    """name -> a shared library built once from a copy of that export (loaded as is by
    CPolicy, its policy.c and policy.onnx beside it), for the MLP and compressed SSM."""
    out = tmp_path_factory.mktemp("built")
    result = {}
    for name in ("ssm_compressed", "mlp"):
        copy = Path(shutil.copytree(exports[name][1], out / name))
        result[name] = compile_c(copy, copy / "libpolicy.so", shared=True)
    return result


def _wrappers(library: Path, **kwargs) -> dict:
    """The C step and ORT (through IOBinding and through session.run) on one export."""
    onnx_path = library.parent / "policy.onnx"
    return {
        "C": CPolicy(library, **kwargs),
        "ORT": OnnxPolicy(onnx_path, **kwargs),
        "ORT run()": OnnxPolicy(onnx_path, io_binding=False, **kwargs),
    }


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["obs", "state"])
@pytest.mark.parametrize("name", ["ssm_compressed", "mlp"])
def test_non_finite_input_gives_the_safe_action_and_a_zero_state(
    exports, libraries, name, where, value
):
    """NaN/±inf in obs or state: the C step returns POLICY_NONFINITE_INPUT with the safe
    action (0 clipped into the bounds) and a zero state; both wrappers do the same with
    validate=False, and raise with validate=True keeping their state."""
    policy, library = exports[name][0], libraries[name]
    if where == "state" and policy.policy_type == "mlp":
        pytest.skip("an MLP has no state")
    wrappers = _wrappers(library, validate=False)
    c_policy = wrappers["C"]
    low, high = policy.action_low.numpy(), policy.action_high.numpy()
    safe = np.clip(np.zeros_like(low), low, high).astype(np.float32)
    rng = np.random.default_rng(11)
    obs = rng.normal(size=(4, c_policy.obs_dim)).astype(np.float32)
    state = rng.normal(size=(4, c_policy.state_size)).astype(np.float32)
    (obs if where == "obs" else state)[1, 2] = value
    results = {}
    for label, wrapper in wrappers.items():
        action, state_out = wrapper.run(obs, state)
        np.testing.assert_array_equal(action[1], safe, err_msg=label)
        np.testing.assert_array_equal(state_out[1], 0.0, err_msg=label)
        assert np.isfinite(action).all() and np.isfinite(state_out).all(), label
        np.testing.assert_array_equal(wrapper.last_status, [0, STATUS_NONFINITE_INPUT, 0, 0])
        np.testing.assert_array_equal(wrapper.safe_action, safe)
        results[label] = action, state_out
    for label in ("ORT", "ORT run()"):  # the good rows are the policy's own
        np.testing.assert_allclose(results[label][0], results["C"][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(results[label][1], results["C"][1], rtol=1e-4, atol=1e-5)

    # The C function itself returns the code (what a C caller sees), in place too.
    row_obs, row_state = obs[1].copy(), state[1].copy()
    action = np.full(c_policy.act_dim, np.nan, np.float32)
    status = c_policy._step(
        row_obs.ctypes.data,
        row_state.ctypes.data if row_state.size else None,
        action.ctypes.data,
        row_state.ctypes.data if row_state.size else None,
    )
    assert status == STATUS_NONFINITE_INPUT
    np.testing.assert_array_equal(action, safe)
    np.testing.assert_array_equal(row_state, 0.0)

    # act(): the bad episode restarts from a zero state, as if reset; the others go on.
    if where == "obs":
        reference = CPolicy(library)  # validate=True: only finite inputs reach it
        for label, wrapper in _wrappers(library, validate=False, batch_size=4).items():
            wrapper.act(obs[[0, 0, 0, 0]])
            start = wrapper.state
            action = wrapper.act(obs)
            np.testing.assert_array_equal(wrapper.last_status, [0, 1, 0, 0])
            np.testing.assert_array_equal(action[1], safe, err_msg=label)
            _, want = reference.run(np.where(np.isfinite(obs), obs, 0.0), start)
            want[1] = 0.0  # an episode start
            np.testing.assert_allclose(wrapper.state, want, rtol=1e-4, atol=1e-5)
            following = rng.normal(size=(4, c_policy.obs_dim))
            np.testing.assert_allclose(
                wrapper.act(following), reference.run(following, want)[0], rtol=1e-4, atol=1e-5
            )
            np.testing.assert_array_equal(wrapper.last_status, 0)

    # validate=True (the default): a ValueError, the held state untouched.
    for label, wrapper in _wrappers(library).items():
        wrapper.act(rng.normal(size=c_policy.obs_dim))
        before = wrapper.state
        with pytest.raises(ValueError, match=f"{where} contains NaN or inf"):
            if where == "obs":
                wrapper.act(obs[1])
            else:
                wrapper.run(obs[1:2], state[1:2])
        np.testing.assert_array_equal(wrapper.state, before, err_msg=label)


@pytest.mark.parametrize("value", [1e30, -1e30, 3e38])
@pytest.mark.parametrize("where", ["obs", "state"])
def test_huge_finite_input_gives_finite_bounded_outputs(exports, libraries, where, value):
    """1e30 is finite: stepped as any value. The normaliser clips it in obs; in the state
    it may overflow (3e38: the LayerNorm's variance is inf), and then the step returns
    POLICY_NONFINITE_RESULT with the safe outputs, in C and ORT alike. Either way the
    action is finite and within the bounds and the new state is finite."""
    policy, library = exports["ssm_compressed"][0], libraries["ssm_compressed"]
    low, high = policy.action_low.numpy(), policy.action_high.numpy()
    rng = np.random.default_rng(12)
    obs = rng.normal(size=(3, 11)).astype(np.float32)
    state = rng.normal(size=(3, 64)).astype(np.float32)
    (obs if where == "obs" else state)[1] = value  # the whole row
    statuses = {}
    for label, wrapper in _wrappers(library, validate=False).items():
        action, state_out = wrapper.run(obs, state)
        assert np.isfinite(action).all() and np.isfinite(state_out).all(), label
        assert (action >= low).all() and (action <= high).all(), label
        statuses[label] = wrapper.last_status.tolist()
        if wrapper.last_status[1] == STATUS_NONFINITE_RESULT:
            np.testing.assert_array_equal(action[1], wrapper.safe_action)
            np.testing.assert_array_equal(state_out[1], 0.0)
    assert len({str(s) for s in statuses.values()}) == 1, statuses  # C and ORT agree
    expected = STATUS_NONFINITE_RESULT if (where, value) == ("state", 3e38) else STATUS_OK
    assert statuses["C"] == [0, expected, 0], statuses
    for wrapper in _wrappers(library).values():  # validate=True
        if expected == STATUS_OK:
            wrapper.run(obs, state)
        else:
            with pytest.raises(ValueError, match="not finite .* although its inputs are"):
                wrapper.run(obs, state)


def test_nan_in_exp_and_erf_is_defined_and_propagates(tmp_path):
    """cm_exp_nonpositive converted NaN to int32_t (undefined behaviour); UBSan's
    float-cast-overflow check aborts on it. NaN still gives NaN; erf stays in [-1, 1]."""
    directory = write_sources(_one_op_model("Tanh", 1), tmp_path / "c")
    main = tmp_path / "main.c"
    main.write_text(
        '#include <stdio.h>\n#include "policy.c"\n'
        "int main(void) {\n"
        "    const float x[6] = {NAN, -NAN, INFINITY, -INFINITY, 1e30f, -1e30f};\n"
        "    for (int i = 0; i < 6; ++i)\n"
        '        printf("%g %g %g %g\\n", (double)cm_tanh(x[i]), (double)cm_gelu(x[i]),\n'
        "               (double)cm_erf(x[i]), (double)cm_exp_nonpositive(x[i]));\n"
        "    return 0;\n}\n"
    )
    exe = tmp_path / "nan_check"
    sanitize = ["-fsanitize=float-cast-overflow,undefined", "-fno-sanitize-recover=all"]
    subprocess.run(
        ["gcc", *C_STANDARD, "-O0", *sanitize, "-I", str(directory), str(main), "-o", str(exe)]
        + ["-lm"],
        check=True,
        capture_output=True,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and "runtime error" not in run.stderr, run.stderr
    rows = [[float(v) for v in line.split()] for line in run.stdout.splitlines()]
    tanh, gelu, erf, exp = np.array(rows).T
    assert np.isnan(tanh[:2]).all() and np.isnan(gelu[:2]).all() and np.isnan(erf[:2]).all()
    assert np.isnan(exp[:2]).all()
    np.testing.assert_array_equal(tanh[2:], [1, -1, 1, -1])
    np.testing.assert_array_equal(erf[2:], [1, -1, 1, -1])


# ----- accuracy of the elementwise functions: every float32 near the trouble, and a grid --
STATED_ERROR = {"Gelu": 1.3e-6, "Erf": 5e-7, "Tanh": 1e-7}  # as export/c_codegen.py states
FUNCTION_HARNESS = r"""#include <stdio.h>
#include "policy.c"
int main(void)
{
    float x;
    while (fread(&x, sizeof x, 1, stdin) == 1) {
        const float y[3] = {cm_gelu(x), cm_erf(x), cm_tanh(x)};
        fwrite(y, sizeof y, 1, stdout);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def function_grid():
    """x (float32): a grid over [-12, 12] at 1e-5, every float32 with |x| in [5.2, 5.7]
    (where GELU went positive) and in [3.99, 4.0] (erf's clamp), and a few specials; with
    float64 GELU, erf and tanh of each, from math.erf."""
    import math

    def every_float(lo: float, hi: float) -> np.ndarray:
        bits = np.arange(np.float32(lo).view(np.int32), np.float32(hi).view(np.int32) + 1)
        return bits.astype(np.int32).view(np.float32)

    band = np.concatenate([every_float(5.2, 5.7), every_float(3.99, 4.0)])
    specials = np.float32([0.0, -0.0, 1e-30, -1e-30, 4.0, -4.0, 3.999, -3.999, 100, -100])
    x = np.concatenate([np.linspace(-12, 12, 2_400_001, dtype=np.float32), band, -band, specials])
    x64 = x.astype(np.float64)
    erf = np.frompyfunc(math.erf, 1, 1)
    reference = {
        "Gelu": 0.5 * x64 * (1.0 + erf(x64 / math.sqrt(2.0)).astype(np.float64)),
        "Erf": erf(x64).astype(np.float64),
        "Tanh": np.tanh(x64),
    }
    return x, reference


def _function_builds() -> list:
    builds = [pytest.param("gcc", HOST_FLAGS, None, id="portable")]
    builds.append(pytest.param("gcc", [*HOST_FLAGS, "-mfma"], None, id="x86-fma"))
    builds.append(
        pytest.param("aarch64-linux-gnu-gcc", [*AARCH64_FLAGS], ["qemu-aarch64"], id="aarch64-qemu")
    )
    return builds


@pytest.mark.parametrize(("cc", "flags", "runner"), _function_builds())
def test_gelu_erf_tanh_within_the_stated_error_on_a_dense_grid(
    function_grid, cc, flags, runner, tmp_path
):
    """The generated cm_gelu/cm_erf/cm_tanh against float64 math.erf/tanh: within the error
    the code states, erf and tanh within [-1, 1], GELU never positive for x < 0 (it was,
    up to +1e-6, for x in [-5.66, -5.21] when erf overshot 1 with FMA)."""
    require(cc, *(runner or []))
    if "-mfma" in flags:
        cpu = Path("/proc/cpuinfo")
        if sys.platform != "linux" or " fma" not in (cpu.read_text() if cpu.exists() else ""):
            pytest.skip("needs an x86-64 CPU with FMA")
    directory = write_sources(_one_op_model("Gelu", 1), tmp_path / "c")
    main = tmp_path / "main.c"
    main.write_text(FUNCTION_HARNESS)
    exe = tmp_path / "functions"
    command = [cc, *C_STANDARD, *flags, "-I", str(directory), str(main), "-o", str(exe), "-lm"]
    subprocess.run(command, check=True, capture_output=True)
    x, reference = function_grid
    out = subprocess.run([*(runner or []), str(exe)], input=x.tobytes(), capture_output=True)
    assert out.returncode == 0, out.stderr
    got = np.frombuffer(out.stdout, np.float32).reshape(-1, 3).astype(np.float64)
    for k, op in enumerate(("Gelu", "Erf", "Tanh")):
        exact = reference[op]
        error = np.abs(got[:, k] - exact) / np.maximum(1.0, np.abs(exact))
        worst = int(error.argmax())
        print(f"{op}: max error {error[worst]:.3e} at x = {x[worst]!r}")
        assert error[worst] < STATED_ERROR[op], (op, x[worst], got[worst, k], exact[worst])
    gelu, erf, tanh = got.T
    assert gelu[x < 0].max() <= 0.0, x[x < 0][gelu[x < 0].argmax()]
    assert np.abs(erf).max() <= 1.0 and np.abs(tanh).max() <= 1.0


# ----- strings from the model reach the C only as inert comment text ----------------------
def _payloads(marker: Path) -> dict[str, str]:
    """env ids that try to end the comment they are pasted into and define a constructor
    that creates ``marker`` when the library is loaded (no quotes or backslashes in the
    code: the path is a char array)."""
    path = ",".join(str(b) for b in str(marker).encode()) + ",0"
    code = (
        "extern int creat(const char *, unsigned);\n"
        "__attribute__((constructor)) static void compressm_pwned(void) "
        f"{{ static const char p[] = {{{path}}}; creat(p, 420u); }}\n"
    )
    once = f"#ifndef COMPRESSM_PWNED\n#define COMPRESSM_PWNED\n{code}#endif\n"
    return {
        # `*` backslash-newline `/` ends a comment after line splicing; in the JSON line
        # the same text reads `*\\\n/`, which ends nothing, so the code runs once.
        "splice": f"x *\\\n/\n{once}/\\\n*",
        "trigraph": f"x *??/\n/\n{once}/??/\n*",
        "plain": "x */ " + code.replace("\n", " ") + " /*",
        "newline": f"x */\n{once}/*",
        "line comment": f"x */ // \\\n{code} /*",
    }


@pytest.mark.parametrize("variant", ["splice", "trigraph", "plain", "newline", "line comment"])
def test_metadata_strings_cannot_inject_code(variant, tmp_path):
    """An env id crafted to close the C comment it is written into ("splice" defined a
    constructor that ran when CPolicy loaded the library), then the same text in every
    string that reaches the sources: it stays text. The export compiles (-Werror), loading
    it runs nothing, the preprocessed C has none of it, the metadata reads back exactly."""
    marker = tmp_path / "marker"
    payload = _payloads(marker)[variant]
    plain_readme = generate(_one_op_model("Tanh", 4)).readme
    for everywhere in (False, True):
        model = _one_op_model("Tanh", 4)
        props = {p.key: p.value for p in model.metadata_props}
        helper.set_model_props(
            model, {**props, "env_id": payload, **({"note": payload} if everywhere else {})}
        )
        names = dict(onnx_name=payload, dir_name=payload) if everywhere else {}
        sources = generate(model, **names)
        directory = tmp_path / f"c{everywhere}"
        directory.mkdir()
        (directory / "policy.c").write_text(sources.source)
        (directory / "policy.h").write_text(sources.header)
        c_policy = CPolicy(directory)  # compiles with -Wall -Wextra -Werror, then loads
        assert not marker.exists(), "the payload ran"
        assert c_policy.env_id == payload
        preprocessed = subprocess.run(
            ["gcc", "-std=c99", "-E", "-P", "-I", str(directory), str(directory / "policy.c")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "compressm_pwned" not in preprocessed and "creat" not in preprocessed
        for text in (sources.source, sources.header):
            comments = re.findall(r"/\*.*?\*/", text, flags=re.S)
            assert not any("??" in c or "\\\n" in c for c in comments)
        # The README's lines stay the README's: the payload adds none.
        assert sources.readme.count("\n") == plain_readme.count("\n")
    assert c_policy.metadata["note"] == payload


# ----- non-finite weights --------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf, 1e39])
def test_non_finite_weights_are_refused_at_export(exports, value):
    model = onnx.load(exports["mlp"][1] / "policy.onnx")
    tensor = next(t for t in model.graph.initializer if t.dims and np.prod(t.dims) > 4)
    weights = onnx.numpy_helper.to_array(tensor).astype(np.float64)
    weights.flat[3] = value
    tensor.CopyFrom(onnx.numpy_helper.from_array(weights, tensor.name))
    with pytest.raises(ValueError, match=rf"weight tensor '{re.escape(tensor.name)}'.*non-finite"):
        generate(model)


@pytest.mark.parametrize("literal", ["NAN", "INFINITY", "0.0f / 0.0f", "0x1p+128f", "1e39f"])
def test_non_finite_weights_are_refused_at_load(exports, tmp_path, literal):
    """A policy.c whose weights were edited to NaN or inf: CPolicy refuses it, naming the
    array (it compiled, and evaluated to NaN actions, before)."""
    directory = Path(shutil.copytree(exports["mlp"][1], tmp_path / "c"))
    source = (directory / "policy.c").read_text()
    array = re.search(r"static const float (w\d+_\w+)\[\d+\] = \{\n    ([^,]+),", source)
    start = array.start(2)
    edited = source[:start] + literal + source[array.end(2) :]
    (directory / "policy.c").write_text(edited)
    with pytest.raises(ValueError, match=rf"{array.group(1)} element 0 .*not a finite"):
        CPolicy(directory)


# ----- builds: portable by default, the C library symbols as listed -----------------------
def _documented_host_build(readme: str) -> list[str]:
    """The README's (first) gcc command line, as a list of arguments."""
    match = re.search(r"`(gcc [^`]*)`", readme)
    assert match, "the README documents no gcc build"
    return match.group(1).split()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64"
)
def test_documented_and_default_builds_are_portable(exports, tmp_path):
    """The README's build, CPolicy's and the benchmark's: no -march=native, so no FMA/AVX
    instruction that a CPU of the same architecture may lack (SIGILL)."""
    from export.bench import bench_c_export

    require("objdump")
    _, directory = exports["ssm_compressed"]
    readme = generate(onnx.load(directory / "policy.onnx")).readme
    command = _documented_host_build(readme)
    assert not any(flag.startswith(("-march", "-mtune", "-mcpu")) for flag in command)
    assert "-march=native" not in HOST_FLAGS and "-march=native" in NATIVE_FLAGS
    obj = tmp_path / "policy.o"  # the command as documented, run in the export directory
    subprocess.run([*command, "-o", str(obj)], check=True, cwd=directory, capture_output=True)
    library = compile_c(directory, tmp_path / "libpolicy.so", shared=True)  # CPolicy's
    native = compile_c(directory, tmp_path / "native.so", shared=True, flags=NATIVE_FLAGS)
    beyond_baseline = re.compile(r"\bvfn?m(add|sub)|%[yz]mm\d|\bv(add|mul|sub|max|min)[ps]s")
    for built in (obj, library):
        listing = subprocess.run(
            ["objdump", "-d", str(built)], check=True, capture_output=True, text=True
        ).stdout
        assert not beyond_baseline.search(listing), beyond_baseline.search(listing)
    row, _ = bench_c_export(directory, steps=10, warmup=1)
    assert row["c_flags"] == " ".join(HOST_FLAGS)
    assert native.is_file()  # the opt-in still builds


def _undefined(cc: str, flags: list[str], directory: Path, out: Path) -> set[str] | None:
    """The undefined symbols of policy.c built by ``cc`` (None: no C library headers)."""
    nm = {"gcc": "nm"}.get(cc, cc.replace("gcc", "nm"))
    require(cc, nm)
    command = [cc, *C_STANDARD, *flags, "-c", str(directory / "policy.c"), "-o", str(out)]
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode != 0 and "math.h" in built.stderr:  # arm-none-eabi without newlib
        return None
    assert built.returncode == 0, built.stderr
    listing = subprocess.run([nm, "-u", str(out)], check=True, capture_output=True, text=True)
    return {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}


def test_c_library_symbols_listed_match_nm(exports, tmp_path):
    """The README and header list what policy.c may call from the C library: `nm -u` of an
    object that keeps every call (-O0 -fno-builtin, inline helpers kept) is exactly that
    list, and every other build's undefined symbols are within it."""
    _, directory = exports["ssm_compressed"]
    sources = generate(onnx.load(directory / "policy.onnx"))
    for symbol in C_LIBRARY_SYMBOLS:
        assert f"`{symbol}`" in sources.readme and symbol in sources.header
    everything = _undefined(
        "gcc", ["-O0", "-fno-builtin", "-fkeep-inline-functions"], directory, tmp_path / "a.o"
    )
    assert everything == set(C_LIBRARY_SYMBOLS)
    builds = [
        ("gcc", ["-O0"]),
        ("gcc", ["-Os"]),
        ("gcc", HOST_FLAGS),
        ("gcc", NATIVE_FLAGS),
        ("aarch64-linux-gnu-gcc", ["-O0"]),
        ("aarch64-linux-gnu-gcc", [f for f in AARCH64_FLAGS if f != "-static"]),
        ("arm-none-eabi-gcc", [f for f in CORTEX_M4_FLAGS if f != "-fno-math-errno"]),
    ]
    for k, (cc, flags) in enumerate(builds):
        if shutil.which(cc) is None:
            continue
        undefined = _undefined(cc, flags, directory, tmp_path / f"{k}.o")
        assert undefined is None or undefined <= set(C_LIBRARY_SYMBOLS), (cc, flags, undefined)


# ----- shared libraries: the path given, nothing else --------------------------------------
def test_a_shared_library_is_loaded_from_the_path_given_only(exports, tmp_path, monkeypatch):
    """`eval libpolicy.so` in the export directory loads ./libpolicy.so (a bare name made
    absolute); a name with no such file is an error, never a library found on the dynamic
    loader's search path (a bare `libz.so` loaded the system's zlib)."""
    directory = Path(shutil.copytree(exports["mlp"][1], tmp_path / "c"))
    compile_c(directory, directory / "libpolicy.so", shared=True)
    monkeypatch.chdir(directory)
    c_policy = CPolicy("libpolicy.so")
    obs = np.random.default_rng(13).normal(size=(3, 11))
    np.testing.assert_array_equal(c_policy.run(obs)[0], CPolicy(directory).run(obs)[0])
    for name in ("libz.so", "libc.so", "libm.so", "libpthread.so"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(directory / name))):
            CPolicy(name)


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
        "Makefile",
        "README.md",
        "bench.c",
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
