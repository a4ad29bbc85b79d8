"""ONNX export, onnxruntime policy, parity, benchmark CLI: real sessions, real MuJoCo."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnx
import pytest
import torch

from export.bench import _IDENTITY_MODEL
from export.onnx_export import build_model, ort_folds, to_onnx
from export.parity import ParityError, check_parity
from export.runtime import OnnxPolicy
from policies.actor_critic import ActorCritic

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {
    "ssm_full": dict(policy="ssm", state_dims=[128, 128]),
    "ssm_compressed": dict(policy="ssm", state_dims=[37, 5]),
    "mlp": dict(policy="mlp"),
}


def make_policy(env_id: str, seed: int, stress: bool = False, **kwargs) -> ActorCritic:
    """A random policy for ``env_id`` with non-trivial obs statistics, log-std and head.

    ``stress``: eigenvalues at the |λ| clamp and real ones (θ = 0, π), as balanced truncation
    can produce.
    """
    torch.manual_seed(seed)
    env = gym.make(env_id)
    space = env.action_space
    space.seed(seed)  # env.reset(seed=...) does not seed the action space
    policy = ActorCritic(
        env.observation_space.shape[0], space.shape[0], space.low, space.high, width=64, **kwargs
    )
    # Statistics of real observations, then perturbed: the normaliser matters in the graph.
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    seen = [obs]
    for _ in range(300):
        obs, _, terminated, truncated, _ = env.step(space.sample())
        seen.append(obs)
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    with torch.no_grad():
        policy.obs_norm.update(torch.as_tensor(np.array(seen)))
        policy.obs_norm.mean += torch.as_tensor(rng.normal(0, 0.1, policy.obs_dim))
        policy.obs_norm.var *= torch.as_tensor(rng.uniform(0.5, 2.0, policy.obs_dim))
        policy.log_std.copy_(torch.as_tensor(rng.normal(-0.5, 0.3, policy.act_dim)))
        # A gain-1 head instead of 0.01: actions of order 1, some clamped at the bounds.
        torch.nn.init.orthogonal_(policy.actor_head.weight, gain=1.5)
        policy.actor_head.bias.normal_(0, 0.3)
        if stress:
            for block in policy.actor.blocks:
                block.lru.nu_log[:3] = -30.0  # |λ| = MAX_RADIUS
                block.lru.theta[:2] = torch.tensor([0.0, math.pi])[: block.lru.state_dim]
    return policy


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (torch policy, .onnx path) for Hopper-v5."""
    out = tmp_path_factory.mktemp("onnx")
    result = {}
    for i, (name, kwargs) in enumerate(POLICIES.items()):
        policy = make_policy("Hopper-v5", seed=i, stress=name == "ssm_compressed", **kwargs)
        path = to_onnx(policy, out / f"{name}.onnx", env_id="Hopper-v5", training_steps=1000 + i)
        result[name] = (policy, path)
    return result


# ----- parity ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", list(POLICIES))
def test_closed_loop_parity_with_resets(exported, name, batch):
    policy, path = exported[name]
    report = check_parity(policy, path, "Hopper-v5", steps=500, batch=batch, seed=batch)
    print(f"{name} batch {batch}: {report}")
    assert report["episodes_started"] > 2 * batch  # resets happened mid-rollout
    # Actions and states are enforced step by step against float64 (tests/test_parity.py);
    # float32 rounding uses a small part of the tolerance, whatever |λ|.
    assert report["max_tolerance_used"] < 0.5 and report["max_torch_tolerance_used"] < 0.5


def test_long_episode_parity_without_resets(tmp_path):
    """HalfCheetah never terminates: 500 steps of one episode, state carried throughout."""
    policy = make_policy("HalfCheetah-v5", seed=7, policy="ssm", state_dims=[64, 16])
    path = to_onnx(policy, tmp_path / "cheetah.onnx", env_id="HalfCheetah-v5")
    report = check_parity(policy, path, "HalfCheetah-v5", steps=500, batch=2)
    print(report)
    assert report["episodes_started"] == 2


def test_parity_error_on_a_different_policy(exported):
    policy, path = exported["ssm_compressed"]
    other = make_policy("Hopper-v5", seed=1, **POLICIES["ssm_compressed"])
    with pytest.raises(ParityError, match="action mismatch at step 0"):
        check_parity(other, path, "Hopper-v5", steps=20)


@pytest.mark.parametrize("name", list(POLICIES))
def test_one_step_from_random_state_matches_torch(exported, name):
    """Arbitrary (non-zero) states, several rows: checks the state layout and the split."""
    policy, path = exported[name]
    rng = np.random.default_rng(0)
    obs = rng.normal(0, 2, (5, policy.obs_dim)).astype(np.float32)
    state = rng.normal(0, 1, (5, policy.actor.state_size)).astype(np.float32)
    action, state_out = OnnxPolicy(path).run(obs, state)
    with torch.no_grad():
        features, ref_state = policy.actor.step(
            policy.obs_norm(torch.as_tensor(obs)), torch.as_tensor(state)
        )
        ref = torch.clamp(policy.actor_head(features), policy.action_low, policy.action_high)
    np.testing.assert_allclose(action, ref.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state_out, ref_state.numpy(), rtol=1e-4, atol=1e-5)


def test_opset_17_gelu_decomposition_matches(exported, tmp_path):
    policy, default_path = exported["ssm_full"]
    path = to_onnx(policy, tmp_path / "opset17.onnx", opset=17)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert [o.version for o in model.opset_import if o.domain == ""] == [17]
    assert "Erf" in ops and "Gelu" not in ops  # the decomposition is what is checked below
    assert "Gelu" in {n.op_type for n in onnx.load(str(default_path)).graph.node}

    report = check_parity(policy, path, "Hopper-v5", steps=100)
    # The reported max errors are the rollout's (deterministic): the same rollout passes
    # with atol = the largest and reports them again. (Below it the per-step allowance
    # still holds the normaliser's rounding; test_parity.py breaks graphs on purpose.)
    keys = ["max_abs_err", "max_state_abs_err", "max_torch_abs_err", "max_torch_state_abs_err"]
    err = max(report[k] for k in keys)
    assert report["max_abs_err"] > 0, "bit-identical to float64: the checks below are vacuous"
    tight = check_parity(policy, path, "Hopper-v5", steps=100, rtol=0.0, atol=err)
    assert [tight[k] for k in keys] == [report[k] for k in keys]


@pytest.mark.parametrize("state_dims", [[9], [12, 3, 7]])
def test_merged_and_elementwise_graph_paths_agree(tmp_path, state_dims):
    policy = make_policy("Hopper-v5", seed=4, stress=True, policy="ssm", state_dims=state_dims)
    runs = {}
    for merged in (True, False):
        model = build_model(policy, merged=merged)
        path = tmp_path / f"merged_{merged}.onnx"
        onnx.save_model(model, str(path))
        onnx_policy = OnnxPolicy(path)
        obs = np.random.default_rng(0).standard_normal((200, 11)).astype(np.float32)
        runs[merged] = (len(model.graph.node), np.stack([onnx_policy.act(o) for o in obs]))
    (nodes_merged, merged), (nodes_elementwise, elementwise) = runs[True], runs[False]
    assert nodes_merged < nodes_elementwise
    np.testing.assert_allclose(merged, elementwise, rtol=1e-4, atol=1e-5)


def test_per_dimension_action_bounds(tmp_path):
    policy = make_policy("Hopper-v5", seed=3, **POLICIES["mlp"])
    policy.action_low.copy_(torch.tensor([-1.0, -0.2, -0.5]))
    policy.action_high.copy_(torch.tensor([1.0, 0.3, 0.1]))
    ops = [n.op_type for n in build_model(policy).graph.node]
    assert ops[-2:] == ["Min", "Max"]
    path = to_onnx(policy, tmp_path / "bounds.onnx")
    report = check_parity(policy, path, "Hopper-v5", steps=100)
    assert report["max_abs_err"] <= 1e-5


# ----- graph and metadata ----------------------------------------------------------------
def test_metadata_and_node_count(exported):
    for i, (name, (policy, path)) in enumerate(exported.items()):
        onnx_policy = OnnxPolicy(path)
        meta = onnx_policy.metadata
        print(f"{name}: {meta['num_nodes']} nodes, state dims {meta['layer_state_dims']}")
        assert meta["producer"] == "compressm-rl" and meta["format_version"] == "1"
        assert meta["env_id"] == "Hopper-v5" and meta["training_steps"] == str(1000 + i)
        assert (onnx_policy.obs_dim, onnx_policy.act_dim) == (11, 3)
        assert onnx_policy.state_size == policy.actor.state_size
        assert onnx_policy.layer_state_dims == list(policy.actor.state_dims)
        assert meta["policy_type"] == policy.policy_type
        layers = len(policy.actor.state_dims)
        if not layers:  # norm (2) + 3 Gemm + 2 Tanh + clamp
            assert (meta["graph_variant"], meta["graph_folds"]) == ("mlp", "")
            limit = 8
        else:  # ORT's graph: the elementwise path with the folds that pay at this size
            folds = ort_folds(policy.actor.state_dims, policy.actor.width)
            assert meta["graph_variant"] == "elementwise"
            assert meta["graph_folds"] == ",".join(folds)
            # norm (2) + encoder, A x (MatMul, or Gather, Mul, Mul, Add), per layer
            # LayerNorm, 2 Gemm, Gelu, Add (+ Mul for D ⊙ z without skip_d), Split and
            # Concat of the state unless chained, head + clamp
            limit = 3 + (1 if "dense_a" in folds else 4) + 5 * layers + 2
            limit += 0 if "skip_d" in folds else layers
            limit += 0 if "chain" in folds or layers == 1 else 2
        assert int(meta["num_nodes"]) == limit


def test_mlp_graph_has_no_state(exported):
    _, path = exported["mlp"]
    policy = OnnxPolicy(path)
    assert [i.name for i in policy.session.get_inputs()] == ["obs"]
    assert policy.state.shape == (1, 0) and not policy.recurrent
    policy.reset()
    assert policy.act(np.zeros(11)).shape == (3,)


# ----- runtime behaviour -----------------------------------------------------------------
def test_reset_mask_zeroes_only_those_rows(exported):
    _, path = exported["ssm_compressed"]
    policy = OnnxPolicy(path, batch_size=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        policy.act(rng.normal(size=(3, 11)))
    before = policy.state
    policy.reset(np.array([True, False, True]))
    after = policy.state
    assert not after[[0, 2]].any() and np.array_equal(after[1], before[1]) and before[1].any()
    policy.reset()
    assert not policy.state.any()


def test_io_binding_and_run_paths_agree(exported):
    _, path = exported["ssm_full"]
    fast, plain = OnnxPolicy(path, io_binding=True), OnnxPolicy(path, io_binding=False)
    rng = np.random.default_rng(1)
    for t in range(30):
        obs = rng.normal(size=11)
        if t == 17:
            fast.reset(), plain.reset()
        np.testing.assert_array_equal(fast.act(obs), plain.act(obs))
    np.testing.assert_array_equal(fast.state, plain.state)


def test_float64_obs_is_cast_and_actions_are_float32(exported):
    _, path = exported["ssm_full"]
    a, b = OnnxPolicy(path), OnnxPolicy(path)
    obs = np.random.default_rng(2).normal(size=11)
    out = a.act(obs)
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_array_equal(out, b.act(obs.astype(np.float32)))
    assert a.act(obs[None]).shape == (1, 3)


@pytest.mark.parametrize(
    "obs, match",
    [
        (np.zeros(12), r"obs must have shape \[1, 11\] or \[11\]"),
        (np.zeros((2, 11)), r"obs must have shape"),
        (np.zeros(11, dtype=np.int64), "must be a float array"),
        (np.array(["a"] * 11, dtype=object), "must be a float array"),
        (np.full(11, np.nan), "NaN or inf"),
        (np.array([np.inf] + [0.0] * 10), "NaN or inf"),
    ],
)
def test_bad_observations_are_rejected_clearly(exported, obs, match):
    _, path = exported["ssm_full"]
    policy = OnnxPolicy(path)
    with pytest.raises(ValueError, match=match):
        policy.act(obs)


@pytest.mark.parametrize("io_binding", [True, False])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 3e38])
@pytest.mark.parametrize("where", ["obs", "state"])
def test_non_finite_values_follow_the_c_step_contract(exported, where, value, io_binding):
    """The C step's contract in OnnxPolicy (no compiler needed): with validate=False, a row
    whose obs or state holds NaN/±inf (status 1), or whose result is not finite (status 2:
    3e38 in the state overflows the LayerNorm), gets the safe action (0 clipped into the
    bounds) and a zero state; with validate=True (the default) it raises, state kept."""
    policy, path = exported["ssm_compressed"]
    onnx_policy = OnnxPolicy(path, batch_size=3, io_binding=io_binding, validate=False)
    low, high = policy.action_low.numpy(), policy.action_high.numpy()
    safe = np.clip(np.zeros_like(low), low, high).astype(np.float32)
    rng = np.random.default_rng(4)
    obs = rng.normal(size=(3, 11)).astype(np.float32)
    state = rng.normal(size=(3, onnx_policy.state_size)).astype(np.float32)
    (obs if where == "obs" else state)[1] = value
    expected = 1 if not np.isfinite(value) else (2 if where == "state" else 0)
    action, state_out = onnx_policy.run(obs, state)
    assert np.isfinite(action).all() and np.isfinite(state_out).all()
    assert ((action >= low) & (action <= high)).all()
    np.testing.assert_array_equal(onnx_policy.last_status, [0, expected, 0])
    if expected:
        np.testing.assert_array_equal(action[1], safe)
        np.testing.assert_array_equal(state_out[1], 0.0)
    # act(): the same, on the held state.
    onnx_policy.act(obs[[0, 0, 0]])
    if where == "obs":
        action = onnx_policy.act(obs)
        np.testing.assert_array_equal(onnx_policy.last_status, [0, expected, 0])
        assert np.isfinite(action).all() and np.isfinite(onnx_policy.state).all()
        if expected:
            np.testing.assert_array_equal(onnx_policy.state[1], 0.0)
    checked = OnnxPolicy(path, io_binding=io_binding)
    checked.act(obs[0])
    before = checked.state
    if expected:
        with pytest.raises(ValueError, match="NaN or inf|not finite"):
            checked.run(obs[1:2], state[1:2])
        if where == "obs":
            with pytest.raises(ValueError, match="NaN or inf"):
                checked.act(obs[1])
    else:
        checked.act(obs[1])
    if expected:
        np.testing.assert_array_equal(checked.state, before)


def test_bad_batch_shape_and_reset_mask(exported):
    _, path = exported["mlp"]
    policy = OnnxPolicy(path, batch_size=4)
    with pytest.raises(ValueError, match=r"\[4, 11\].*batch_size=4"):
        policy.act(np.zeros(11))
    with pytest.raises(ValueError, match="reset mask"):
        policy.reset(np.ones(3, bool))


def test_bad_files_are_rejected_clearly(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        OnnxPolicy(garbage)
    foreign = tmp_path / "identity.onnx"
    foreign.write_bytes(_IDENTITY_MODEL)
    with pytest.raises(ValueError, match="not a compressm-rl policy"):
        OnnxPolicy(foreign)
    with pytest.raises(FileNotFoundError, match="no ONNX model at"):
        OnnxPolicy(tmp_path / "missing.onnx")


def test_unavailable_provider_lists_available_ones(exported):
    _, path = exported["mlp"]
    with pytest.raises(ValueError, match="available: .*CPUExecutionProvider"):
        OnnxPolicy(path, provider="NoSuchExecutionProvider")


# ----- device-side imports and the benchmark CLI ------------------------------------------
def test_runtime_and_bench_import_neither_torch_nor_gym():
    code = (
        "import export.runtime, export.bench, export.c_runtime, export.targets; import sys; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch','gymnasium','mujoco','onnx'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_bench_cli_writes_json(exported, tmp_path):
    out = tmp_path / "bench.json"
    paths = [str(exported[n][1]) for n in ("ssm_full", "mlp")]
    cmd = [sys.executable, "-m", "export.bench", *paths, "--steps", "200", "--warmup", "20"]
    proc = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["results"]]
    assert names[-2:] == ["ssm_full.onnx", "mlp.onnx"] and "identity" in names[0]
    assert all(r["steps"] == 200 and 0 < r["p50_us"] <= r["p99_us"] for r in data["results"])
    assert data["machine"]["onnxruntime"] and "| model |" in proc.stdout


# ----- deployment commands -----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_config):
    """A real (tiny) training run directory on Hopper-v5."""
    from compressm_rl.train import train

    run = tmp_path_factory.mktemp("run")
    train(tiny_config("Hopper-v5", total_steps=128, width=16), run, progress=False)
    return run


def test_export_command_checks_parity_and_fails_loudly(trained_run, tmp_path, monkeypatch, capsys):
    from compressm_rl.cli import main

    out = tmp_path / "good.onnx"
    assert main(["export", str(trained_run), "--out", str(out), "--parity-steps", "100"]) == 0
    assert out.exists() and OnnxPolicy(out).metadata["training_steps"] == "128"
    assert "parity ok" in capsys.readouterr().out

    # A graph that does not match its policy: exit status 1, the file is removed.
    import compressm_rl.deploy as deploy

    other = make_policy("Hopper-v5", seed=11, state_dims=[12, 12])
    real = deploy.build_model
    monkeypatch.setattr(deploy, "build_model", lambda p, *a, **k: real(other, *a, **k))
    bad = tmp_path / "bad.onnx"
    assert main(["export", str(trained_run), "--out", str(bad), "--parity-steps", "50"]) == 1
    assert not bad.exists()
    assert "does not match its reference" in capsys.readouterr().err
    # A failed re-export leaves the previous, checked file as it was.
    checked = out.read_bytes()
    assert main(["export", str(trained_run), "--out", str(out), "--parity-steps", "50"]) == 1
    assert out.read_bytes() == checked and not list(tmp_path.glob(".*.tmp"))


def test_bench_command_with_torch_row(exported, trained_run, tmp_path):
    from compressm_rl.cli import main

    _, path = exported["ssm_compressed"]
    argv = ["bench", str(path), "--steps", "100", "--warmup", "10", "--run", str(trained_run)]
    assert main([*argv, "--out-dir", str(tmp_path / "b")]) == 0
    table = (tmp_path / "b" / "latency.md").read_text()
    assert "torch eager" in table and "torch frozen" in table and "ssm_compressed.onnx" in table
    assert (tmp_path / "b" / "latency_hist.png").stat().st_size > 0


def test_evaluate_onnx_returns_per_episode(exported):
    from compressm_rl.runs import evaluate, load_controller

    _, path = exported["mlp"]
    controller, env_id = load_controller(path)
    first = evaluate(controller, env_id, episodes=3, seed=5)
    again = evaluate(controller, env_id, episodes=3, seed=5)
    assert env_id == "Hopper-v5" and first.shape == (3,) and np.all(np.isfinite(first))
    np.testing.assert_array_equal(first, again)  # seeded resets: deterministic


def test_eval_of_onnx_equals_eval_of_run_directory(trained_run, tmp_path, capsys):
    from compressm_rl.cli import main

    onnx_path = tmp_path / "policy.onnx"
    assert main(["export", str(trained_run), "--out", str(onnx_path), "--parity-steps", "50"]) == 0
    capsys.readouterr()
    results = []
    for target in (trained_run, onnx_path):
        assert main(["eval", str(target), "--episodes", "3", "--seed", "7", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    torch_run, onnx_run = results
    assert torch_run["env_id"] == onnx_run["env_id"] == "Hopper-v5"
    np.testing.assert_allclose(onnx_run["returns"], torch_run["returns"], rtol=1e-3)
