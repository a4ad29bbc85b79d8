"""A sweep worker: take trials from the study one at a time, run them, record them, until
none is left. Start as many workers as there are cores (here or on other machines); they
share the study's trials through its storage.

Per loop: fail the trials whose workers stopped beating (and queue them again), take a
waiting trial (the storage gives each to one worker only: the state change from WAITING
to RUNNING is atomic), or in a search ask the sampler for a new one while the search has
trials left, run it with a heartbeat, and tell the study its values. A worker that finds
no trial to take while others still run waits for them, so that a trial whose worker
dies is still retried by someone.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from compressm_rl.stopping import TrainingStopped
from compressm_rl.sweep import plan
from compressm_rl.sweep.study import RESULT, SET_ASIDE, params_of, quiet_experimental
from compressm_rl.sweep.trials import run_trial


@dataclass
class Queue:
    """A study this worker takes trials from; ``search`` set: it may ask the sampler
    for new trials (up to ``spec.trials``), else it only runs queued ones."""

    study: optuna.Study
    search: bool = False


class StorageClock:
    """Seconds spent waiting on the storage in this process's main thread."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


class Heartbeat:
    """Record the trial's heartbeat now and then every ``interval`` seconds from a thread
    while the ``with`` block runs (a no-op on a storage without heartbeats)."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.storage = study._storage  # the study's own storage object (Optuna's cache)
        self.trial_id = trial_id
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if is_heartbeat_enabled(self.storage):
            self.storage.record_heartbeat(self.trial_id)  # before any work: never unbeaten
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        while not self.stop.wait(interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # the trial failed as stale meanwhile, or a storage hiccup
                if not self._still_running():
                    return  # nothing to keep up
                # A locked database or a network blip: beat again next interval.

    def _still_running(self) -> bool:
        try:
            return self.storage.get_trial(self.trial_id).state == TrialState.RUNNING
        except Exception:  # the storage is still away: keep trying
            return True

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def say(line: str) -> None:
    """One progress line (one write: lines of workers sharing a terminal stay whole)."""
    sys.stdout.write(f"[{worker_name()}] {line}\n")
    sys.stdout.flush()


def pop_waiting(study: optuna.Study) -> tuple[optuna.Trial, FrozenTrial] | None:
    """Take the first waiting trial of ``study`` (lowest number) that no other worker
    takes first, as Optuna's ``Study.ask`` does, but never create one. A taken trial
    whose point another trial already holds is set aside (``set_aside_duplicate``)."""
    storage = study._storage
    for frozen in storage.get_all_trials(study._study_id, False, (TrialState.WAITING,)):
        try:
            if not storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if not set_aside_duplicate(study, frozen):
            return optuna.Trial(study, frozen._trial_id), frozen
    return None


def set_aside_duplicate(study: optuna.Study, taken: FrozenTrial) -> bool:
    """Set aside the just-taken ``taken`` if its point is finished in another trial, or
    held by a waiting or running one with a lower number; returns whether it did. Two
    workers that join a sweep at the same moment may both queue a point that failed for
    good; of the two copies the lower-numbered one runs, whichever worker takes which
    first."""
    point = _point(taken)
    if not params_of(taken):
        return False  # a sampler's trial: its parameters come later
    for other in study.get_trials(deepcopy=False):
        if other.number == taken.number:
            continue
        held = other.state == TrialState.COMPLETE or (
            other.state in (TrialState.WAITING, TrialState.RUNNING) and other.number < taken.number
        )
        if held and _point(other) == point:
            set_aside(study, taken._trial_id, f"a copy of trial {other.number}")
            return True
    return False


def _point(trial: FrozenTrial) -> dict:
    """What makes a trial's run: its parameters and, in a search or tune (where the seed
    is a user attribute, carried over to a retry), its seed."""
    return {"seed": trial.user_attrs.get("seed"), **params_of(trial)}


def set_aside(study: optuna.Study, trial_id: int, why: str) -> None:
    """Fail a trial this worker took but will not run, saying why (user attribute
    ``SET_ASIDE``): the report counts it apart, and no rerun queues it again."""
    study._storage.set_trial_user_attr(trial_id, SET_ASIDE, why)
    study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def _searched(queue: Queue) -> list[int]:
    """The numbers of the search's own trials (not retries, not set aside)."""
    return [
        t.number
        for t in queue.study.get_trials(deepcopy=False)
        if "failed_trial" not in t.system_attrs and SET_ASIDE not in t.user_attrs
    ]


def ask_search(queue: Queue, spec: plan.SweepSpec) -> optuna.Trial | None:
    """A new trial from the search's sampler while the search has trials left; None
    when it has none. Workers asking at the same moment may each get one past the
    last: those beyond ``spec.trials`` (by number) are set aside."""
    if len(_searched(queue)) >= spec.trials:
        return None
    with warnings.catch_warnings():  # Optuna's hint that `optimize` beats: so do we
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        trial = queue.study.ask()
    if beyond_search(queue, spec, trial.number):
        set_aside(queue.study, trial._trial_id, f"beyond the search's {spec.trials} trials")
        return None
    return trial


def beyond_search(queue: Queue, spec: plan.SweepSpec, number: int) -> bool:
    """Whether the search's trial ``number`` is past its last (``spec.trials``)."""
    return sorted(_searched(queue)).index(number) >= spec.trials


def next_trial(queues: list[Queue], spec: plan.SweepSpec):
    """``(queue, trial, frozen or None)`` to run next, or None if there is none now."""
    for queue in queues:
        with quiet_experimental():
            fail_stale_trials(queue.study)  # a dead worker's trial: failed and queued again
        popped = pop_waiting(queue.study)
        if popped is not None:
            return queue, *popped
    for queue in queues:
        if queue.search:
            trial = ask_search(queue, spec)
            if trial is not None:
                return queue, trial, None
    return None


def running(queues: list[Queue]) -> int:
    return sum(len(q.study.get_trials(False, states=(TrialState.RUNNING,))) for q in queues)


def run_worker(spec: plan.SweepSpec, out, queues: list[Queue], poll_s: float) -> int:
    """Run trials until none is waiting, left to ask for, or running elsewhere; returns
    how many this worker ran."""
    done, waiting = 0, False
    while True:
        clock = StorageClock()
        with clock.timed():
            taken = next_trial(queues, spec)
            others = running(queues) if taken is None else 0
        if taken is None:
            if not others:
                return done
            if not waiting:
                say(f"waiting for {others} trial(s) of other workers (retried here if one dies)")
                waiting = True
            time.sleep(poll_s)
            continue
        waiting = False
        run_one(spec, out, *taken, clock)
        done += 1


def trial_params(spec: plan.SweepSpec, trial: optuna.Trial, frozen: FrozenTrial | None) -> dict:
    """The trial's parameters: the queued ones (grid, references, retries), or suggested
    by the sampler (a new search trial); its seed is a user attribute in a search."""
    fixed = dict(frozen.system_attrs.get("fixed_params") or frozen.params) if frozen else {}
    if "kind" in fixed:  # a grid point or a reference run
        params = {"kind": trial.suggest_categorical("kind", plan.kind_choices(spec))}
        if "tol" in fixed:
            params["tol"] = trial.suggest_float("tol", 0.0, 1.0)
        else:
            params["budget"] = trial.suggest_int("budget", 0, plan.BUDGET_MAX)
        return {**params, "seed": trial.suggest_int("seed", 0, plan.SEED_MAX)}
    if spec.mode == "tune":
        return {**tuned_params(spec, trial), "seed": _seed(spec, trial)}
    params: dict = {"kind": "compressed"}
    if "tol" in spec.search_space:
        params["tol"] = plan.round_sampled(
            trial.suggest_float("tol", *plan.SEARCH_SPACE["tol"], log=True)
        )
    else:
        params["budget"] = trial.suggest_int(
            "budget", min(spec.budgets), max(spec.budgets), log=True
        )
    for key in ("gramian", "heal_steps"):
        if key in spec.search_space:
            params[key] = trial.suggest_categorical(key, plan.SEARCH_SPACE[key])
    return {**params, "seed": _seed(spec, trial)}


def tuned_params(spec: plan.SweepSpec, trial: optuna.Trial) -> dict:
    """A tune trial's PPO settings, suggested by the sampler over ``spec.search_space``."""
    params: dict = {"kind": "tuned", "budget": 0}
    for key in spec.search_space:
        if key == "lr":
            value = trial.suggest_float("lr", *plan.TUNE_SPACE["lr"], log=True)
            params["lr"] = plan.round_sampled(value)
        else:
            params[key] = trial.suggest_categorical(key, plan.tune_choices(spec, key))
    return params


def _seed(spec: plan.SweepSpec, trial: optuna.Trial) -> int:
    """A sampled trial's seed: the sweep's seeds in turn; a retry keeps its trial's (user
    attributes carry over)."""
    seed = trial.user_attrs.get("seed")
    if seed is None:
        seed = spec.seeds[trial.number % len(spec.seeds)]
        trial.set_user_attr("seed", seed)
    return seed


def run_one(spec, out, queue: Queue, trial: optuna.Trial, frozen, clock: StorageClock) -> None:
    """Run ``trial`` under its heartbeat and tell the study how it went."""
    study, start = queue.study, time.perf_counter()
    with Heartbeat(study, trial._trial_id):
        with clock.timed():
            params = trial_params(spec, trial, frozen)
            name = plan.run_name(params)
            trial.set_user_attr("run", name)
            trial.set_user_attr("worker", worker_name())
        retry = frozen.system_attrs.get("failed_trial") if frozen else None
        say(f"trial {trial.number} {name}" + ("" if retry is None else f" (retry of {retry})"))
        try:
            result = run_trial(spec, params, out, say)
        except (TrainingStopped, KeyboardInterrupt) as stopped:  # this worker is stopping
            _requeue(study, trial, name, stopped)
            raise
        except Exception as err:  # this trial's own failure: the worker goes on
            _failed(study, trial, name, err, clock)
            return
    _succeeded(spec, study, trial, name, result, clock, time.perf_counter() - start)


@contextmanager
def _unless_failed_meanwhile(trial: optuna.Trial, name: str):
    """Writes to a trial that another worker failed as stale (its heartbeat came late)
    are refused; its retry re-reads the run's results, so nothing is lost."""
    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        say(f"trial {trial.number} {name}: failed as stale meanwhile; its retry re-reads it")


def _succeeded(spec, study, trial, name: str, result: dict, clock: StorageClock, wall: float):
    """Record the results as user attributes and tell the study the trial's values."""
    x = result["c_p50_us"] if spec.objective == "latency" else result["total_states"]
    with _unless_failed_meanwhile(trial, name):
        with clock.timed():  # one write: each is a transaction (SQLite: ~20 ms)
            trial.set_user_attr(RESULT, {**result, "wall_s": wall})
        trial.set_user_attr("storage_s", clock.seconds)  # what the trial's record can hold
        with clock.timed():
            study.tell(trial, [result["det_return"], float(x)], skip_if_finished=True)
        train = result["train_return"]
        say(
            f"trial {trial.number} {name}: done in {wall:.1f} s: return "
            f"{result['det_return']:.1f} (training {'-' if train is None else f'{train:.1f}'}), "
            f"actor n {result['actor_dims']} = {result['total_states']} states, C p50 "
            f"{result['c_p50_us']:.3g} µs; storage {1e3 * clock.seconds:.0f} ms "
            f"({100 * clock.seconds / wall:.2f}% of the trial)"
        )


def _failed(study, trial, name: str, err: Exception, clock: StorageClock) -> None:
    """Record why the trial failed and tell the study (a rerun of the sweep queues it
    again: ``study.enqueue_missing``)."""
    reason = f"{type(err).__name__}: {_first_line(err)}"
    with _unless_failed_meanwhile(trial, name), clock.timed():
        trial.set_user_attr("error", reason)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        say(f"trial {trial.number} {name}: failed: {reason}")


def _requeue(study, trial, name: str, stopped: BaseException) -> None:
    """A trial stopped by a signal is failed and queued again at once, for the next
    worker (its run kept its last iteration: the next one resumes it)."""
    with _unless_failed_meanwhile(trial, name):
        trial.set_user_attr("error", f"stopped: {_first_line(stopped)}")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        with quiet_experimental():
            RetryHeartbeatStaleTrialCallback()(study, study._storage.get_trial(trial._trial_id))
        say(f"trial {trial.number} {name}: stopped; queued again for the next worker")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
