"""The command line: help, version, clear errors for bad input."""

import subprocess
import sys

import pytest

from compressm_rl import __version__
from compressm_rl.cli import main


def test_help_and_version(capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "compressm_rl.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for command in ("train", "eval", "report", "compress", "export", "bench"):
        assert command in proc.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_unknown_env_is_a_clear_error(capsys):
    assert main(["train", "--env", "HalfCheeta-v5", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "unknown env id" in err and "HalfCheetah-v5" in err


def test_existing_run_is_not_overwritten_silently(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("env_id: Hopper-v5\n")
    assert main(["train", "--env", "Hopper-v5", "--out", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, named",
    [("ppo: {learning_rate: 0.1}\n", "learning_rate"), ("ppo: {lr: [\n", "not valid YAML")],
)
def test_a_bad_config_file_is_named(tmp_path, capsys, text, named):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    argv = ["train", "--env", "Hopper-v5", "--config", str(cfg), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert named in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_eval_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_train_needs_an_env_unless_it_resumes(capsys):
    assert main(["train", "--out", "unused"]) == 2
    assert "--env is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--total-steps", "-5"], "total_steps = -5"),
        (["--compress-tol", "7"], "tol = 7.0"),
        (["--compress-tol", "0.1", "--compress-at", "0.5,0.2,1.5"], "at = [0.5, 0.2, 1.5]"),
        (["--compress-tol", "0.1", "--min-state", "0"], "min_state = 0"),
        (["--compress-tol", "0.1", "--min-state", "500"], "min_state = 500"),
        (["--compress-tol", "0.1", "--compress-parts", "policy"], "parts = ['policy']"),
        (["--state-dim", "0"], "state_dim = 0"),
        (["--state-dims", "8,0"], "state_dims = [8, 0]"),
        (["--critic-state-dims", "128,9999"], "critic_state_dims = [128, 9999]"),
        (["--num-envs", "0"], "num_envs = 0"),
        (["--physics-threads", "0"], "physics_threads = 0"),
        (["--seed", "-1"], "seed = -1"),
        (["--policy", "mlp", "--compress-tol", "0.1"], "policy = 'mlp'"),
        (["--policy", "mlp", "--state-dims", "8,8"], "policy = 'mlp'"),
    ],
)
def test_out_of_range_settings_exit_2_before_a_run_directory_exists(tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    assert main(["train", "--env", "Hopper-v5", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and ("out of range" in err or "no recurrent state" in err), err
    assert not out.exists()


def test_bad_ppo_values_in_a_config_file_are_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ppo: {lr: -0.1, seq_len: 7}\n")
    assert (
        main(["train", "--env", "Hopper-v5", "--config", str(cfg), "--out", str(tmp_path / "r")])
        == 2
    )
    err = capsys.readouterr().err
    assert "ppo seq_len = 7 is out of range: a divisor of rollout_steps = 256" in err
    assert not (tmp_path / "r").exists()


def test_config_file_values_are_not_shadowed_by_flag_defaults(tmp_path):
    from compressm_rl.runs import load_checkpoint, load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "state_dim: 12\nwidth: 8\nseed: 3\nppo: {num_envs: 2, rollout_steps: 32, seq_len: 16, epochs: 1}\n"
    )
    out = tmp_path / "r"
    argv = ["train", "--env", "InvertedPendulum-v5", "--config", str(cfg), "--out", str(out)]
    assert main([*argv, "--total-steps", "64", "--width", "16", "--no-progress"]) == 0
    config = load_config(out)
    assert (config.state_dim, config.width, config.seed) == (12, 16, 3)  # the flag wins
    assert config.compression.gramian == "white"  # the default, unless asked
    flags = ["--total-steps", "64", "--compress-tol", "0.1", "--compress-gramian", "data"]
    flags += ["--compress-lr-scale", "1.4", "--compress-mode-scale", "trained"]
    assert main([*argv, *flags, "--overwrite", "--no-progress"]) == 0
    compression = load_config(out).compression
    assert (compression.gramian, compression.lr_scale, compression.mode_scale) == (
        "data",
        1.4,
        "trained",
    )
    sizes = ["--state-dims", "6,4", "--critic-state-dims", "12,8", "--total-steps", "64"]
    assert main([*argv, *sizes, "--overwrite", "--no-progress"]) == 0
    config = load_config(out)
    assert (config.initial_state_dims, config.initial_critic_state_dims) == ([6, 4], [12, 8])
    policy = load_checkpoint(out).policy
    assert (policy.actor.state_dims, policy.critic.state_dims) == ([6, 4], [12, 8])


def test_physics_threads_with_subprocess_envs_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--num-workers", "2", "--physics-threads", "2", "--out", str(out)]
    assert main(["train", "--env", "Hopper-v5", *flags]) == 2
    err = capsys.readouterr().err
    assert "physics_threads = 2" in err and "num_workers = 2" in err, err
    assert not out.exists()


def test_resume_may_change_the_physics_threads(tmp_path):
    """A setting of the machine, like --device: a run goes on with another thread count."""
    from compressm_rl.runs import load_checkpoint

    out = tmp_path / "r"
    argv = ["train", "--env", "Hopper-v5", "--total-steps", "512", "--num-envs", "2"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    assert load_checkpoint(out).global_step == 512
    resume = ["train", "--resume", str(out), "--physics-threads", "2", "--no-progress"]
    assert main(resume) == 0  # nothing left to train, but the config check passed


def test_overwrite_never_empties_a_directory_that_holds_no_run(tmp_path):
    out = tmp_path / "precious"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ppo: {num_envs: 2, rollout_steps: 32, seq_len: 16, epochs: 1}\n")
    argv = ["train", "--env", "InvertedPendulum-v5", "--config", str(cfg), "--out", str(out)]
    assert main([*argv, "--total-steps", "64", "--state-dim", "4", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub").is_dir()
    assert main([*argv, "--total-steps", "64", "--state-dim", "4", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"  # the run replaced, nothing else


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-iteration InvertedPendulum run (an SSM of 4 states a layer)."""
    from conftest import make_tiny_config

    from compressm_rl.train import train

    run = tmp_path_factory.mktemp("cli") / "run"
    train(make_tiny_config(state_dim=4), run, progress=False)
    return run


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_bench_steps_out_of_range_is_one_line(tiny_run, tmp_path, capsys, steps):
    out = tmp_path / "p.onnx"
    assert main(["export", str(tiny_run), "--parity-steps", "0", "--out", str(out)]) == 0
    assert main(["bench", str(tmp_path / "p.onnx"), "--steps", steps]) == 2
    assert "--steps" in capsys.readouterr().err


def test_eval_on_another_task_names_the_sizes(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--env", "Hopper-v5", "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "observations of size 4" in err and "size 11" in err, err


@pytest.mark.parametrize("damage", ["missing key", "wrong shape"])
def test_a_hand_built_checkpoint_is_named_not_half_loaded(tiny_run, tmp_path, capsys, damage):
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    if damage == "missing key":
        del payload["optimizer"]
    else:
        name = next(k for k in payload["policy"] if k.endswith("weight"))
        payload["policy"][name] = torch.zeros(3, 3)
    torch.save(payload, run / "checkpoint.pt")
    assert main(["eval", str(run), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not hold a complete compressm-rl training state" in err


def test_a_c_export_that_does_not_compile_is_one_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "c"
    export = ["export", str(tiny_run), "--format", "c", "--parity-steps", "0", "--out"]
    assert main([*export, str(out)]) == 0
    capsys.readouterr()
    source = out / "policy.c"
    source.write_text(source.read_text() + "\nthis is not C;\n")
    for command in (["eval", str(out), "--episodes", "1"], ["bench", str(out), "--steps", "10"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "policy.c" in err, err


def test_the_reference_is_generated_from_the_code():
    """docs/reference.md is what `python -m compressm_rl.reference` prints today: a new or
    changed flag or setting without a regenerated reference fails here."""
    from pathlib import Path

    from compressm_rl.reference import render

    committed = (Path(__file__).parents[1] / "docs" / "reference.md").read_text()
    assert committed == render(), "run: python -m compressm_rl.reference > docs/reference.md"
