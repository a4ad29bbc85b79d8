"""LRU layer, block and stack: parametrisation, sequence mode equals step mode."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import LRU, LRUStack, RunningNormalizer
from policies.lru import MAX_RADIUS


@settings(max_examples=50, deadline=None)
@given(nu=st.floats(-1e4, 80.0), theta=st.floats(-10.0, 10.0))
def test_eigenvalues_inside_unit_circle_for_any_parameters(nu, theta):
    layer = LRU(width=2, state_dim=1)
    with torch.no_grad():
        layer.nu_log.fill_(nu)
        layer.theta.fill_(theta)
    radius = layer.eigenvalues().abs()
    assert torch.all(radius <= MAX_RADIUS + 1e-7) and torch.all(radius < 1.0)
    assert torch.all(torch.isfinite(layer.gamma())) and torch.all(layer.gamma() > 0)


def _rollout_steps(stack, x, reset, state):
    ys = []
    for t in range(x.shape[1]):
        state = torch.where(reset[:, t, None], torch.zeros_like(state), state)
        y, state = stack.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


def test_step_mode_equals_sequence_mode_with_resets_and_mixed_state_sizes():
    torch.manual_seed(0)
    stack = LRUStack(in_dim=5, width=16, state_dims=[128, 7])
    assert stack.state_dims == [128, 7] and stack.state_size == 2 * 135
    batch, steps = 3, 40
    x = torch.randn(batch, steps, 5)
    reset = torch.rand(batch, steps) < 0.1
    reset[:, 0] = True
    reset[1, 10:12] = True  # consecutive resets
    state0 = torch.randn(batch, stack.state_size)
    y_seq, s_seq = stack(x, state0, reset)
    y_step, s_step = _rollout_steps(stack, x, reset, state0)
    assert y_seq.shape == (batch, steps, 16) and s_seq.shape == (batch, stack.state_size)
    torch.testing.assert_close(y_seq, y_step, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_seq, s_step, rtol=1e-4, atol=1e-5)
    y_only, no_state = stack(x, state0, reset, return_state=False)  # a PPO gradient step's call
    assert no_state is None and torch.equal(y_only, y_seq)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "kernel"])
def test_frozen_step_equals_step_and_goes_stale_after_an_update(fused):
    torch.manual_seed(2)
    stack = LRUStack(in_dim=5, width=16, state_dims=[12, 3])
    with torch.no_grad():
        stack.blocks[1].lru.theta[0] = 0.0  # a real eigenvalue, as after a reduction
    frozen = stack.frozen_step(fused=fused)
    x = torch.randn(4, 5)
    state = state_ref = torch.randn(4, stack.state_size)
    for _ in range(30):
        y, state = frozen(x, state)
        y_ref, state_ref = stack.step(x, state_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        stack.blocks[0].lru.C_re.add_(1.0)
    y_new, _ = stack.step(x, state_ref)
    assert (frozen(x, state_ref)[0] - y_new).abs().max() > 1e-2  # weights were read once


def test_state_carries_across_sequence_chunks():
    torch.manual_seed(1)
    stack = LRUStack(in_dim=3, width=8, state_dims=[6, 4])
    x = torch.randn(2, 30, 3)
    y_full, s_full = stack(x)
    y_a, s_a = stack(x[:, :13])
    y_b, s_b = stack(x[:, 13:], s_a)
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_b, s_full, rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_every_parameter():
    stack = LRUStack(in_dim=3, width=8, state_dims=[4])
    y, _ = stack(torch.randn(2, 9, 3))
    y.square().mean().backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None and torch.all(torch.isfinite(p.grad)), name
        assert p.grad.abs().sum() > 0, name


def test_wrong_state_size_is_named():
    stack = LRUStack(in_dim=3, width=8, state_dims=[4, 2])
    try:
        stack.step(torch.zeros(1, 3), torch.zeros(1, 5))
    except ValueError as err:
        assert "[B, 12]" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_normalizer_tracks_mean_and_std_and_is_saved():
    torch.manual_seed(0)
    norm = RunningNormalizer(3)
    data = torch.randn(5000, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 0.0])
    for chunk in data.split(500):
        norm.update(chunk)
    torch.testing.assert_close(norm.mean, data.double().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.var, data.double().var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    out = norm(data)
    assert out.dtype == torch.float32
    assert abs(out.mean().item()) < 0.05 and abs(out.std().item() - 1) < 0.05
    assert {"mean", "var", "count"} <= set(norm.state_dict())


def test_normalizer_frozen_equals_forward_and_scalar_updates_match_the_data():
    rng = np.random.default_rng(0)
    norm = RunningNormalizer(4)
    norm.update(rng.normal(3.0, 2.0, (300, 4)))  # numpy in, float64 statistics
    x = rng.normal(3.0, 40.0, (64, 4))  # some entries clip at ±10
    frozen = norm.frozen()
    assert torch.equal(frozen(x), norm(torch.as_tensor(x, dtype=torch.float32)))
    # The reward scale: a 0-d normaliser fed one small batch per env step.
    returns = RunningNormalizer(())
    data = rng.normal(-5.0, 3.0, (200, 8))
    for row in data:
        returns.update(row)
    assert returns.mean.shape == () and float(returns.count) == pytest.approx(1600, abs=1e-3)
    assert float(returns.mean) == pytest.approx(data.mean(), rel=1e-6)
    assert float(returns.var) == pytest.approx(data.var(), rel=1e-4)
    # update_each: the same merges at once, with the variance after each one.
    one_by_one, at_once = RunningNormalizer(()), RunningNormalizer(())
    variances = []
    for row in data:
        one_by_one.update(row)
        variances.append(float(one_by_one.var))
    np.testing.assert_allclose(at_once.update_each(data), variances, rtol=1e-10)
    for name in ("mean", "var", "count"):
        torch.testing.assert_close(getattr(at_once, name), getattr(one_by_one, name))
    features = RunningNormalizer(3)  # and per feature: [T, N, 3]
    batches = rng.normal(1.0, 2.0, (5, 4, 3))
    per_step = features.update_each(batches)
    assert per_step.shape == (5, 3)
    np.testing.assert_allclose(per_step[-1], batches.reshape(-1, 3).var(0), rtol=1e-3)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
def test_grouped_forward_equals_each_stack_alone_with_padding_resets_and_states(fused):
    """Actor and critic in one pass: the same features and gradients (float64) as each
    stack on its own, also when compression has given their layers different n (the
    smaller layers are padded with exact-zero states); with the blocks in autograd ops
    and as fused kernels (``policies.lru_fused``)."""
    from policies.lru import grouped_forward

    torch.manual_seed(0)
    actor, critic = LRUStack(11, 16, [7, 5]).double(), LRUStack(11, 16, [4, 9]).double()
    x = torch.randn(3, 20, 11, dtype=torch.float64)
    reset = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) < 0.15
    assert reset.any()
    states = [torch.randn(3, s.state_size, dtype=torch.float64) for s in (actor, critic)]
    reference = torch.stack(
        [s(x, h, reset)[0] for s, h in zip((actor, critic), states, strict=True)]
    )
    grouped = grouped_forward([actor, critic], x, states, reset, fused=fused)
    torch.testing.assert_close(grouped, reference, rtol=0, atol=1e-12)
    weights = torch.randn_like(reference)
    params = [*actor.parameters(), *critic.parameters()]
    expected = torch.autograd.grad((reference * weights).sum(), params)
    got = torch.autograd.grad((grouped * weights).sum(), params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="depth and width"):
        grouped_forward([actor, LRUStack(11, 16, [3])], x, states, reset)
