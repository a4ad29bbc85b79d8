"""Nothing is lost: `--overwrite`, `compress --out` and `export --out` replace only what this
tool wrote; a resumed run makes the reductions an uninterrupted one makes; `--resume`
refuses the run's own settings instead of dropping them."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import compressm_rl.train as train_module
from compressm_rl.cli import main
from compressm_rl.runs import EventLog, load_checkpoint, load_config
from compressm_rl.stopping import TrainingStopped
from compressm_rl.train import train

TINY = ["--config", "{cfg}", "--total-steps", "64", "--state-dim", "4", "--no-progress"]


@pytest.fixture
def tiny_flags(tmp_path) -> list[str]:
    """CLI flags of a seconds-long InvertedPendulum run (one 64-step iteration)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("ppo: {num_envs: 2, rollout_steps: 32, seq_len: 16, epochs: 1}\n")
    return ["--env", "InvertedPendulum-v5", *(f.format(cfg=cfg) for f in TINY)]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_overwrite_refuses_a_config_yaml_that_is_not_a_run(tmp_path, tiny_flags, capsys):
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "config.yaml").write_text("name: app\n")
    (project / "src" / "main.py").write_text("x\n")
    before = tree(project)
    assert main(["train", *tiny_flags, "--out", str(project), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "not a compressm-rl run" in err and "choose another --out" in err, err
    assert tree(project) == before and sorted(os.listdir(project)) == ["config.yaml", "src"]


def test_overwrite_replaces_the_run_and_keeps_the_users_files(tmp_path, tiny_flags):
    run = tmp_path / "run"
    assert main(["train", *tiny_flags, "--out", str(run)]) == 0
    (run / "notes.txt").write_text("keep me")
    (run / "hsv_9.png").write_bytes(b"an old run's plot")  # the tool's name: the run's
    assert main(["train", *tiny_flags, "--out", str(run), "--overwrite", "--seed", "3"]) == 0
    assert (run / "notes.txt").read_text() == "keep me"
    assert not (run / "hsv_9.png").exists()
    assert load_config(run).seed == 3 and load_checkpoint(run).global_step == 64


def test_compress_out_follows_trains_rules(tmp_path, tiny_flags, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    assert main(["train", *tiny_flags, "--out", str(run)]) == 0
    assert main(["train", *tiny_flags, "--out", str(other), "--seed", "1"]) == 0
    (other / "hsv_1.png").write_bytes(b"other's plot")
    before = tree(other)
    compress = ["compress", str(run), "--state-dims", "3,3", "--out"]
    assert main([*compress, str(other)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert tree(other) == before
    assert main([*compress, str(run)]) == 2  # onto itself
    assert "the run being compressed" in capsys.readouterr().err
    assert main([*compress, str(other), "--overwrite"]) == 0
    assert load_config(other).seed == 0 and not (other / "hsv_1.png").exists()
    assert all(e.post_training for e in EventLog(other).read())


def test_compress_out_waits_for_no_trainer(tmp_path, tiny_flags, capsys):
    from compressm_rl.runs import locked_run_dir

    run, other = tmp_path / "run", tmp_path / "other"
    assert main(["train", *tiny_flags, "--out", str(run)]) == 0
    assert main(["train", *tiny_flags, "--out", str(other), "--seed", "1"]) == 0
    before = tree(other)
    with locked_run_dir(other):  # as a training process holds it
        argv = ["compress", str(run), "--state-dims", "3,3", "--out", str(other), "--overwrite"]
        assert main(argv) == 2
    assert "another process is training" in capsys.readouterr().err
    assert {k: v for k, v in tree(other).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


def test_onnx_export_replaces_only_a_previous_export(tmp_path, tiny_flags, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_flags, "--out", str(run)]) == 0
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    export = ["export", str(run), "--parity-steps", "0", "--out"]
    assert main([*export, str(precious)]) == 2
    assert "not an ONNX export of this tool" in capsys.readouterr().err
    assert precious.read_text() == "keep me"
    onnx_file = tmp_path / "policy.onnx"
    assert main([*export, str(onnx_file)]) == 0
    assert main([*export, str(onnx_file)]) == 0  # a previous export: replaced
    assert main([*export, str(precious), "--overwrite"]) == 0
    assert precious.read_bytes()[:2] != b"ke"


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--env", "Hopper-v5"], "--env"),
        (["--seed", "5"], "--seed"),
        (["--compress-tol", "0.2"], "--compress-tol"),
        (["--overwrite"], "--overwrite"),
        (["--wid", "8"], "--width"),  # an abbreviation is the flag it stands for
    ],
)
def test_resume_refuses_the_runs_own_settings(tmp_path, tiny_flags, capsys, flags, named):
    run = tmp_path / "run"
    assert main(["train", *tiny_flags, "--out", str(run)]) == 0
    before = tree(run)
    assert main(["train", "--resume", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "cannot be given with --resume" in err, err
    assert tree(run) == before


def test_resume_with_total_steps_extends_the_run(tmp_path, tiny_flags):
    run = tmp_path / "run"
    assert main(["train", *tiny_flags, "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--total-steps", "192", "--no-progress"]) == 0
    assert load_checkpoint(run).global_step == 192
    assert load_config(run).ppo.total_steps == 192


def _events(run: Path) -> list[tuple]:
    return [(e.step, str(e.layer), e.n_before, e.n_after) for e in EventLog(run).read()]


@pytest.mark.parametrize("stopped_event", [0, 1, 2, 3])
def test_a_stop_during_a_reduction_moves_no_reduction(
    tmp_path, tiny_config, monkeypatch, stopped_event
):
    """SIGINT lands while reduction K is being decided; the resumed run makes every
    reduction at the uninterrupted run's steps with its sizes, the last one (due at the
    last iteration) included, and reduction K on the same data (the same bound)."""
    config = tiny_config(
        total_steps=512,  # 8 iterations of 64 steps
        compression=dict(budget=16, allocation="uniform", at=[0.25, 0.5, 0.625, 0.875]),
    )
    train(config, tmp_path / "whole", progress=False)
    expected = _events(tmp_path / "whole")
    assert [e[0] for e in expected[::4]] == [128, 256, 320, 448], expected

    decide, calls = train_module.decide_reductions, []

    def interrupted(*args, **kwargs):
        calls.append(None)
        if len(calls) == stopped_event + 1:
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, mid-decision
        return decide(*args, **kwargs)

    run = tmp_path / "stopped"
    monkeypatch.setattr(train_module, "decide_reductions", interrupted)
    with pytest.raises(TrainingStopped):
        train(config, run, progress=False)
    monkeypatch.setattr(train_module, "decide_reductions", decide)
    train(config, run, resume=True, progress=False)
    assert _events(run) == expected
    bounds = [e.bound for e in EventLog(run).read()]
    whole_bounds = [e.bound for e in EventLog(tmp_path / "whole").read()]
    cut = slice(4 * stopped_event, 4 * stopped_event + 4)
    assert bounds[cut] == whole_bounds[cut]  # decided on the very same rollout
