"""Runs that survive being stopped: SIGINT/SIGTERM save the last iteration and exit
130/143, SIGKILL at random points resumes cleanly, a failing write keeps the previous
checkpoint, and bad settings or observations get clear errors (property-based)."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressm_rl.runs import EventLog, TrainConfig, load_checkpoint, load_config
from compressm_rl.runs import checkpoint as checkpoint_module
from compressm_rl.train import train

ROOT = Path(__file__).resolve().parents[1]
ITERATION = 64  # env steps per iteration of the tiny config below


def tiny_yaml(tmp_path: Path, total_steps: int, **extra) -> Path:
    """A seconds-long run as the CLI takes it: 2 envs x 32 steps, a small SSM."""
    data = {
        "total_steps": total_steps,
        "state_dim": 12,
        "width": 8,
        "ppo": dict(num_envs=2, rollout_steps=32, seq_len=16, epochs=1, minibatches=1),
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "compressm_rl.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [int(r["global_step"]) for r in csv.DictReader(f) if r.get("global_step")]


def wait_for_rows(run: Path, rows: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until ``metrics.csv`` has ``rows`` complete rows (after a kill it may have fewer
    than before: a resume cuts it back to the checkpoint)."""
    deadline = time.monotonic() + timeout
    while len(metric_steps(run)) < rows:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start in time"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_last_iteration_and_resume_finishes(tmp_path, sig, status):
    run, total = tmp_path / "run", 60 * ITERATION
    config = tiny_yaml(tmp_path, total)
    proc = cli("train", "--env", "InvertedPendulum-v5", "--config", str(config), "--out", str(run))
    wait_for_rows(run, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "Traceback" not in err and f"--resume {run}" in err, err
    saved = load_checkpoint(run).global_step
    assert saved == metric_steps(run)[-1] >= 3 * ITERATION  # nothing completed was lost

    resumed = cli("train", "--resume", str(run), "--no-progress")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    steps = metric_steps(run)
    assert steps == list(range(ITERATION, total + 1, ITERATION))  # monotonic, no duplicates
    assert load_checkpoint(run).global_step == total


def test_training_stopped_crosses_a_process_boundary_whole():
    """A pool worker's TrainingStopped reaches the parent with its message, not as an
    unpicklable exception that breaks the pool."""
    import pickle

    from compressm_rl.stopping import TrainingStopped

    stopped = TrainingStopped(signal.SIGTERM, 4096, Path("runs/x"))
    back = pickle.loads(pickle.dumps(stopped))
    assert (back.signum, back.global_step, back.run_dir) == (signal.SIGTERM, 4096, Path("runs/x"))
    assert str(back) == str(stopped) and back.exit_status == 143


def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, capsys, tiny_config):
    from compressm_rl.cli import main

    config = tiny_config(total_steps=2 * ITERATION)
    train(config, tmp_path / "run", progress=False, max_iterations=0)  # config, no checkpoint
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "from step 0" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run").global_step == 2 * ITERATION
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "a compressm-rl run directory?" in capsys.readouterr().err


def test_sigkill_at_random_points_then_resume(tmp_path):
    """Fault injection: K kills at seeded random moments, each followed by a resume; the
    run ends where it should with consistent metrics, events and checkpoint."""
    rng = np.random.default_rng(0)
    run, total = tmp_path / "run", 60 * ITERATION
    compression = {"tol": 0.3, "at": [0.1, 0.3, 0.5]}
    config = tiny_yaml(tmp_path, total, compression=compression, checkpoint_every=3)
    args = ["train", "--env", "InvertedPendulum-v5", "--config", str(config), "--out", str(run)]
    for kill in range(4):  # each process makes progress, then dies at a random moment
        proc = cli(*args) if kill == 0 else cli("train", "--resume", str(run), "--no-progress")
        wait_for_rows(run, len(metric_steps(run)) + 1, proc)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.communicate()  # reaped, its pipes closed
    assert len(metric_steps(run)) < total // ITERATION  # the kills came before the end
    proc = cli("train", "--resume", str(run), "--no-progress")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err

    assert metric_steps(run) == list(range(ITERATION, total + 1, ITERATION))
    state = load_checkpoint(run)
    assert state.global_step == total and state.next_reduction == 3
    events = EventLog(run).read()
    keys = [(e.step, str(e.layer)) for e in events]
    assert len(keys) == len(set(keys)) == 3 * 4  # 3 reduction points x 4 layers, once each
    # Each at its point, also where a resume landed on it (the checkpoint keeps the
    # rollout the guards judge).
    assert sorted({e.step for e in events}) == state.reduction_steps
    assert not list(run.glob(".*.tmp"))  # no half-written files left behind
    from compressm_rl.runs import TorchController, evaluate

    assert np.isfinite(evaluate(TorchController(state.policy), "InvertedPendulum-v5", 1)).all()


def test_a_failing_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, tiny_config):
    run = tmp_path / "run"
    config = tiny_config(total_steps=4 * ITERATION, checkpoint_every=1)
    train(config, run, progress=False, max_iterations=2)
    before = (run / "checkpoint.pt").read_bytes()
    real = checkpoint_module.atomic_write

    def disk_full(path, write):
        def partial(f):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        real(path, partial)

    monkeypatch.setattr(checkpoint_module, "atomic_write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(load_config(run), run, resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(run).global_step == 2 * ITERATION
    assert not list(run.glob(".checkpoint.pt.*"))


def test_a_full_disk_during_torch_save_is_one_line(tmp_path, monkeypatch, tiny_config, capsys):
    """ENOSPC inside torch.save (its writer turns it into "unexpected pos"): the command
    says the disk is full in one line, and the previous checkpoint is intact."""
    from compressm_rl.cli import main
    from compressm_rl.runs import files

    run = tmp_path / "run"
    config = tiny_config(total_steps=4 * ITERATION, checkpoint_every=1)
    train(config, run, progress=False, max_iterations=2)
    before = (run / "checkpoint.pt").read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:  # the file system takes 10 kB, then reports ENOSPC
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 10_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(files.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device while writing" in err, err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, tiny_config):
    run = tmp_path / "run"
    config = tiny_config(total_steps=3 * ITERATION, checkpoint_every=1)
    train(config, run, progress=False, max_iterations=2)
    with (run / "metrics.csv").open("a") as f:
        f.write("3,192,0.5")  # kill -9 in the middle of an append
    train(load_config(run), run, resume=True, progress=False)
    assert metric_steps(run) == [64, 128, 192]


# ----- property-based: bad values get clear errors --------------------------------------
BAD_VALUES = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-3, 3), max_size=3),
)
FIELDS = (
    [("", f) for f in ("seed", "policy", "state_dim", "width", "layers", "num_workers")]
    + [("", f) for f in ("torch_threads", "checkpoint_every", "state_dims", "total_steps")]
    + [("ppo", f) for f in ("num_envs", "rollout_steps", "seq_len", "epochs", "lr", "gamma")]
    + [("ppo", f) for f in ("clip_coef", "target_kl", "desired_kl", "anneal_lr", "minibatches")]
    + [
        ("compression", f)
        for f in ("tol", "at", "min_state", "max_kl", "parts", "pair_real", "gramian", "lr_scale")
    ]
    + [("compression", "mode_scale")]
)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(field=st.sampled_from(FIELDS), value=BAD_VALUES)
def test_any_setting_value_is_accepted_or_named_in_a_value_error(field, value):
    section, name = field
    data = {"env_id": "Hopper-v5", "compression": {"tol": 0.1}}
    if section:
        data.setdefault(section, {})[name] = value
    else:
        data[name] = value
    try:
        TrainConfig.from_dict(data)
    except ValueError as err:
        assert name in str(err), (field, value, err)


@pytest.fixture(scope="module")
def onnx_policy(tmp_path_factory):
    import torch

    from export.onnx_export import to_onnx
    from export.runtime import OnnxPolicy
    from policies.actor_critic import ActorCritic

    torch.manual_seed(0)
    policy = ActorCritic(5, 2, -np.ones(2), np.ones(2), width=8, state_dims=[6, 4])
    path = to_onnx(policy, tmp_path_factory.mktemp("onnx") / "p.onnx")
    return OnnxPolicy(path)


OBSERVATIONS = st.one_of(
    st.lists(st.floats(width=32), min_size=0, max_size=7).map(np.array),
    st.lists(st.floats(width=64, allow_nan=True), min_size=5, max_size=5).map(np.array),
    st.lists(st.integers(-5, 5), min_size=5, max_size=5).map(np.array),
    st.lists(st.booleans(), min_size=5, max_size=5).map(np.array),
    st.lists(st.text(max_size=2), min_size=5, max_size=5).map(np.array),
    st.lists(st.complex_numbers(max_magnitude=10), min_size=5, max_size=5).map(np.array),
    st.lists(st.lists(st.floats(-1e6, 1e6), min_size=5, max_size=5), min_size=1, max_size=3).map(
        np.array
    ),
)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # 1e300 -> inf; 1e20² in the check
@settings(max_examples=200, deadline=None, derandomize=True)
@given(obs=OBSERVATIONS)
def test_any_observation_gives_a_finite_action_or_a_value_error(onnx_policy, obs):
    try:
        action = onnx_policy.act(obs)
    except ValueError as err:
        assert "obs" in str(err)
        return
    assert action.dtype == np.float32 and action.shape in ((2,), (1, 2))
    assert np.all(np.isfinite(action)) and np.all(np.abs(action) <= 1.0)
