"""`compressm-rl sweep`: workers in separate processes share one Optuna study (SQLite)
without running a trial twice, a worker killed mid-trial is retried by another that
resumes its run, a storage that cannot be opened stops the sweep before anything runs,
and the report is written from a finished study. Real tiny training runs throughout
(InvertedPendulum-v5, ``make_tiny_config``'s sizes), numpy warnings as errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_PPO

from compressm_rl.cli import main
from compressm_rl.runs import MetricsLog, load_checkpoint
from compressm_rl.sweep.study import results_of

ROOT = Path(__file__).resolve().parents[1]
# make_tiny_config's sizes; a checkpoint every iteration, so a killed run has one.
TINY_YAML = "state_dim: 12\nwidth: 8\ncheckpoint_every: 1\nppo: {}\n".format(
    "{" + ", ".join(f"{k}: {v}" for k, v in TINY_PPO.items()) + "}"
)
STEPS_PER_ITERATION = TINY_PPO["num_envs"] * TINY_PPO["rollout_steps"]
# Subprocesses: every warning is an error there too, as in this process (pyproject.toml).
ENV = {**os.environ, "PYTHONWARNINGS": "error", "OPENBLAS_NUM_THREADS": "1"}


def sweep_argv(out: Path, config: Path, total_steps: int, *extra: str) -> list[str]:
    return [
        *("sweep", "--env", "InvertedPendulum-v5", "--out", str(out), "--config", str(config)),
        *("--total-steps", str(total_steps), "--compress-at", "0.25,0.5", "--budgets", "8"),
        *("--eval-episodes", "2", "--parity-steps", "20", "--bench-steps", "200"),
        *("--heartbeat", "1", *extra),
    ]


def start_worker(argv: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "compressm_rl.cli", *argv]
    return subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(worker: subprocess.Popen, timeout: float = 100) -> str:
    output, _ = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, output
    return output


def trials_of(out: Path, name: str | None = None):
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
    return optuna.load_study(study_name=name or out.name, storage=storage).get_trials()


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.fixture(scope="module")
def shared_sweep(tmp_path_factory, tiny_yaml):
    """A grid of one budget over two seeds, with the MLP reference, run by two workers
    started together."""
    out = tmp_path_factory.mktemp("sweeps") / "shared"
    methods = ("--methods", "compressed,small,posthoc,mlp")
    argv = sweep_argv(out, tiny_yaml, 4 * STEPS_PER_ITERATION, "--seeds", "0,1", *methods)
    workers = [start_worker(argv) for _ in range(2)]
    return out, [finish(w) for w in workers]


def test_two_workers_share_the_grid_without_running_a_trial_twice(shared_sweep):
    from optuna.trial import TrialState

    out, outputs = shared_sweep
    trials = trials_of(out)
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    runs = sorted(t.user_attrs["run"] for t in trials)
    kinds = ("full-b0", "compressed-b8", "small-b8", "posthoc-b8", "mlp-b0")
    assert runs == sorted(f"{k}-s{s}" for k in kinds for s in (0, 1))  # each point once
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials
    said = "".join(outputs)
    for run in runs:
        trained = said.count(f"] {run}: training from step 0")
        assert trained == (0 if run.startswith("posthoc") else 1), (run, said)
        assert f"] {run}: resuming" not in said
        steps = [int(r["global_step"]) for r in MetricsLog(out / "trials" / run).read()]
        assert steps == [STEPS_PER_ITERATION * (i + 1) for i in range(4)]  # once, whole
    for t in trials:  # every recorded result is there, the storage's time a small share
        attrs = results_of(t)
        assert attrs["c_p50_us"] > 0 and attrs["total_states"] == sum(attrs["actor_dims"])
        assert 0 < attrs["storage_s"] < attrs["wall_s"]
        assert t.values == [attrs["det_return"], attrs["total_states"]]


def test_the_report_is_written_from_a_finished_study(shared_sweep, capsys):
    out, _ = shared_sweep
    (out / "pareto.md").unlink()
    (out / "pareto.png").unlink()
    assert main(["sweep", "--out", str(out), "--report"]) == 0
    text = (out / "pareto.md").read_text()
    for label in ("| full |", "| compressed-b8 |", "| small-b8 |", "| posthoc-b8 |", "| mlp |"):
        assert label in text
    assert "| mlp | 2 | [] [] | 0 |" in text  # no state
    assert "10 complete" in text
    assert (
        re.search(r"10 finished trials took [\d.]+ h of trial time .* at most 2\), by 2 wor", text)
        and "Storage round trips per training trial (8," in text
        and "Storage round trips per measuring only trial (2," in text
    )
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_killed_worker_s_trial_is_resumed_by_another(tmp_path, tiny_yaml):
    """Worker A is killed (SIGKILL) mid-training; worker B fails its trial once its
    heartbeat is stale, retries it and resumes the run from A's last checkpoint."""
    from optuna.trial import TrialState

    out = tmp_path / "killed"
    total = 40 * STEPS_PER_ITERATION
    argv = sweep_argv(out, tiny_yaml, total, "--seeds", "0", "--methods", "compressed")
    run = out / "trials" / "full-b0-s0"  # trial 0: the first taken
    first = start_worker(argv)
    deadline = time.monotonic() + 60
    while not (run / "checkpoint.pt").exists() or len(MetricsLog(run).read()) < 4:
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    killed_at = load_checkpoint(run).global_step
    assert 0 < killed_at < total

    said = finish(start_worker(argv))
    assert f"{run.name}: resuming at step {killed_at}" in said
    assert f"{run.name}: training from step 0" not in said
    trials = {t.number: t for t in trials_of(out)}
    assert trials[0].state == TrialState.FAIL  # failed as stale, then retried
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == 0]
    assert [t.state for t in retries] == [TrialState.COMPLETE]
    assert results_of(retries[0])["trained_from"] == killed_at
    steps = [int(r["global_step"]) for r in MetricsLog(run).read()]
    assert steps == list(range(STEPS_PER_ITERATION, total + 1, STEPS_PER_ITERATION))


@pytest.mark.parametrize("storage", ["postgresql://nobody@127.0.0.1:1/x", "sqlite-missing-dir"])
def test_a_storage_that_cannot_be_opened_is_one_line_before_anything_runs(
    tmp_path, tiny_yaml, capsys, storage
):
    if storage == "sqlite-missing-dir":
        storage = f"sqlite:///{tmp_path / 'missing' / 'dir' / 'study.db'}"
    out = tmp_path / "sweep"
    argv = sweep_argv(out, tiny_yaml, 4 * STEPS_PER_ITERATION, "--storage", storage)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot open the study storage {storage}: ")
    assert len(err.strip().splitlines()) == 1 and "--storage" in err
    assert not out.exists() and not (tmp_path / "missing").exists()


def test_the_journal_storage_fails_and_requeues_a_trial_whose_heartbeat_stopped(tmp_path):
    """Optuna's journal storage keeps no heartbeats; the sweep's adds them, so a journal
    file shared by workers retries a dead worker's trial as a database does."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from compressm_rl.sweep.study import HeartbeatJournalStorage, quiet_experimental
    from compressm_rl.sweep.worker import Heartbeat, pop_waiting

    with quiet_experimental():
        retry = RetryHeartbeatStaleTrialCallback()
    backend = JournalFileBackend(str(tmp_path / "study.log"))
    storage = HeartbeatJournalStorage(backend, heartbeat_interval=1, grace_period=2, callback=retry)
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize"])
    study.enqueue_trial({"kind": "full", "seed": 3, "budget": 0})
    trial, _ = pop_waiting(study)
    trial.suggest_int("seed", 0, 10)
    with Heartbeat(study, trial._trial_id):  # beating: never stale
        time.sleep(3)
        with quiet_experimental():
            fail_stale_trials(study)
        assert study.trials[0].state == TrialState.RUNNING
    time.sleep(2.5)  # silent for longer than its grace period
    with quiet_experimental():
        fail_stale_trials(study)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.system_attrs["fixed_params"] == {"kind": "full", "seed": 3, "budget": 0}
    assert retry.system_attrs["failed_trial"] == 0
    assert pop_waiting(study)[0].number == 1 and pop_waiting(study) is None


def test_a_trial_taken_by_a_worker_that_stopped_before_its_first_beat_is_retried(tmp_path):
    """SQLite: a trial left running without a single heartbeat is stale after the grace
    period, as a beaten one is."""
    import optuna
    from optuna.trial import TrialState

    from compressm_rl.sweep.study import open_storage, quiet_experimental
    from compressm_rl.sweep.worker import pop_waiting

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", 1, tmp_path)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"kind": "full", "seed": 3, "budget": 0})
    pop_waiting(study)  # and the worker stops here, before its Heartbeat
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.RUNNING  # within its grace period
    time.sleep(4.5)  # GRACE_BEATS heartbeats of 1 s
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.system_attrs["fixed_params"] == {"kind": "full", "seed": 3, "budget": 0}


def test_a_point_queued_twice_runs_once_whichever_copy_is_taken_first(tmp_path):
    """Two workers joining at once may both queue a point that failed for good: the
    lower-numbered copy runs, the other is set aside, and a finished point's copy too."""
    import optuna
    from optuna.trial import TrialState

    from compressm_rl.sweep.report import _status
    from compressm_rl.sweep.worker import pop_waiting, set_aside_duplicate

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    point = {"kind": "full", "seed": 3, "budget": 0}
    for params in (point, point, {**point, "seed": 4}):
        study.enqueue_trial(params)
    # The second copy is taken first (by a worker with an older list): set aside for #0.
    second = study.trials[1]
    study._storage.set_trial_state_values(second._trial_id, state=TrialState.RUNNING)
    assert set_aside_duplicate(study, second)
    trial, _ = pop_waiting(study)
    assert trial.number == 0
    study.tell(trial, 1.0)
    study.enqueue_trial(point)  # a copy of a finished point
    trial, _ = pop_waiting(study)
    assert trial.number == 2  # the copy (#3) is never handed out
    assert pop_waiting(study) is None
    states = [(t.state, t.user_attrs.get("set_aside")) for t in study.trials]
    assert states == [
        (TrialState.COMPLETE, None),
        (TrialState.FAIL, "a copy of trial 0"),
        (TrialState.RUNNING, None),
        (TrialState.FAIL, "a copy of trial 0"),
    ]
    status = _status([study])
    assert status[3] == "1 complete, 1 running, 2 set aside." and len(status) == 4
    # A search's retry is the same run as a finished trial only with the same seed.
    study.enqueue_trial({"budget": 8}, user_attrs={"seed": 1})
    trial, _ = pop_waiting(study)
    study.tell(trial, 1.0)
    study.enqueue_trial({"budget": 8}, user_attrs={"seed": 2})
    assert pop_waiting(study)[0].number == 5


def test_a_search_asked_by_workers_at_once_runs_its_own_number_of_trials(tmp_path):
    """Of trials asked at the same moment past a search's last, the later ones are set
    aside; retries and trials set aside do not count toward the search's trials."""
    import optuna

    from compressm_rl.sweep.plan import SweepSpec
    from compressm_rl.sweep.worker import Queue, ask_search, beyond_search, set_aside

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    queue = Queue(study, search=True)
    spec = SweepSpec("Hopper-v5", {}, {}, mode="search", trials=2)
    first = ask_search(queue, spec)
    study.tell(first, 1.0)
    study.enqueue_trial({"budget": 8}, user_attrs={}, skip_if_exists=False)
    retry = study.trials[-1]
    study._storage.set_trial_system_attr(retry._trial_id, "failed_trial", 0)
    aside = study.ask()
    set_aside(study, aside._trial_id, "a copy of trial 0")
    second, third = study.ask(), study.ask()  # two workers past the first check at once
    assert not beyond_search(queue, spec, second.number)
    assert beyond_search(queue, spec, third.number)
    set_aside(study, third._trial_id, "beyond the search's 2 trials")
    assert ask_search(queue, spec) is None  # the search has its 2


def test_kept_results_are_re_read_only_by_the_same_sweep(tmp_path):
    from dataclasses import replace

    from compressm_rl.runs.checkpoint import CHECKPOINT
    from compressm_rl.sweep.plan import SweepSpec
    from compressm_rl.sweep.trials import read_result, write_result

    run = tmp_path / "compressed-b16-s0"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(b"a checkpoint")  # only its size and time are read
    spec = SweepSpec("Hopper-v5", {"total_steps": 1000, "physics_threads": 1}, {"gramian": "data"})
    write_result(run, spec, {"return": 1.0})
    assert read_result(run, spec) == {"return": 1.0}
    machine = replace(spec, config={**spec.config, "physics_threads": 2})
    assert read_result(run, machine) == {"return": 1.0}  # a worker's own machine setting
    for other in (
        replace(spec, config={**spec.config, "total_steps": 2000}),
        replace(spec, recipe={"gramian": "white"}),
        replace(spec, env_id="Walker2d-v5"),
        replace(spec, eval_episodes=10),
    ):
        assert read_result(run, other) is None
    (run / CHECKPOINT).write_bytes(b"the checkpoint of more training")
    assert read_result(run, spec) is None  # another checkpoint: measured again
    write_result(run, spec, {"return": 2.0})
    text = (run / "trial.json").read_text()
    (run / "trial.json").write_text(text[: len(text) // 2])  # half a file
    assert read_result(run, spec) is None


def test_most_trials_at_once_counts_overlaps_only():
    from compressm_rl.sweep.report import most_at_once

    assert most_at_once([(0, 10), (10, 20), (20, 30)]) == 1  # one worker, back to back
    assert most_at_once([(0, 10), (5, 20), (6, 7), (12, 30)]) == 3
    assert most_at_once([]) == 0


def test_active_time_is_the_union_of_the_trials_intervals():
    """Overlaps count once, gaps (a sweep stopped and resumed later) not at all."""
    from compressm_rl.sweep.report import active_seconds

    assert active_seconds([(0, 10), (5, 12), (100, 110), (101, 102)]) == 22
    assert active_seconds([(3, 4)]) == 1 and active_seconds([]) == 0


def test_grid_tols_are_rounded_as_a_searched_tol_is():
    """The run directory's name and the compressed run's config carry the same tol."""
    from compressm_rl.cli import build_parser
    from compressm_rl.sweep import plan
    from compressm_rl.sweep.command import spec_from_args

    argv = ["sweep", "--env", "Hopper-v5", "--out", "unused", "--tols", "0.123456,0.2"]
    spec = spec_from_args(build_parser(with_settings=True).parse_args(argv))
    point = next(p for p in plan.grid_points(spec) if p["kind"] == "compressed")
    assert spec.tols == [0.123, 0.2] and plan.run_name(point) == "compressed-t0.123-s0"
    assert plan.compressed_config(spec, point).compression.tol == 0.123


def test_a_tune_trains_the_settings_it_samples_and_ranks_them(tmp_path, tiny_yaml, capsys):
    """--tune: TPE picks PPO settings per trial; each run is trained with exactly the
    settings its name carries; only the choices the config accepts are offered (4
    sequences per iteration: 2 or 4 minibatches); tune.md ranks what was tried."""
    import yaml

    from compressm_rl.rl.config import preset_entries
    from compressm_rl.sweep import plan
    from compressm_rl.sweep.study import results_of

    out = tmp_path / "tune"
    space = ("--search-space", "lr,minibatches,init_log_std", "--seeds", "0,1")
    argv = sweep_argv(out, tiny_yaml, 2 * STEPS_PER_ITERATION, "--tune", "2", *space)
    argv.remove("--budgets"), argv.remove("8")
    argv.remove("--compress-at"), argv.remove("0.25,0.5")
    assert main(argv) == 0
    trials = trials_of(out)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for trial in trials:
        run = out / "trials" / trial.user_attrs["run"]
        ppo = yaml.safe_load((run / "config.yaml").read_text())["ppo"]
        assert (
            trial.params["minibatches"] in (2, 4)
            and ppo["minibatches"] == trial.params["minibatches"]
        )
        assert ppo["lr"] == plan.round_sampled(trial.params["lr"])
        assert ppo["init_log_std"] == trial.params["init_log_std"]
        assert run.name.endswith(f"-s{trial.user_attrs['seed']}")
    assert sorted(t.user_attrs["seed"] for t in trials) == [0, 1]  # the seeds in turn
    text = (out / "tune.md").read_text()
    assert "| 1 | init_log_std " in text and "| 2 | init_log_std " in text
    # the best trial's settings, as its run has them, over the task's preset entries
    best = max(trials, key=lambda t: results_of(t)["det_return"])
    run = out / "trials" / best.user_attrs["run"]
    ppo = yaml.safe_load((run / "config.yaml").read_text())["ppo"]
    entry = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
    assert list(entry) == ["InvertedPendulum-v5"]
    tuned = {key: ppo[key] for key in ("lr", "minibatches", "init_log_std")}
    assert entry["InvertedPendulum-v5"] == {**preset_entries("InvertedPendulum-v5"), **tuned}
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--tune", "2"), "--search-space  is out of range"),
        (("--tune", "2", "--search-space", "lr,gramian"), "some of lr, init_log_std"),
        (("--tune", "2", "--search-space", "lr", "--budgets", "8"), "--budgets is not a tune's"),
        (("--tune", "2", "--search", "2"), "--search and --tune are two kinds of sweep"),
    ],
)
def test_a_bad_tune_is_one_line_before_anything_runs(tmp_path, tiny_yaml, extra, match, capsys):
    out = tmp_path / "tune"
    argv = [*("sweep", "--env", "InvertedPendulum-v5", "--out", str(out)), *extra]
    assert main([*argv, "--config", str(tiny_yaml)]) == 2
    assert match in capsys.readouterr().err and not out.exists()


def test_a_grid_grows_when_joined_with_more_points(tmp_path, tiny_yaml, capsys):
    """The same sweep started again with another budget and seed: the study takes the
    larger grid and trains only its new points; a narrower or different one is refused."""
    out = tmp_path / "grows"
    total = 2 * STEPS_PER_ITERATION
    first = sweep_argv(out, tiny_yaml, total, "--seeds", "0", "--methods", "compressed")
    assert main(first) == 0
    grown = [*first, "--seeds", "0,1"]
    grown[grown.index("--budgets") + 1] = "8,10"
    assert main(grown) == 0
    said = capsys.readouterr().out
    runs = sorted(t.user_attrs["run"] for t in trials_of(out))
    assert runs == sorted(
        ["full-b0-s0", "compressed-b8-s0", "full-b0-s1", "compressed-b8-s1"]
        + ["compressed-b10-s0", "compressed-b10-s1"]
    )
    assert said.count("full-b0-s0: training from step 0") == 1  # trained once, in the first
    assert "| compressed-b10 | 2 |" in (out / "pareto.md").read_text()
    other = [*grown]
    other[other.index("--total-steps") + 1] = str(2 * total)
    assert main(other) == 2
    assert "is a sweep of other settings (config.ppo differ)" in capsys.readouterr().err
