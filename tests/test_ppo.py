"""Recurrent PPO on real MuJoCo envs: replay exactness, truncation, update, resume."""

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_config

from compressm_rl.rl import SequenceBatch, iteration, make_optimizer, ppo, preset_for, start_carry
from compressm_rl.rl.rollout import collect_rollout, critic_pass
from compressm_rl.runs import MetricsLog, load_checkpoint, load_config, load_policy
from compressm_rl.train import train
from envs import make_vec_env
from policies.actor_critic import ActorCritic
from policies.normalizer import RunningNormalizer

TINY = dict(num_envs=2, rollout_steps=32, seq_len=16, epochs=2, minibatches=2)


def _setup(env_id="Hopper-v5", seed=0, policy_type="ssm", **env_kwargs):
    torch.manual_seed(seed)
    envs = make_vec_env(env_id, 2, seed, **env_kwargs)
    space_o, space_a = envs.single_observation_space, envs.single_action_space
    policy = ActorCritic(
        space_o.shape[0],
        space_a.shape[0],
        space_a.low,
        space_a.high,
        policy=policy_type,
        width=16,
        state_dims=[8, 5],
    )
    with torch.no_grad():
        policy.log_std.fill_(0.5)  # noisy actions: Hopper falls within a few dozen steps
    obs, _ = envs.reset(seed=seed)
    return envs, policy, start_carry(policy, envs, obs)


def _rollout(envs, policy, carry, steps=64, gamma=0.99):
    return collect_rollout(policy, envs, carry, steps, RunningNormalizer(()), gamma)


def _first_pass_log_probs(policy, rollout, seq_len):
    """The rollout's log-probs and the ones the update's first forward pass computes."""
    zeros = torch.zeros_like(rollout.log_probs)
    critic_states = rollout.critic_state0[None].expand(rollout.obs.shape[0] // seq_len, -1, -1)
    batch = SequenceBatch.from_rollout(rollout, zeros, zeros, zeros, critic_states, seq_len)
    with torch.no_grad():
        replayed, _ = policy.evaluate_actions(
            batch.obs, batch.actor_state0, batch.reset, batch.actions
        )
    return batch.log_probs, replayed


def test_replayed_log_probs_equal_rollout_across_resets():
    torch.manual_seed(0)
    envs, policy, carry = _setup()
    _rollout(envs, policy, carry)  # episodes now in flight at the rollout start
    rollout = _rollout(envs, policy, carry)
    assert rollout.episode_start[1:].any(), "the test needs episode resets inside the rollout"
    stored, replayed = _first_pass_log_probs(policy, rollout, seq_len=16)
    torch.testing.assert_close(replayed, stored, rtol=1e-4, atol=1e-4)
    # Dropping the reset mask breaks the replay: the check has teeth.
    rollout.episode_start[:] = False
    _, wrong = _first_pass_log_probs(policy, rollout, seq_len=16)
    assert (wrong - stored).abs().max() > 1e-3


def test_rewards_are_scaled_by_the_running_std_of_discounted_returns():
    """Reference: SB3 VecNormalize's per-step loop over the raw rewards of the same
    trajectory (same seeds, no scaling), against the rollout's vectorised scale."""
    gamma = 0.99
    envs, policy, carry = _setup()
    torch.manual_seed(3)
    raw = collect_rollout(policy, envs, carry, 48, None, gamma)
    envs, policy, carry = _setup()
    torch.manual_seed(3)
    scaled = collect_rollout(policy, envs, carry, 48, RunningNormalizer(()), gamma)
    assert torch.equal(scaled.actions, raw.actions) and raw.dones.any()
    reference, returns, expected = RunningNormalizer(()), np.zeros(2), []
    for reward, done in zip(raw.rewards.double().numpy(), raw.dones.numpy(), strict=True):
        returns = returns * gamma + reward
        reference.update(returns)
        expected.append(np.clip(reward / np.sqrt(float(reference.var) + 1e-8), -10, 10))
        returns[done > 0] = 0.0
    np.testing.assert_allclose(scaled.rewards.numpy(), np.array(expected), rtol=1e-5)


def test_truncation_is_bootstrapped_and_termination_is_not():
    gamma = 0.9
    envs, policy, carry = _setup("InvertedPendulum-v5", max_episode_steps=10)
    with torch.no_grad():
        policy.log_std.fill_(-3.0)  # the pole stays up for 10 steps: truncation, not termination
    rollout = _rollout(envs, policy, carry, steps=32, gamma=gamma)
    assert rollout.truncations, "expected truncated episodes"
    raw_rewards = rollout.rewards.clone()
    critic = critic_pass(policy, rollout, seq_len=16, gamma=gamma)
    assert torch.equal(rollout.rewards, raw_rewards)  # the rollout itself is left alone
    t, i, final_obs = rollout.truncations[0]
    # Independent reference: the critic in step mode over that env's steps, then final_obs.
    with torch.no_grad():
        state = rollout.critic_state0[i : i + 1]
        for s in range(t + 1):
            if rollout.episode_start[s, i]:
                state = torch.zeros_like(state)
            _, state = policy.critic.step(rollout.obs[s, i][None], state)
        feat, _ = policy.critic.step(final_obs[None], state)
        v_final = policy.critic_head(feat)[0, 0]
    torch.testing.assert_close(critic.rewards[t, i], raw_rewards[t, i] + gamma * v_final)
    assert rollout.dones[t, i] == 1.0
    bootstrapped = torch.zeros_like(raw_rewards, dtype=torch.bool)
    for t, i, _ in rollout.truncations:
        bootstrapped[t, i] = True
    assert torch.equal(critic.rewards[~bootstrapped], raw_rewards[~bootstrapped])
    # Termination: a falling pole; no bootstrap is added anywhere.
    envs, policy, carry = _setup("InvertedPendulum-v5")
    with torch.no_grad():
        policy.log_std.fill_(1.0)
    rollout = _rollout(envs, policy, carry, steps=32)
    assert not rollout.truncations and rollout.dones.any()
    assert torch.equal(critic_pass(policy, rollout, 16, 0.99).rewards, rollout.rewards)


def test_gae_does_not_leak_across_episode_ends():
    rewards = torch.tensor([[1.0], [1.0], [1.0]])
    values = torch.zeros(3, 1)
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    adv, ret = ppo.compute_gae(rewards, values, dones, torch.tensor([100.0]), gamma=0.5, lam=1.0)
    assert adv[:, 0].tolist() == pytest.approx([1.5, 1.0, 51.0])
    torch.testing.assert_close(ret, adv)


@pytest.mark.parametrize("policy_type", ["ssm", "mlp"])
def test_update_lowers_the_ppo_loss_on_its_batch_and_moves_every_part(policy_type):
    """One iteration's update, then the loss on the same batch: lower than before, with
    the update's statistics consistent with the batch it saw."""
    torch.manual_seed(0)
    envs, policy, carry = _setup(policy_type=policy_type)
    cfg = preset_for("Hopper-v5").with_overrides(total_steps=64, **TINY)
    before = copy.deepcopy(policy)
    result = iteration(
        policy, make_optimizer(policy, 1e-3), envs, carry, RunningNormalizer(()), cfg
    )
    assert all(np.isfinite(v) for v in result.stats.values()), result.stats
    assert carry.state.critic.shape == (2, policy.critic.state_size)
    # (r - 1) - log r ≥ 0 for every ratio r: a sign or log-ratio slip shows up here.
    assert result.stats["approx_kl"] >= 0.0 and 0.0 <= result.stats["clipfrac"] <= 1.0

    rollout = result.rollout
    critic = critic_pass(before, rollout, cfg.seq_len, cfg.gamma)
    adv, ret = ppo.compute_gae(
        critic.rewards, critic.values, rollout.dones, critic.last_value, cfg.gamma, cfg.gae_lambda
    )
    batch = SequenceBatch.from_rollout(
        rollout, critic.values, adv, ret, critic.segment_states, cfg.seq_len
    )

    def surrogate(p):  # the clipped objective is ≥ the plain one at ratio 1; use the plain
        with torch.no_grad():
            log_prob, _ = p.evaluate_actions(
                batch.obs, batch.actor_state0, batch.reset, batch.actions
            )
            values, _ = p.values(batch.obs, batch.critic_state0, batch.reset, return_state=False)
        norm_adv = (batch.advantages - batch.advantages.mean()) / (batch.advantages.std() + 1e-8)
        pg = -(norm_adv * (log_prob - batch.log_probs).exp()).mean()
        return float(pg), float(0.5 * (values - batch.returns).square().mean())

    pg_before, v_before = surrogate(before)
    pg_after, v_after = surrogate(policy)
    assert pg_after < pg_before and v_after < v_before, (pg_before, pg_after, v_before, v_after)
    changed = [
        k for k, v in policy.state_dict().items() if not torch.equal(v, before.state_dict()[k])
    ]
    for prefix in ("actor.", "critic.", "actor_head.", "critic_head.", "log_std"):
        assert any(k.startswith(prefix) for k in changed), prefix


@pytest.mark.parametrize("policy_type", ["ssm", "mlp"])
def test_gradients_accumulate_in_one_buffer_and_clip_as_torch_does(policy_type):
    """``backward`` writes every gradient into ``gradient_buffer``'s views (no gradient is
    reallocated), equal to the gradients of a plain ``backward``; ``clip_flat_grad_norm_`` on
    the buffer scales them as torch's does over the parameters."""
    envs, policy, carry = _setup(policy_type=policy_type)
    rollout = _rollout(envs, policy, carry, steps=32)
    reference = copy.deepcopy(policy)

    def loss_of(p):
        log_prob, entropy, values = p.evaluate(
            rollout.obs[None, :, 0],
            torch.zeros(1, p.actor.state_size),
            torch.zeros(1, p.critic.state_size),
            rollout.dones[None, :, 0].bool(),
            rollout.actions[None, :, 0],
        )
        return -log_prob.mean() - entropy.mean() + values.square().mean()

    params = list(policy.parameters())
    grads = ppo.gradient_buffer(params)
    for _ in range(2):  # the second step must not see the first one's gradients
        grads.zero_()
        loss_of(policy).backward()
    loss_of(reference).backward()
    for p, ref in zip(params, reference.parameters(), strict=True):
        assert p.grad.untyped_storage().data_ptr() == grads.untyped_storage().data_ptr()
        assert torch.equal(p.grad, ref.grad)
    assert grads.abs().sum() > 0

    max_norm = 0.1 * float(grads.norm())  # a norm that clips
    ppo.clip_flat_grad_norm_(grads, max_norm)
    torch.nn.utils.clip_grad_norm_(list(reference.parameters()), max_norm)
    for p, ref in zip(params, reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-8)
    assert float(grads.norm()) == pytest.approx(max_norm, rel=1e-5)
    before = grads.clone()
    ppo.clip_flat_grad_norm_(grads, 2 * max_norm)  # within the norm: unchanged
    torch.testing.assert_close(grads, before, rtol=1e-6, atol=0)


def _tiny_config(total_steps=256, **kw):
    return make_tiny_config(
        total_steps=total_steps, state_dim=6, width=16, checkpoint_every=1, ppo=TINY, **kw
    )


def test_resume_continues_from_saved_step(tmp_path):
    config = _tiny_config()
    train(config, tmp_path, progress=False, max_iterations=2)  # "killed" after 2 of 4
    assert load_checkpoint(tmp_path).global_step == 2 * 2 * 32
    train(load_config(tmp_path), tmp_path, resume=True, progress=False)
    assert load_config(tmp_path) == config
    rows = MetricsLog(tmp_path).read()
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["global_step"]) for r in rows] == [64, 128, 192, 256]
    walls = [float(r["wall_time"]) for r in rows]
    assert walls == sorted(walls)  # wall-clock carries on across the resume
    policy, meta = load_policy(tmp_path)
    assert meta == {"env_id": "InvertedPendulum-v5", "global_step": 256}
    with pytest.raises(ValueError, match="different config"):
        train(_tiny_config(seed=7), tmp_path, resume=True, progress=False)
    assert policy.actor.state_dims == [6, 6]


def test_corrupt_checkpoint_is_reported(tmp_path):
    train(_tiny_config(total_steps=64), tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_unknown_env_lists_close_matches():
    with pytest.raises(ValueError, match="Hopper-v5"):
        make_vec_env("Hoper-v5", 1, 0)


@pytest.mark.parametrize("policy_type", ["ssm", "mlp"])
def test_rollout_actor_samples_what_act_samples(policy_type):
    torch.manual_seed(0)
    policy = ActorCritic(6, 2, -np.ones(2), np.ones(2), policy=policy_type, width=8)
    with torch.no_grad():
        policy.actor_head.weight.normal_()
        policy.log_std.copy_(torch.tensor([-0.5, 0.3]))
    fast = policy.rollout_actor()
    obs = torch.randn(5, 6)
    state = policy.initial_state(5).actor
    start = torch.tensor([True, False, False, True, False])
    for _ in range(3):
        torch.manual_seed(7)
        action, log_prob, new_state = fast(obs, state, start)
        torch.manual_seed(7)
        action_ref, log_prob_ref, state_ref = policy.act(obs, state, start)
        torch.testing.assert_close(action, action_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(log_prob, log_prob_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new_state, state_ref, rtol=1e-5, atol=1e-5)
        state, start = new_state, None


@pytest.mark.parametrize("policy_type", ["ssm", "mlp"])
def test_frozen_controller_acts_as_the_eager_one(policy_type):
    from compressm_rl.runs import TorchController

    torch.manual_seed(0)
    policy = ActorCritic(6, 2, -np.ones(2), np.array([1.0, 0.5]), policy=policy_type, width=8)
    with torch.no_grad():
        policy.actor_head.weight.normal_()  # actions reach the bounds: the clip is tested
    policy.obs_norm.update(np.random.default_rng(0).normal(2.0, 3.0, size=(100, 6)))
    frozen, eager = TorchController(policy), TorchController(policy, frozen=False)
    rng = np.random.default_rng(1)
    actions = []
    for t in range(60):
        if t == 35:  # an episode start: both forget their state
            frozen.reset(), eager.reset()
        obs = rng.normal(2.0, 3.0, size=6)
        actions.append((frozen.act(obs), eager.act(obs)))
    fast, slow = (np.array(a) for a in zip(*actions, strict=True))
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    assert fast.dtype == np.float32 and fast.shape == (60, 2)
    assert np.all(fast <= [1.0, 0.5]) and np.any(fast == 0.5)
    if policy_type == "ssm":  # the state is carried: the same obs acts differently later
        frozen.reset()
        first = frozen.act(np.ones(6))
        assert not np.allclose(first, frozen.act(np.ones(6)), atol=1e-6)


def test_a_second_process_cannot_train_in_a_busy_run_directory(tmp_path):
    import fcntl

    from compressm_rl.cli import main
    from compressm_rl.runs import RunDirectoryBusy

    config = _tiny_config(total_steps=128)
    train(config, tmp_path, progress=False, max_iterations=1)
    with open(tmp_path / ".lock", "w") as held:  # as if another process were training
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirectoryBusy, match="another process"):
            train(config, tmp_path, resume=True, progress=False)
        assert main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
        overwrite = ["train", "--env", "InvertedPendulum-v5", "--out", str(tmp_path)]
        assert main([*overwrite, "--overwrite", "--no-progress"]) == 2
        assert (tmp_path / "checkpoint.pt").exists()  # nothing deleted under the holder
    # A call that fails inside the lock (the saved config differs) lets the lock go,
    # although its traceback is still alive here.
    with pytest.raises(ValueError, match="different config") as failed:
        train(_tiny_config(total_steps=128, seed=7), tmp_path, resume=True, progress=False)
    train(config, tmp_path, resume=True, progress=False)  # free again: the run finishes
    assert failed.value is not None
    assert load_checkpoint(tmp_path).global_step == 128


def test_every_preset_is_a_registered_task_and_builds():
    from compressm_rl.rl.config import preset_tasks
    from envs import TASKS

    assert set(preset_tasks()) == set(TASKS)
    for task in TASKS:
        cfg = preset_for(task + "-P")  # POMDP variants share their base task's preset
        assert cfg == preset_for(task) and cfg.num_iterations >= 1
    assert preset_for("InvertedPendulum-v5").init_log_std == -0.5  # the file is read


def _policy_and_batch() -> tuple[ActorCritic, SequenceBatch]:
    """A seeded Hopper-v5 SSM policy and its update batch: 32 steps, sequences of 16."""
    torch.manual_seed(0)
    envs, policy, carry = _setup()
    rollout = _rollout(envs, policy, carry, steps=32)
    critic = critic_pass(policy, rollout, 16, 0.99)
    adv, ret = ppo.compute_gae(
        critic.rewards, critic.values, rollout.dones, critic.last_value, 0.99, 0.95
    )
    batch = SequenceBatch.from_rollout(rollout, critic.values, adv, ret, critic.segment_states, 16)
    return policy, batch


def test_adapted_lr_follows_the_kl_within_rsl_rls_bounds():
    assert ppo.adapted_lr(1e-3, kl=0.03, desired_kl=0.01) == pytest.approx(1e-3 / 1.5)
    assert ppo.adapted_lr(1e-3, kl=0.004, desired_kl=0.01) == pytest.approx(1.5e-3)
    assert ppo.adapted_lr(1e-3, kl=0.01, desired_kl=0.01) == 1e-3  # within [d/2, 2d]
    assert ppo.adapted_lr(1.2e-5, kl=1.0, desired_kl=0.01) == 1e-5
    assert ppo.adapted_lr(8e-3, kl=1e-3, desired_kl=0.01) == 1e-2


def test_desired_kl_adapts_the_lr_of_every_minibatch_and_needs_no_annealing():
    with pytest.raises(ValueError, match="set anneal_lr: false to use desired_kl"):
        ppo.PPOConfig(desired_kl=0.01)
    policy, batch = _policy_and_batch()
    lrs = {}
    for desired_kl in (None, 1e-7, 1.0):
        cfg = ppo.PPOConfig(epochs=3, minibatches=2, anneal_lr=False, desired_kl=desired_kl)
        trained = copy.deepcopy(policy)
        optimizer = make_optimizer(trained, 1e-3)
        stats = ppo.ppo_update(trained, optimizer, batch, cfg)
        lrs[desired_kl] = optimizer.param_groups[0]["lr"]
        assert 0 < stats["approx_kl"] < 0.5
    assert lrs[None] == 1e-3  # no schedule: untouched
    # 6 minibatches; the first (at the rollout's policy) is skipped, the other five each
    # divide (KL far above 2 · 1e-7) or multiply (KL below 1.0 / 2) by 1.5
    assert lrs[1e-7] == pytest.approx(1e-3 / 1.5**5)
    assert lrs[1.0] == pytest.approx(1e-3 * 1.5**5)


def test_the_grouped_update_equals_the_reference_path():
    """ppo_update's one-pass actor-critic gives the same losses as the two-pass reference."""
    policy, batch = _policy_and_batch()
    with torch.no_grad():
        args = (batch.obs, batch.actor_state0, batch.critic_state0, batch.reset, batch.actions)
        for got, want in zip(
            policy.evaluate(*args), policy.evaluate(*args, grouped=False), strict=True
        ):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
