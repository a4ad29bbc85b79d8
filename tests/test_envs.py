"""The rollout's vector env against Gymnasium's own ``SyncVectorEnv`` (SAME_STEP): every
observation, reward, termination, truncation and final observation bit-identical, for
the batched locomotion step and for the env-by-env loop."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest

from envs import KeepPartObservation, make_env
from envs.vector import SameStepSyncVectorEnv

two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="physics threads need two CPUs for this process"
)


def _compare(
    env_id: str, batched: bool, steps: int, action_dtype=np.float32, threads=1, **kwargs
) -> dict[str, int]:
    fns = [lambda: make_env(env_id, **kwargs) for _ in range(3)]
    lean = SameStepSyncVectorEnv(fns, batched=batched, physics_threads=threads)
    assert (lean.batched_step is not None) == batched
    if threads > 1:  # the C step was built and is used (a compiler is on these machines)
        assert lean.batched_step.physics is not None, lean.batched_step.physics_note
    reference = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = lean.reset(seed=4)
    ref_obs, _ = reference.reset(seed=4)
    np.testing.assert_array_equal(obs, ref_obs)
    shape = (steps, 3, *lean.single_action_space.shape)
    actions = np.random.default_rng(0).uniform(-1, 1, shape).astype(action_dtype)
    ended = {"terminated": 0, "truncated": 0}
    previous = None
    for action in actions:
        got, want = lean.step(action), reference.step(action)
        if previous is not None:  # a returned observation is never overwritten later
            np.testing.assert_array_equal(previous[0], previous[1])
        previous = (got[0], got[0].copy())
        for a, b in zip(got[:4], want[:4], strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        ended["terminated"] += int(got[2].sum())
        ended["truncated"] += int(got[3].sum())
        done = got[2] | got[3]
        assert done.any() == ("final_obs" in got[4])
        for i in np.flatnonzero(done):
            np.testing.assert_array_equal(got[4]["final_obs"][i], want[4]["final_obs"][i])
            assert got[4]["_final_obs"][i]
    return ended


@pytest.mark.parametrize("batched", [True, False])
def test_hopper_steps_as_gymnasiums_vector_env(batched):
    ended = _compare("Hopper-v5", batched, steps=120, max_episode_steps=15)
    assert ended["terminated"] and ended["truncated"]  # both ways of ending were seen


@pytest.mark.parametrize(
    "env_id, kwargs",
    [
        ("Walker2d-v5", {"max_episode_steps": 40}),
        ("HalfCheetah-v5", {"max_episode_steps": 30}),
        ("Hopper-v5-P", {"max_episode_steps": 25}),
        ("Walker2d-v5-V", {"max_episode_steps": 40, "ctrl_cost_weight": 0.05}),
        (
            "Hopper-v5",
            {"frame_skip": 2, "healthy_z_range": (0.9, 2.0), "healthy_state_range": (-50, 50)},
        ),
        ("Walker2d-v5", {"frame_skip": 6, "healthy_angle_range": [-0.5, 0.5]}),
        (
            "Hopper-v5",
            {"terminate_when_unhealthy": False, "healthy_reward": 2.0, "max_episode_steps": 30},
        ),
        (
            "HalfCheetah-v5",
            {"exclude_current_positions_from_observation": False, "max_episode_steps": 30},
        ),
    ],
)
def test_batched_locomotion_step_is_bit_identical(env_id, kwargs):
    ended = _compare(env_id, batched=True, steps=100, **{"max_episode_steps": 30, **kwargs})
    assert ended["truncated"] + ended["terminated"]  # autoresets were compared too


@pytest.mark.parametrize(
    "env_id, kwargs",
    [
        ("Swimmer-v5", {"max_episode_steps": 30}),
        ("Swimmer-v5", {"exclude_current_positions_from_observation": False}),
        # A narrow health band: random actions end Ant's episodes within the test.
        ("Ant-v5", {"healthy_z_range": (0.45, 1.0)}),
        ("Ant-v5", {"include_cfrc_ext_in_observation": False, "main_body": "torso"}),
        ("Ant-v5", {"contact_force_range": (-0.5, 2.0), "dynamics": "wide,push_prob=0.2"}),
        ("Humanoid-v5", {}),
        ("Humanoid-v5", {"include_cinert_in_observation": False, "contact_cost_range": (0, 1e-4)}),
        ("Humanoid-v5", {"include_cvel_in_observation": False, "dynamics": "wide"}),
    ],
)
def test_contact_tasks_step_bit_identical(env_id, kwargs):
    """Ant and Humanoid read cfrc_ext (mj_rnePostConstraint after the step) for their
    contact cost and observation; Swimmer is batched too."""
    ended = _compare(env_id, batched=True, steps=80, **{"max_episode_steps": 30, **kwargs})
    assert ended["truncated"] + ended["terminated"]


@two_cpus
@pytest.mark.parametrize(
    "env_id, threads", [("Hopper-v5", 2), ("Walker2d-v5-P", 3), ("Humanoid-v5", 2)]
)
def test_physics_on_threads_is_bit_identical(env_id, threads):
    """mj_step on POSIX threads (envs.physics) against Gymnasium stepping env by env."""
    ended = _compare(env_id, batched=True, steps=100, threads=threads, max_episode_steps=30)
    assert ended["truncated"] + ended["terminated"]


@two_cpus
def test_physics_threads_fall_back_with_a_warning_where_nothing_compiles(tmp_path, monkeypatch):
    import envs.physics

    monkeypatch.setattr(envs.physics, "_library", None)  # not built in this process yet
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nor in the cache
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    fns = [lambda: make_env("Hopper-v5") for _ in range(2)]
    with pytest.warns(UserWarning, match="threaded physics step is unavailable"):
        lean = SameStepSyncVectorEnv(fns, physics_threads=2)
    assert lean.batched_step is not None and lean.batched_step.physics is None
    lean.reset(seed=0)
    assert np.isfinite(lean.step(np.zeros((2, 3), np.float32))[0]).all()


def test_no_time_limit_and_a_timestep_changed_mid_run():
    fns = [lambda: gym.make("HalfCheetah-v5").unwrapped for _ in range(2)]  # no wrappers
    lean = SameStepSyncVectorEnv(fns)
    reference = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    assert lean.batched_step is not None
    lean.reset(seed=1), reference.reset(seed=1)
    actions = np.random.default_rng(1).uniform(-1, 1, (40, 2, 6)).astype(np.float32)
    for t, action in enumerate(actions):
        if t == 20:  # MujocoEnv.dt follows the model's timestep
            for env in (*lean.envs, *reference.envs):
                env.unwrapped.model.opt.timestep *= 2
        for a, b in zip(lean.step(action)[:4], reference.step(action)[:4], strict=True):
            np.testing.assert_array_equal(a, b)


def test_float64_actions_are_bit_identical_too():
    assert _compare("Walker2d-v5", True, steps=60, action_dtype=np.float64, max_episode_steps=25)[
        "truncated"
    ]


class _DoubledReward(gym.wrappers.TimeLimit):
    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, 2 * reward, terminated, truncated, info


def test_unknown_tasks_and_wrappers_step_one_by_one():
    pendulum = SameStepSyncVectorEnv([lambda: make_env("InvertedPendulum-v5")] * 2)
    assert pendulum.batched_step is None
    scaled = SameStepSyncVectorEnv(
        [lambda: gym.wrappers.ClipReward(make_env("Hopper-v5"), -1.0, 1.0)] * 2
    )
    assert scaled.batched_step is None
    nested = lambda: gym.wrappers.TimeLimit(make_env("HalfCheetah-v5", max_episode_steps=20), 100)  # noqa: E731
    assert SameStepSyncVectorEnv([nested] * 2).batched_step is None  # two limits
    subclass = lambda: _DoubledReward(make_env("Hopper-v5"), 100)  # noqa: E731
    assert SameStepSyncVectorEnv([subclass] * 2).batched_step is None
    assert _compare("InvertedPendulum-v5", batched=False, steps=60)["terminated"]


@pytest.mark.parametrize("env_id", ["Swimmer-v5", "Ant-v5", "Humanoid-v5", "Hopper-v5"])
def test_pomdp_variants_keep_exactly_the_joint_positions_or_velocities(env_id):
    """-P keeps qpos less the excluded root coordinates (1 on Hopper, 2 on Swimmer, Ant
    and Humanoid), -V keeps qvel, read off the env's own state."""
    for suffix, keep in (("-P", "positions"), ("-V", "velocities")):
        env = make_env(env_id + suffix)
        obs, _ = env.reset(seed=0)
        data = env.unwrapped.data
        skipped = 1 if env_id == "Hopper-v5" else 2
        want = data.qpos[skipped:] if keep == "positions" else data.qvel
        np.testing.assert_array_equal(obs, want)
        assert env.observation_space.shape == want.shape


def test_tasks_without_a_positions_velocities_split_have_no_pomdp_variant():
    with pytest.raises(ValueError, match="Reacher-v5's observation is not .* use Reacher-v5"):
        make_env("Reacher-v5-P")
    with pytest.raises(ValueError, match="declares no observation_structure"):
        KeepPartObservation(gym.make("Pusher-v5"), "velocities")


def test_batched_step_checks_its_input():
    envs = SameStepSyncVectorEnv([lambda: make_env("Hopper-v5")] * 2)
    with pytest.raises(RuntimeError, match="reset the envs"):
        envs.step(np.zeros((2, 3), dtype=np.float32))
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions must have shape \(2, 3\)"):
        envs.step(np.zeros((3, 3), dtype=np.float32))


@two_cpus
def test_training_with_physics_threads_is_bit_identical(tmp_path, tiny_config, monkeypatch):
    """The same run with mj_step on 2 threads: the same metrics and the same weights."""
    import torch

    import envs.physics
    from compressm_rl.runs import MetricsLog, load_checkpoint
    from compressm_rl.train import train

    used = []
    monkeypatch.setattr(envs.physics.ParallelPhysics, "__init__", _recorded(used))
    runs = {}
    for threads in (1, 2):
        config = tiny_config("Hopper-v5", total_steps=192, physics_threads=threads)
        train(config, tmp_path / str(threads), progress=False)
        rows = MetricsLog(tmp_path / str(threads)).read()
        runs[threads] = (load_checkpoint(tmp_path / str(threads)).policy.state_dict(), rows)
    (weights_1, rows_1), (weights_2, rows_2) = runs[1], runs[2]
    assert weights_1.keys() == weights_2.keys()
    for key in weights_1:
        torch.testing.assert_close(weights_1[key], weights_2[key], rtol=0, atol=0)
    keys = ("episode_return", "pg_loss", "v_loss", "approx_kl")
    assert [[r[k] for k in keys] for r in rows_1] == [[r[k] for k in keys] for r in rows_2]
    assert used == [2]  # the second run stepped its physics on two threads


def _recorded(used: list):
    """``ParallelPhysics.__init__`` that also records its thread count in ``used``."""
    import envs.physics

    init = envs.physics.ParallelPhysics.__init__

    def record(self, library, sims, threads):
        used.append(threads)
        init(self, library, sims, threads)

    return record
