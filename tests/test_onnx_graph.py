"""The ONNX graph's rewrites (``export.onnx_export.FOLDS``): same function, fewer nodes.

Every fold is checked against torch and against the plain graph (``folds=()``) on seeded
random policies whose LayerNorm affines, D and observation statistics are all non-trivial,
with observations beyond the normaliser's clip range and arbitrary recurrent states.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import (
    CHAIN_MAX_EXTRA_MACS,
    DENSE_A_MAX_MACS,
    FOLDS,
    build_model,
    ort_folds,
    to_onnx,
)
from export.runtime import OnnxPolicy, session_options
from policies.actor_critic import ActorCritic

OBS_DIM, ACT_DIM, WIDTH = 11, 3, 64
PATH_FOLDS = {True: ("chain", "ln_affine"), False: ("chain", "skip_d", "dense_a")}


def random_policy(state_dims: list[int], seed: int, stress: bool = False) -> ActorCritic:
    """An SSM policy (``[]``: MLP) with random normaliser statistics, LayerNorm affine,
    head and action bounds that clamp some actions; ``stress``: eigenvalues at the |λ|
    clamp and real ones (θ = 0, π)."""
    torch.manual_seed(seed)
    kind = dict(policy="ssm", state_dims=state_dims) if state_dims else dict(policy="mlp")
    policy = ActorCritic(OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), width=WIDTH, **kind)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        policy.obs_norm.mean.copy_(torch.as_tensor(rng.normal(0, 2, OBS_DIM)))
        policy.obs_norm.var.copy_(torch.as_tensor(rng.uniform(0.05, 5.0, OBS_DIM)))
        torch.nn.init.orthogonal_(policy.actor_head.weight, gain=1.5)
        policy.actor_head.bias.normal_(0, 0.3)
        for block in getattr(policy.actor, "blocks", []):
            block.norm.weight.copy_(torch.as_tensor(rng.uniform(0.3, 2.0, WIDTH)))
            block.norm.bias.copy_(torch.as_tensor(rng.normal(0, 0.5, WIDTH)))
            if stress:
                block.lru.nu_log[:3] = -30.0  # |λ| = MAX_RADIUS
                block.lru.theta[:2] = torch.tensor([0.0, math.pi])[: block.lru.state_dim]
    return policy


def inputs(policy: ActorCritic, batch: int = 64, seed: int = 0):
    """Raw observations, a third of them beyond the clip range, and random states."""
    rng = np.random.default_rng(seed)
    mean = policy.obs_norm.mean.numpy()
    std = np.sqrt(policy.obs_norm.var.numpy() + policy.obs_norm.eps)
    scale = np.where(rng.random((batch, OBS_DIM)) < 0.3, 25.0, 2.0)
    obs = (mean + std * scale * rng.standard_normal((batch, OBS_DIM))).astype(np.float32)
    assert (np.abs((obs - mean) / std) > policy.obs_norm.clip).any()  # the clip is exercised
    state = rng.normal(0, 1, (batch, policy.actor.state_size)).astype(np.float32)
    return obs, state


def run(model: onnx.ModelProto, obs: np.ndarray, state: np.ndarray):
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )
    feeds = {"obs": obs} if state.shape[1] == 0 else {"obs": obs, "state": state}
    outputs = session.run(None, feeds)
    return outputs[0], (outputs[1] if len(outputs) > 1 else np.zeros_like(state))


def reference(policy: ActorCritic, obs: np.ndarray, state: np.ndarray):
    with torch.no_grad():
        features, new_state = policy.actor.step(
            policy.obs_norm(torch.as_tensor(obs)), torch.as_tensor(state)
        )
        action = torch.clamp(policy.actor_head(features), policy.action_low, policy.action_high)
    return action.numpy(), new_state.numpy()


def meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def subsets(names):
    return [c for k in range(len(names) + 1) for c in itertools.combinations(names, k)]


# ----- same function --------------------------------------------------------------------
@pytest.mark.parametrize(
    "state_dims, stress",
    [([25, 25], False), ([25, 25], True), ([7], False), ([12, 3, 7], True)],
    ids=["n25x2", "n25x2-stress", "n7", "n12-3-7-stress"],
)
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "elementwise"])
def test_every_fold_combination_matches_torch_and_the_plain_graph(state_dims, stress, merged):
    policy = random_policy(state_dims, seed=len(state_dims) + 10 * stress, stress=stress)
    obs, state = inputs(policy)
    want_action, want_state = reference(policy, obs, state)
    plain_action, plain_state = run(build_model(policy, merged=merged, folds=()), obs, state)
    assert (np.abs(want_action) == 1.0).any()  # some actions are clamped
    for folds in subsets(PATH_FOLDS[merged]):
        action, new_state = run(build_model(policy, merged=merged, folds=folds), obs, state)
        for got, want, plain in (
            (action, want_action, plain_action),
            (new_state, want_state, plain_state),
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(folds))
            np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5, err_msg=str(folds))


@pytest.mark.parametrize("merged", [None, True, False])
def test_folded_graph_tracks_the_plain_graph_in_a_rollout(merged):
    """200 steps with the state fed back (|λ| at the clamp): rounding does not grow."""
    policy = random_policy([25, 25], seed=3, stress=True)
    obs, _ = inputs(policy, batch=200, seed=1)
    plain = ort.InferenceSession(
        build_model(policy, merged=merged, folds=()).SerializeToString(), session_options()
    )
    folded = ort.InferenceSession(
        build_model(policy, merged=merged).SerializeToString(), session_options()
    )
    state_a = state_b = np.zeros((1, policy.actor.state_size), np.float32)
    for t in range(len(obs)):
        action_a, state_a = plain.run(None, {"obs": obs[t : t + 1], "state": state_a})
        action_b, state_b = folded.run(None, {"obs": obs[t : t + 1], "state": state_b})
        np.testing.assert_allclose(action_b, action_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state_b, state_a, rtol=1e-4, atol=1e-5)


def test_opset_17_folded_graph_matches_torch():
    policy = random_policy([9, 4], seed=5)
    obs, state = inputs(policy)
    model = build_model(policy, opset=17)
    assert "Erf" in {node.op_type for node in model.graph.node}
    assert meta(model)["graph_folds"] == "chain,skip_d,dense_a"
    for got, want in zip(run(model, obs, state), reference(policy, obs, state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_skip_d_is_skipped_when_d_has_a_zero():
    policy = random_policy([6, 6], seed=2)
    with torch.no_grad():
        policy.actor.blocks[1].lru.D[5] = 0.0
    model = build_model(policy)
    assert "skip_d" not in meta(model)["graph_folds"].split(",")
    assert [node.op_type for node in model.graph.node].count("Mul") == 2  # D ⊙ z per layer
    obs, state = inputs(policy)
    for got, want in zip(run(model, obs, state), reference(policy, obs, state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----- fewer nodes ------------------------------------------------------------------------
def ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_node_counts_drop_as_claimed():
    policy = random_policy([25, 25], seed=0)
    counts = {
        (merged, folds): len(build_model(policy, merged=merged, folds=folds).graph.node)
        for merged in (True, False)
        for folds in subsets(PATH_FOLDS[merged])
    }
    # Merged: obs 2, encoder, carry, Split, 5 per layer, Concat, head, clamp.
    assert counts[True, ()] == counts[True, ("ln_affine",)] == 18
    assert counts[True, ("chain",)] == counts[True, ("chain", "ln_affine")] == 16  # -Split, -Concat
    # Elementwise: obs 2, encoder, A x 4, Split, 6 per layer, Concat, head, clamp.
    assert counts[False, ()] == 23
    assert counts[False, ("skip_d",)] == 21  # -1 Mul per layer
    assert counts[False, ("dense_a",)] == 20  # Gather, Mul, Mul, Add -> MatMul
    assert counts[False, ("chain",)] == 21  # -Split, -Concat
    assert counts[False, ("chain", "skip_d", "dense_a")] == 16
    assert ops(build_model(policy)) == [
        *["Gemm", "Clip", "Gemm", "MatMul"],
        *["LayerNormalization", "Gemm", "Gemm", "Gelu", "Add"] * 2,
        *["Gemm", "Clip"],
    ]
    # The plain graphs are HEAD's (before the folds): 18 merged, 23 elementwise.
    full = random_policy([128, 128], seed=0)
    assert len(build_model(full, folds=()).graph.node) == 23
    assert len(build_model(full).graph.node) == 21  # skip_d only at this size
    assert len(build_model(random_policy([], seed=0)).graph.node) == 8


def test_ln_affine_leaves_a_bare_layer_norm():
    model = build_model(random_policy([5, 5], seed=1), merged=True, folds=("ln_affine",))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    norms = [node for node in model.graph.node if node.op_type == "LayerNormalization"]
    assert len(norms) == 2 and all(len(node.input) == 2 for node in norms)  # no bias
    assert all(np.all(inits[node.input[1]] == 1.0) for node in norms)
    assert ops(model)[3] == "Gemm"  # the carry, now with the affines' constant bias


def test_graphs_hold_standard_onnx_ops_only():
    policy = random_policy([12, 3, 7], seed=4)
    for merged in (None, True, False):
        for folds in subsets(FOLDS):
            model = build_model(policy, merged=merged, folds=folds)
            assert {node.domain for node in model.graph.node} <= {""}
            assert [o.domain for o in model.opset_import] == [""]


# ----- the automatic choice and the metadata ----------------------------------------------
def test_ort_folds_by_size():
    assert ort_folds([25, 25], 64) == ("chain", "skip_d", "dense_a")
    assert ort_folds([48, 48], 64) == ("chain", "skip_d")  # S² = 36864 > DENSE_A_MAX_MACS
    assert ort_folds([128, 128], 64) == ("skip_d",)
    assert ort_folds([7], 64) == ("skip_d", "dense_a")  # one layer: nothing to chain
    assert 158**2 <= DENSE_A_MAX_MACS < 159**2
    assert 2 * 64 * 195 <= CHAIN_MAX_EXTRA_MACS < 2 * 64 * 196


@pytest.mark.parametrize(
    "state_dims, merged, variant, folds",
    [
        ([25, 25], None, "elementwise", "chain,skip_d,dense_a"),
        ([128, 128], None, "elementwise", "skip_d"),
        ([25, 25], False, "elementwise", "skip_d"),
        ([25, 25], True, "merged", "ln_affine"),
        ([7], True, "merged", "ln_affine"),
        ([], None, "mlp", ""),
    ],
)
def test_metadata_records_the_variant_and_folds(tmp_path, state_dims, merged, variant, folds):
    policy = random_policy(state_dims, seed=0)
    model = build_model(policy, merged=merged)
    assert (meta(model)["graph_variant"], meta(model)["graph_folds"]) == (variant, folds)
    assert meta(model)["num_nodes"] == str(len(model.graph.node))
    plain = meta(build_model(policy, merged=merged, folds=()))
    assert (plain["graph_variant"], plain["graph_folds"]) == (variant, "")
    if merged is None:  # what to_onnx writes, read back by the runtime
        path = to_onnx(policy, tmp_path / "policy.onnx")
        assert OnnxPolicy(path).metadata["graph_folds"] == folds


def test_folds_that_do_not_apply_are_not_recorded():
    policy = random_policy([9], seed=0)
    model = build_model(policy, merged=True, folds=("chain", "skip_d", "dense_a"))
    assert meta(model)["graph_folds"] == ""  # one layer: no chain; the others are elementwise
    assert meta(build_model(random_policy([], seed=0), folds=FOLDS))["graph_folds"] == ""


def test_unknown_fold_is_rejected():
    with pytest.raises(ValueError, match="unknown folds.*'nope'"):
        build_model(random_policy([4], seed=0), folds=("skip_d", "nope"))
