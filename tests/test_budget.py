"""State budgets (``compress_to``), global rank allocation and cut-and-heal."""

import itertools
import json

import numpy as np
import pytest
import torch

from compressm_rl.compression import CompressionConfig, compress_policy, lru_layers
from compressm_rl.compression.budget import (
    allocate_ranks,
    event_target,
    state_scores,
    uniform_shares,
    weakest_kept,
)
from compressm_rl.compression.measurements import action_kl
from compressm_rl.runs import EventLog, load_policy
from compressm_rl.train import train
from policies.actor_critic import ActorCritic


def test_event_targets_walk_geometrically_to_the_budget():
    path, current = [], 256
    for left in (4, 3, 2, 1):
        current = event_target(current, 50, left)
        path.append(current)
    assert path[-1] == 50 and path == sorted(path, reverse=True)
    ratios = np.array([256, *path[:-1]]) / np.array(path)
    assert ratios.max() / ratios.min() < 1.05  # the same fraction each event
    assert event_target(40, 50, 3) == 40  # already within the budget
    assert event_target(200, 50, 1) == 50
    with pytest.raises(ValueError, match="events_left"):
        event_target(200, 50, 0)
    assert uniform_shares(51, [128, 128]) == [26, 25] and uniform_shares(7, [9, 9, 9]) == [3, 2, 2]
    # water-filling: a small layer takes what it holds, the others share the rest
    assert uniform_shares(20, [30, 4]) == [16, 4]
    assert uniform_shares(30, [4, 100, 12]) == [4, 14, 12]


def test_global_allocation_keeps_the_highest_scores_across_layers():
    """Against brute force: of every allocation with the same total and bounds, the
    greedy one keeps the largest summed score (the smallest summed relative bound)."""
    rng = np.random.default_rng(0)
    scores = [np.sort(rng.exponential(size=n))[::-1] * w for n, w in ((6, 1.0), (5, 3.0), (4, 0.2))]
    floors, ceilings = [1, 2, 0], [6, 5, 3]
    for total in range(3, 15):
        ranks = allocate_ranks(scores, total, floors, ceilings)
        assert all(lo <= r <= hi for r, lo, hi in zip(ranks, floors, ceilings, strict=True))
        kept = sum(s[:r].sum() for s, r in zip(scores, ranks, strict=True))
        best = max(
            sum(s[:r].sum() for s, r in zip(scores, combo, strict=True))
            for combo in itertools.product(
                *(range(lo, hi + 1) for lo, hi in zip(floors, ceilings, strict=True))
            )
            if sum(combo) == min(total, sum(ceilings))
        )
        assert sum(ranks) == min(total, sum(ceilings)) and kept == pytest.approx(best)
    ranks = [4, 3, 2]
    layer = weakest_kept(scores, ranks, [4, 0, 0])
    assert layer == int(np.argmin([np.inf, scores[1][2], scores[2][1]]))
    assert weakest_kept(scores, ranks, ranks) is None
    assert not state_scores(np.ones(4), 0.0).any()


def _policy_with_uneven_layers(seed=0, n=16):
    """Actor layer 0 has every mode strong; layer 1 has most of its modes weak: a global
    ranking should keep more of layer 0."""
    torch.manual_seed(seed)
    policy = ActorCritic(6, 2, -np.ones(2), np.ones(2), width=8, state_dims=[n, n])
    with torch.no_grad():
        lru = policy.actor.blocks[1].lru
        lru.C_re[:, 4:] *= 1e-3
        lru.C_im[:, 4:] *= 1e-3
        policy.actor_head.weight.normal_()
    return policy


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_a_budget_is_reached_over_the_events_and_held_at_the_last(allocation):
    policy = _policy_with_uneven_layers()
    obs, reset = torch.randn(4, 32, 6), torch.zeros(4, 32, dtype=torch.bool)
    # Guards so strict that every cut is refused (skipped): the last event is still held
    # to the budget (measured, not obeyed); earlier ones obey them.
    config = CompressionConfig(
        budget=12, allocation=allocation, parts=["actor"], min_state=2, max_output_error=1e-9
    )
    _, events = compress_policy(policy, None, config, obs=obs, reset=reset, events_left=2)
    assert policy.actor.state_dims == [16, 16]
    statuses = {e.status.split(":")[0] for e in events}
    assert statuses == {"skipped"} and any("output error" in e.status for e in events), events
    assert {e.target for e in events} == {event_target(32, 12, 2)}
    _, events = compress_policy(policy, None, config, obs=obs, reset=reset, events_left=1)
    assert sum(policy.actor.state_dims) == 12, policy.actor.state_dims
    assert all(e.status.startswith("applied: held to the budget") for e in events), events
    assert all(e.output_error > 1e-9 and e.kl is not None for e in events)
    if allocation == "uniform":
        assert policy.actor.state_dims == [6, 6]
    else:  # the weak layer gives up more
        assert policy.actor.state_dims[0] > policy.actor.state_dims[1]
    assert all(e.hinf_norm > 0 and 0 < e.relative_bound < np.inf for e in events)


def test_the_held_event_marks_every_part_and_says_where_a_budget_is_missed(monkeypatch):
    """Critic layers at the last event are held too (their guard measured, not obeyed); a
    layer whose smaller cuts fail keeps its cut one rank up (not all its states, with the
    other layer cut to its floor), and the events say the part ends off its target."""
    from compressm_rl.compression import kl_guard
    from compressm_rl.compression import plan as planning
    from compressm_rl.compression.lti import IllConditionedReduction

    policy = _policy_with_uneven_layers()
    obs, reset = torch.randn(4, 32, 6), torch.zeros(4, 32, dtype=torch.bool)
    real_cut = planning.cut_layer
    first_rank = {}

    def cut_layer(plan, ref, config, **kw):  # actor.1 cannot be cut below its first rank
        if ref.part == "actor" and ref.index == 1 and "rank" in kw:
            first_rank.setdefault(ref, kw["rank"])
            if kw["rank"] < first_rank[ref]:
                raise IllConditionedReduction(1e9, 1e3)
        return real_cut(plan, ref, config, **kw)

    for module in (planning, kl_guard):  # where the cuts are made
        monkeypatch.setattr(module, "cut_layer", cut_layer)
    config = CompressionConfig(budget=12, min_state=2, max_output_error=1e-9)
    _, events = compress_policy(policy, None, config, obs=obs, reset=reset)
    by_layer = {str(e.layer): e for e in events}
    assert all(e.status.startswith("applied: held to the budget") for e in events), events
    assert "output error" in by_layer["critic.0"].status  # measured, over, still applied
    assert sum(policy.critic.state_dims) == 12
    assert 0 < policy.actor.state_dims[1] < 16  # its first cut, kept
    assert policy.actor.state_dims[0] >= 2
    if sum(policy.actor.state_dims) != 12:
        assert "actor holds" in by_layer["actor.0"].status


def test_uniform_shares_of_unequal_layers_still_reach_the_budget():
    torch.manual_seed(1)
    policy = ActorCritic(6, 2, -np.ones(2), np.ones(2), width=8, state_dims=[30, 4])
    config = CompressionConfig(budget=20, allocation="uniform", parts=["actor"], min_state=1)
    compress_policy(policy, None, config)
    assert policy.actor.state_dims == [16, 4]


def test_global_allocation_cuts_with_less_error_than_uniform_at_equal_size():
    obs, reset = torch.randn(4, 64, 6), torch.zeros(4, 64, dtype=torch.bool)
    errors = {}
    for allocation in ("global", "uniform"):
        policy = _policy_with_uneven_layers()
        config = CompressionConfig(budget=10, allocation=allocation, parts=["actor"], min_state=1)
        _, events = compress_policy(policy, None, config, obs=obs, reset=reset)
        assert sum(policy.actor.state_dims) == 10
        errors[allocation] = (sum(e.relative_bound for e in events), events[0].kl)
    assert errors["global"][0] < errors["uniform"][0]
    assert errors["global"][1] < errors["uniform"][1]  # and the actions agree better


def test_cut_and_heal_brings_the_reduced_actor_back_toward_the_full_one():
    obs, reset = torch.randn(4, 48, 6), torch.zeros(4, 48, dtype=torch.bool)
    reset[:, 20] = True
    full = _policy_with_uneven_layers()
    policy = _policy_with_uneven_layers()
    critic_before = {k: v.clone() for k, v in policy.critic.state_dict().items()}
    log_std = policy.log_std.detach().clone()
    config = CompressionConfig(budget=6, parts=["actor"], min_state=1, heal_steps=30, heal_lr=3e-3)
    _, events = compress_policy(policy, None, config, obs=obs, reset=reset)
    event = events[0]
    assert sum(policy.actor.state_dims) == 6
    assert event.kl_healed < 0.5 * event.kl, (event.kl, event.kl_healed)
    # the guard judged a healed copy, and that copy's weights are what the policy got
    assert action_kl(full, policy, obs, reset) == pytest.approx(event.kl_healed, rel=1e-6)
    assert torch.equal(policy.log_std, log_std)
    for key, value in policy.critic.state_dict().items():
        assert torch.equal(value, critic_before[key]), key


def test_healing_that_does_not_lower_the_kl_is_not_applied():
    """A cut of near-silent modes leaves a near-zero KL; Adam still steps by about the lr
    on its near-zero gradient, so healing would add KL. The cut stays unhealed."""
    obs, reset = torch.randn(4, 48, 6), torch.zeros(4, 48, dtype=torch.bool)
    full = _policy_with_uneven_layers()
    policy = _policy_with_uneven_layers()
    config = CompressionConfig(budget=20, parts=["actor"], min_state=1, heal_steps=30, heal_lr=3e-3)
    _, events = compress_policy(policy, None, config, obs=obs, reset=reset)
    event = events[1]  # actor.1 loses its weak modes; actor.0 keeps every state
    assert policy.actor.state_dims == [16, 4] and event.status.startswith("applied")
    assert event.kl_healed > event.kl, (event.kl, event.kl_healed)
    assert action_kl(full, policy, obs, reset) == pytest.approx(event.kl, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(tol=0.1, budget=20), "tol = 0.1 and budget = 20 are both set"),
        (dict(budget=0), "budget = 0 is out of range"),
        (dict(budget=20, allocation="greedy"), "allocation = 'greedy' is out of range"),
        (dict(budget=20, heal_steps=-1), "heal_steps = -1 is out of range"),
        (dict(budget=20, heal_lr=0.0), "heal_lr = 0.0 is out of range"),
        (dict(tol=0.1, allocation="uniform"), "allocation = 'uniform' needs a budget"),
        (dict(budget=20, heal_steps=5, parts=["critic"]), "heal_steps = 5 heals the actor"),
    ],
)
def test_bad_budget_settings_are_named(settings, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**settings)


def test_a_budget_the_layers_cannot_meet_is_refused_before_training(tmp_path, tiny_config):
    for budget in (3, 24, 40):  # 2 layers × min_state 2 = 4 ≤ budget < 2 × 12 = 24
        with pytest.raises(ValueError, match=f"budget = {budget} is out of range"):
            tiny_config(compression=dict(budget=budget, min_state=2))
    assert not any(tmp_path.iterdir())


def test_training_to_a_budget_with_healing_ends_at_the_budget(tmp_path, tiny_config):
    config = tiny_config(
        total_steps=256,
        state_dim=16,
        compression=dict(budget=10, at=[0.25, 0.5], min_state=2, heal_steps=5),
    )
    train(config, tmp_path, progress=False)
    policy, _ = load_policy(tmp_path)
    assert sum(policy.actor.state_dims) == 10 and sum(policy.critic.state_dims) == 10
    records = json.loads((tmp_path / "compression.json").read_text())
    steps = sorted({r["step"] for r in records})
    assert len(steps) == 2
    last = [r for r in records if r["step"] == steps[-1]]
    assert {r["target"] for r in last} == {10}
    assert all(r["kl_healed"] is not None for r in last if r["layer"].startswith("actor"))
    assert [e.to_dict() for e in EventLog(tmp_path).read()] == records
    assert {str(ref) for ref in lru_layers(policy)} == {r["layer"] for r in records}


def test_a_small_actor_beside_a_full_critic_and_a_budget_per_part(tmp_path, tiny_config):
    """``critic_state_dims``: the deployed actor small, the critic at full size (the
    baseline for compressing only the actor); budgets are checked against each part."""
    config = tiny_config(state_dims=[4, 4], critic_state_dims=[12, 12], total_steps=64)
    train(config, tmp_path, progress=False)
    policy, _ = load_policy(tmp_path)
    assert policy.actor.state_dims == [4, 4] and policy.critic.state_dims == [12, 12]
    tiny_config(
        state_dims=[4, 4], critic_state_dims=[12, 12], compression=dict(budget=10, parts=["critic"])
    )
    with pytest.raises(ValueError, match="below the actor's initial 8"):
        tiny_config(state_dims=[4, 4], critic_state_dims=[12, 12], compression=dict(budget=10))
