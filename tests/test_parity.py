"""The one-step parity check against float64 (export/parity.py) and the runtime's input
checks: real ONNX Runtime sessions, real MuJoCo envs, graphs broken on purpose."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from test_export import make_policy

from export.onnx_export import to_onnx
from export.parity import Float64Actor, ParityError, check_parity
from export.runtime import OnnxPolicy
from policies.actor_critic import ActorCritic

ENV = "Hopper-v5"
STATE_DIMS = [37, 5]  # a compressed size


@pytest.fixture(scope="module")
def hopper(tmp_path_factory):
    """(policy, .onnx path): a compressed-size policy with eigenvalues at the |λ| clamp."""
    policy = make_policy(ENV, seed=5, stress=True, policy="ssm", state_dims=STATE_DIMS)
    path = to_onnx(policy, tmp_path_factory.mktemp("parity") / "hopper.onnx", env_id=ENV)
    return policy, path


def _edited(path, out, edit) -> str:
    """Write ``path``'s model, changed in place by ``edit(model)``, to ``out``."""
    model = onnx.load(str(path))
    edit(model)
    onnx.save_model(model, str(out))
    return str(out)


# ----- the float64 reference ---------------------------------------------------------------
def test_float64_reference_stays_float64_and_matches_torch(hopper):
    policy, _ = hopper
    reference = Float64Actor(policy)
    rng = np.random.default_rng(0)
    obs = rng.normal(0, 1, (3, policy.obs_dim))
    state = rng.normal(0, 1, (3, policy.actor.state_size))
    action, new_state = reference.step(obs, state)
    assert action.dtype == new_state.dtype == np.float64
    # A difference far below float32's resolution still shows: nothing is cast to float32.
    _, nudged = reference.step(obs, state + 1e-12)
    assert not np.array_equal(nudged, new_state)
    # Episode starts zero the incoming state of their rows.
    started = reference.step(obs, state, np.array([True, False, False]))
    zeroed = state.copy()
    zeroed[0] = 0.0
    for got, want in zip(started, reference.step(obs, zeroed), strict=True):
        np.testing.assert_array_equal(got, want)
    # And it is the policy: torch float32 agrees to float32 precision.
    with torch.no_grad():
        obs32, state32 = torch.as_tensor(obs, dtype=torch.float32), torch.tensor(state).float()
        torch_action, _, torch_state = policy.act(policy.obs_norm(obs32), state32, None, True)
    np.testing.assert_allclose(torch_action.numpy(), action, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(torch_state.numpy(), new_state, rtol=1e-5, atol=1e-6)


# ----- graphs that are wrong -----------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expect",
    [
        ("actor_head.weight", r"onnx action mismatch at step 0,"),
        ("actor.blocks.0.lru.D", r"onnx action mismatch at step 0,"),
        # A phase θ of layer 1 (λ = |λ| e^{iθ}): nothing to carry at step 0, so the step
        # after it is the first one that can be wrong.
        ("actor.blocks.1.lru.theta", r"onnx (action|state) mismatch at step 1,"),
    ],
)
def test_one_weight_off_by_a_thousandth_fails(hopper, tmp_path, name, expect):
    """The graph of a copy whose largest ``name`` element is 1.001 times the original's.

    (Weights chosen to fail by 5-30x the tolerance here: one of 64 terms 0.1% off moves a
    sum by ~1e-5 relative, below rtol, so not every weight's 0.1% shows.)"""
    policy, _ = hopper
    wrong = copy.deepcopy(policy)
    with torch.no_grad():
        weight = dict(wrong.named_parameters())[name].view(-1)
        weight[weight.abs().argmax()] *= 1 + 1e-3
    path = to_onnx(wrong, tmp_path / "wrong.onnx", env_id=ENV)
    with pytest.raises(ParityError, match=expect) as err:
        check_parity(policy, path, ENV, steps=50)
    print(err.value)
    assert "vs float64" in str(err.value)


def test_state_only_mismatch_fails_on_the_state(hopper, tmp_path):
    """``state_out`` scaled by 1.001 after the action is computed: the step's actions are
    exact, only the state it hands on is wrong."""
    policy, path = hopper

    def gain_on_state_out(model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            node.input[:] = ["state_exact" if n == "state_out" else n for n in node.input]
            node.output[:] = ["state_exact" if n == "state_out" else n for n in node.output]
        gain = numpy_helper.from_array(np.array(1 + 1e-3, np.float32), "state_gain")
        model.graph.initializer.append(gain)
        model.graph.node.append(
            helper.make_node("Mul", ["state_exact", "state_gain"], ["state_out"])
        )

    bad = _edited(path, tmp_path / "state_gain.onnx", gain_on_state_out)
    obs = np.random.default_rng(1).normal(0, 1, (4, policy.obs_dim))
    (good_action, good_state), (bad_action, bad_state) = (
        OnnxPolicy(path).run(obs),
        OnnxPolicy(bad).run(obs),
    )
    assert np.array_equal(good_action, bad_action) and not np.array_equal(good_state, bad_state)

    element = r"state element \d+ \(layer \d, (Re|Im) h\[\d+\]\)"
    with pytest.raises(ParityError, match=rf"onnx state mismatch at step 0, env 0, {element}"):
        check_parity(policy, bad, ENV, steps=20)


class _IgnoresEpisodeStarts(ActorCritic):
    """A torch float32 path with a bug: ``predict`` carries the state across resets."""

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        return super().predict(obs, state, None, deterministic)


def test_a_broken_torch_path_is_caught_too(hopper):
    policy, path = hopper
    broken = copy.deepcopy(policy)
    broken.__class__ = _IgnoresEpisodeStarts
    with pytest.raises(ParityError, match=r"torch float32 (action|state) mismatch at step") as err:
        check_parity(broken, path, ENV, steps=300, batch=2)
    assert "at step 0," not in str(err.value)  # at the first episode end, not before


# ----- any candidate with the stepping interface --------------------------------------------
class _Wrapped:
    """An ``OnnxPolicy`` seen only through the stepping interface (as a C policy is);
    ``forget_resets`` makes ``reset`` do nothing, a bug a deployed controller could have."""

    def __init__(self, inner: OnnxPolicy, forget_resets: bool = False) -> None:
        self.inner, self.forget_resets = inner, forget_resets
        self.obs_dim, self.act_dim = inner.obs_dim, inner.act_dim
        self.batch_size, self.recurrent = inner.batch_size, inner.recurrent

    @property
    def state(self) -> np.ndarray:
        return self.inner.state

    def reset(self, mask=None) -> None:
        if not self.forget_resets:
            self.inner.reset(mask)

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.inner.act(obs)


def test_candidate_object_with_the_stepping_interface(hopper):
    policy, path = hopper
    candidate = _Wrapped(OnnxPolicy(path, batch_size=2))
    report = check_parity(policy, candidate, ENV, steps=150)  # batch from the candidate
    assert report["batch"] == 2 and report["episodes_started"] > 2
    assert 0 < report["max_tolerance_used"] < 0.5

    forgetful = _Wrapped(OnnxPolicy(path, batch_size=2), forget_resets=True)
    with pytest.raises(ParityError, match=r"_Wrapped (action|state) mismatch at step") as err:
        check_parity(policy, forgetful, ENV, steps=150)
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert step > 0  # the first step starts from the zero state anyway

    with pytest.raises(ValueError, match="batch=1, but the candidate steps 2 rows"):
        check_parity(policy, candidate, ENV, steps=5, batch=1)


# ----- a policy at the |λ| clamp --------------------------------------------------------------
def test_eigenvalues_at_the_clamp_pass_500_steps_well_inside_tolerance(tmp_path):
    """|λ| = 0.9999 integrates float32 rounding over ~10⁴ steps; one-step errors do not.
    HalfCheetah never terminates: one 500-step episode per env, the state carried."""
    env_id = "HalfCheetah-v5"
    policy = make_policy(env_id, seed=7, stress=True, policy="ssm", state_dims=STATE_DIMS)
    with torch.no_grad():
        radius = max(float(b.lru.eigenvalues().abs().max()) for b in policy.actor.blocks)
    assert radius > 0.9998
    path = to_onnx(policy, tmp_path / "cheetah.onnx", env_id=env_id)
    report = check_parity(policy, path, env_id, steps=500, batch=2)
    print(report)
    assert report["episodes_started"] == 2
    # Measured: ONNX uses ~0.17 of the tolerance, torch float32 ~0.09.
    assert report["max_tolerance_used"] < 0.5 and report["max_torch_tolerance_used"] < 0.5
    assert report["max_abs_err"] < 1e-5 and report["max_state_abs_err"] < 1e-5
    assert report["torch_vs_candidate_max_abs_err"] > 0  # reported, not judged


# ----- the runtime's input checks ----------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e300])
@pytest.mark.parametrize("which", ["obs", "state"])
def test_run_rejects_non_finite_obs_and_state(hopper, which, value):
    policy, path = hopper
    onnx_policy = OnnxPolicy(path)
    obs = np.zeros((3, policy.obs_dim))  # float64: 1e300 is finite until the float32 cast
    state = np.zeros((3, policy.actor.state_size))
    (obs if which == "obs" else state)[1, 4] = value
    with pytest.raises(ValueError, match=rf"{which} contains NaN or inf.*\(rows \[1\]\)"):
        onnx_policy.run(obs, state)
    (obs if which == "obs" else state)[1, 4] = 1e30  # large, but a float32
    action, _ = onnx_policy.run(obs, state)
    assert action.shape == (3, policy.act_dim)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_act_rejects_obs_beyond_float32_and_keeps_its_state(hopper):
    _, path = hopper
    onnx_policy = OnnxPolicy(path)
    rng = np.random.default_rng(3)
    for _ in range(3):
        onnx_policy.act(rng.normal(size=11))
    before = onnx_policy.state
    obs = rng.normal(size=11)
    obs[2] = 1e300
    with pytest.raises(ValueError, match="obs contains NaN or inf, or values beyond float32"):
        onnx_policy.act(obs)
    assert before.any() and np.array_equal(onnx_policy.state, before)
