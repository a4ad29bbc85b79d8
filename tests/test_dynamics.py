"""Randomized dynamics (``envs.dynamics``): the seed fixes each episode's draw, the model
is scaled from its nominal values, the unrandomized path is today's env, the batched
locomotion step stays bit-identical, the delay delays; the ``dynamics`` training
setting, and evaluation over a grid of held-out dynamics."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import yaml

from envs import PRESETS, Dynamics, RandomizedDynamics, make_env, make_vec_env, parse_dynamics
from envs.vector import SameStepSyncVectorEnv

SCALED = {  # key -> (model field, the part of it that is scaled)
    "mass": ("body_mass", np.s_[:]),
    "friction": ("geom_friction", np.s_[:, 0]),
    "damping": ("dof_damping", np.s_[:]),
    "gain": ("actuator_gainprm", np.s_[:, 0]),
}


def _rollout(env: gym.Env, seed: int, steps: int = 60) -> np.ndarray:
    """Observations of ``steps`` steps with fixed random actions, ``[steps + 1, obs_dim]``."""
    obs, _ = env.reset(seed=seed)
    actions = np.random.default_rng(7).uniform(-1, 1, (steps, *env.action_space.shape))
    trajectory = [obs]
    for action in actions.astype(np.float32):
        obs, *_ = env.step(action)
        trajectory.append(obs)
    return np.array(trajectory)


def test_the_reset_seed_fixes_the_episode_parameters_and_trajectory():
    spec = PRESETS["wide"]
    first, second = make_env("Hopper-v5", "wide"), make_env("Hopper-v5", "wide")
    traj_a, traj_b = _rollout(first, seed=5), _rollout(second, seed=5)
    assert first.dynamics_params == second.dynamics_params
    np.testing.assert_array_equal(traj_a, traj_b)
    params = first.dynamics_params
    assert set(params) == set(spec.ranges()) - {"push"}
    for key, value in params.items():
        low, high = getattr(spec, key)
        assert low <= value <= high, key
    other = _rollout(second, seed=6)
    assert second.dynamics_params["mass"] != params["mass"]
    assert not np.array_equal(other, traj_a)


def test_the_model_is_scaled_from_its_nominal_values_every_episode():
    env = make_env("Walker2d-v5", "mass=0.5:1.5,friction=0.3:2,damping=0.5:1.5,gain=0.7:1.3")
    nominal = make_env("Walker2d-v5").unwrapped.model
    model = env.unwrapped.model
    seen = set()
    for k in range(6):  # seeded, then unseeded resets (the vector env's autoresets)
        env.reset(seed=3 if k == 0 else None)
        params = env.dynamics_params
        seen.add(params["mass"])
        for key, (field, part) in SCALED.items():
            want = getattr(nominal, field)[part] * params[key]
            np.testing.assert_array_equal(getattr(model, field)[part], want, err_msg=key)
        np.testing.assert_array_equal(model.geom_friction[:, 1:], nominal.geom_friction[:, 1:])
        np.testing.assert_array_equal(model.actuator_biasprm, nominal.actuator_biasprm)
    assert len(seen) == 6


def test_no_dynamics_is_the_plain_env_bit_for_bit():
    for spec in (None, "", "none", Dynamics()):
        assert not isinstance(make_env("Hopper-v5", spec), RandomizedDynamics)
    plain = make_vec_env("Hopper-v5", 3, seed=0, max_episode_steps=50)
    none = make_vec_env("Hopper-v5", 3, seed=0, dynamics="none", max_episode_steps=50)
    assert plain.batched_step is not None and none.batched_step is not None
    obs, _ = plain.reset(seed=2)
    np.testing.assert_array_equal(none.reset(seed=2)[0], obs)
    actions = np.random.default_rng(0).uniform(-1, 1, (300, 3, 3)).astype(np.float32)
    for action in actions:
        for a, b in zip(plain.step(action)[:4], none.step(action)[:4], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Walker2d-v5-P", "HalfCheetah-v5"])
def test_the_batched_step_is_bit_identical_with_randomized_dynamics(env_id):
    """Delay, pushes and noise in the batched step, against Gymnasium's vector env."""
    spec = "wide,push=0.5:1,push_prob=0.1"
    fns = [lambda: make_env(env_id, spec, max_episode_steps=40) for _ in range(3)]
    lean = SameStepSyncVectorEnv(fns)
    assert lean.batched_step is not None
    reference = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    np.testing.assert_array_equal(lean.reset(seed=3)[0], reference.reset(seed=3)[0])
    shape = (150, 3, *lean.single_action_space.shape)
    ended = 0
    for action in np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32):
        got, want = lean.step(action), reference.step(action)
        for a, b in zip(got[:4], want[:4], strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        for i in np.flatnonzero(got[2] | got[3]):
            np.testing.assert_array_equal(got[4]["final_obs"][i], want[4]["final_obs"][i])
            ended += 1
    assert ended  # autoresets (new draws) were compared too
    params = [env.dynamics_params for env in lean.envs]
    assert params == [env.dynamics_params for env in reference.envs]


def test_dynamics_inside_another_wrapper_is_not_batched():
    """Its noise must be the last thing done to the observation for the batched step."""
    from envs import KeepPartObservation

    inner = lambda: KeepPartObservation(make_env("Hopper-v5", "mild"), "positions")  # noqa: E731
    assert SameStepSyncVectorEnv([inner] * 2).batched_step is None


@pytest.mark.parametrize("batched", [True, False])
def test_a_delay_of_k_steps_applies_the_action_given_k_steps_before(batched):
    one = lambda: make_env("Hopper-v5", "delay=2", terminate_when_unhealthy=False)  # noqa: E731
    envs = SameStepSyncVectorEnv([one] * 2, batched=batched)  # no reset within 25 steps
    envs.reset(seed=0)
    actions = np.random.default_rng(1).uniform(-1, 1, (25, 2, 3)).astype(np.float32)
    for t, action in enumerate(actions):
        envs.step(action)
        want = actions[t - 2] if t >= 2 else np.zeros((2, 3), np.float32)
        applied = np.array([env.unwrapped.data.ctrl for env in envs.envs])
        np.testing.assert_array_equal(applied, want.astype(np.float64))


def test_pushes_kick_the_root_and_noise_perturbs_observations():
    pushed = make_env("Hopper-v5", "push=1,push_prob=1")
    pushed.reset(seed=0)
    before = pushed.unwrapped.data.qvel[0]
    pushed.before_step(np.zeros(3, np.float32))
    assert abs(pushed.unwrapped.data.qvel[0] - before) == pytest.approx(1.0)
    noisy = _rollout(make_env("Hopper-v5", "obs_noise=0.1"), seed=0, steps=3)
    clean = _rollout(make_env("Hopper-v5"), seed=0, steps=3)
    assert 0 < np.abs(noisy - clean).max() < 1.0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("mass=0.5:2,foo=1", "unknown key 'foo'.*keys mass, friction"),
        ("extreme", "unknown preset 'extreme'"),
        ("mass=a:b", "mass takes numbers"),
        ("delay=0:1.5", "delay takes whole numbers"),
        ("mass=1.5:0.5", r"mass=1.5:0.5 is out of range: low <= high"),
        ("friction=0:1", "friction=0.0:1.0 is out of range.*above 0"),
        ("push_prob=0:2,push=1", "push_prob=0.0:2.0 is out of range.*at most 1"),
        ("push=1", "push .* and push_prob .* go together"),
        ("mass=1:2:3", "mass takes numbers"),
    ],
)
def test_a_bad_spec_is_a_one_line_error(spec, match):
    with pytest.raises(ValueError, match=match) as err:
        make_env("Hopper-v5", spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec", ["none", "mild", "wide", "wide,delay=3", "mass=0.7:1.3,delay=0:2"])
def test_a_spec_round_trips_through_its_string(spec):
    dynamics = parse_dynamics(spec)
    assert parse_dynamics(str(dynamics)) == dynamics


def test_a_preset_takes_overrides():
    dynamics = parse_dynamics("mild,delay=0:3,mass=0.8")
    assert dynamics.delay == (0, 3) and dynamics.mass == (0.8, 0.8)
    assert dynamics.friction == PRESETS["mild"].friction


def test_the_dynamics_setting_round_trips_through_config_yaml(tmp_path):
    from compressm_rl.cli import build_parser
    from compressm_rl.runs import load_config, save_config
    from compressm_rl.runs.config import config_from_flags

    argv = ["train", "--env", "Hopper-v5", "--dynamics", "wide,delay=0:3"]
    config = config_from_flags(build_parser().parse_args(argv))
    assert config.dynamics == "wide,delay=0:3"  # as given
    save_config(tmp_path, config)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["dynamics"] == config.dynamics
    assert load_config(tmp_path) == config
    with pytest.raises(ValueError, match="unknown key 'mas'"):
        config_from_flags(build_parser().parse_args([*argv[:-1], "mas=1:2"]))


@pytest.fixture(scope="module")
def mild_run(tmp_path_factory, tiny_config):
    """A seconds-long Hopper-v5 run trained with ``dynamics: mild``."""
    from compressm_rl.train import train

    run_dir = tmp_path_factory.mktemp("mild")
    train(tiny_config("Hopper-v5", dynamics="mild"), run_dir, progress=False)
    return run_dir


def test_training_with_randomized_dynamics(mild_run):
    from compressm_rl.runs import MetricsLog, load_config

    assert load_config(mild_run).dynamics == "mild"
    assert MetricsLog(mild_run).read()


class _Zeros:
    """A controller that always outputs zero torques."""

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.zeros(3, np.float32)


def test_evaluate_grid_writes_a_table_and_a_heat_map(tmp_path):
    from compressm_rl.runs.evaluate import evaluate, evaluate_grid, write_grid

    grid = {"mass": [0.5, 1.5], "friction": [0.5, 1.0, 2.0]}
    result = evaluate_grid(_Zeros(), "Hopper-v5", grid, episodes=2, seed=0)
    assert result.returns.shape == (6, 2)
    assert result.points[1] == {"mass": 0.5, "friction": 1.0}
    at_point = evaluate(_Zeros(), "Hopper-v5", 2, 0, "mass=0.5,friction=1")
    np.testing.assert_array_equal(result.returns[1], at_point)
    table, image = write_grid(result, tmp_path)
    lines = table.read_text().splitlines()
    assert lines[2] == "| mass | friction | mean return | std |" and len(lines) == 4 + 6
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="push .* and push_prob"):
        evaluate_grid(_Zeros(), "Hopper-v5", "push=0:1:2", episodes=1)


def test_eval_cli_on_held_out_dynamics(mild_run, tmp_path, capsys):
    import json

    from compressm_rl.cli import main

    base = ["eval", str(mild_run), "--episodes", "2", "--json"]
    assert main([*base, "--dynamics", "wide"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 2
    grid = "mass=0.8:1.2:2,delay=0:1:2"
    assert main([*base, "--dynamics-grid", grid, "--out-dir", str(tmp_path)]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    assert [(p["mass"], p["delay"]) for p in points] == [(0.8, 0), (0.8, 1), (1.2, 0), (1.2, 1)]
    assert (tmp_path / "dynamics_grid.md").is_file() and (tmp_path / "dynamics_grid.png").is_file()
    assert main([*base, "--dynamics-grid", "mass=1:2"]) == 2
    assert "key=low:high:count" in capsys.readouterr().err
