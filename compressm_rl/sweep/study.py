"""Where a sweep's trials live: the Optuna storage (opened and checked before anything
runs) and the study every worker joins.

Storage URLs: none (``sqlite:///OUT/study.db``), any SQLAlchemy URL (``sqlite:///...``,
``postgresql://...``, ``mysql://...``: workers on many machines share a database server),
or a journal file (``journal:PATH``, or a path ending in ``.log``: workers on machines
that share a file system, no server). Both kinds keep heartbeats: a running trial
whose worker stops beating for ``GRACE_BEATS`` intervals (killed, its machine gone), or
never beat, is failed by the next worker that looks and queued again (Optuna's
``RetryHeartbeatStaleTrialCallback``), and that worker resumes its run directory.
Optuna's journal storage keeps no heartbeats in 5.1; ``HeartbeatJournalStorage`` adds
them as a trial system attribute (each worker's clock: keep machines within a few
seconds of each other, NTP does).

Joining is decided by the storage: the one worker whose ``create_study`` succeeds (a
unique study name in the database, the first record in the journal) writes the sweep's
settings and queues the grid; the others load the study, wait for the queue, and check
that their settings are the sweep's.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import optuna
from optuna.samplers import NSGAIISampler, TPESampler
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # what a storage with heartbeats is
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from compressm_rl.sweep.plan import SweepSpec, grid_points, reference_points

DEFAULT_DB = "study.db"
DIRECTIONS = ("maximize", "minimize")  # return; total states or the C step's p50
GRACE_BEATS = 4  # a trial silent this many heartbeat intervals is failed and retried
MAX_RETRY = 3  # retries of one trial whose workers keep dying
HEARTBEAT = "heartbeat"  # the journal's heartbeat: a trial system attribute (epoch s)
SPEC, QUEUED = "sweep", "queued"  # study user attributes: the settings, the grid queued
SET_ASIDE = "set_aside"  # a trial's user attribute: why a worker took it but never ran it
RESULT = "result"  # a finished trial's user attribute: its measurements (a dict)
JOIN_WAIT_S = 60.0  # how long a joining worker waits for the first to queue the grid


@contextmanager
def quiet_experimental():
    """Optuna's heartbeat API is marked experimental: the sweep relies on it knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def storage_url(given: str | None, out: Path) -> str:
    """The storage URL: ``given``, else the SQLite file in the sweep's directory."""
    return given or f"sqlite:///{Path(out).resolve() / DEFAULT_DB}"


def journal_path(url: str) -> Path | None:
    """The journal file of a ``journal:PATH`` or ``*.log`` storage, else None."""
    if url.startswith("journal:"):
        return Path(url[len("journal:") :])
    return Path(url) if url.endswith(".log") and "://" not in url else None


def shown_url(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    if journal_path(url) is not None:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable: the open reports that
        return url


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with heartbeats: a trial's last beat is its system
    attribute ``heartbeat`` (epoch seconds on the beating worker's clock); a running
    trial whose last beat (or start, before its first) is ``grace_period`` seconds old
    is stale."""

    def __init__(self, backend, heartbeat_interval: int, grace_period: int, callback) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.callback = callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A retried trial carries its predecessor's beat: its own start counts too.
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            last = max(float(trial.system_attrs.get(HEARTBEAT, 0.0)), started)
            if now - last > self.grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.callback


class HeartbeatRDBStorage(RDBStorage):
    """Optuna's RDB storage, whose stale trials also include a running trial that never
    beat: a worker stopped between taking a trial and its first beat (milliseconds, but
    a Ctrl-C can land there) would otherwise leave it running for good, and every other
    worker waiting for it. Its start (``datetime_start``, stamped by the taking worker's
    local clock, as Optuna stamps it: workers in one time zone) stands for its beat.
    Reads Optuna's heartbeat table, which 5.1 keeps private."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy.orm import selectinload

        stale = super()._get_stale_trial_ids(study_id)
        grace = timedelta(seconds=self.grace_period or 2 * (self.heartbeat_interval or 0))
        now = datetime.now()  # the clock `set_trial_state_values` stamps a start with
        with _create_scoped_session(self.scoped_session) as session:
            running = (
                session.query(models.TrialModel)
                .options(selectinload(models.TrialModel.heartbeats))
                .filter(models.TrialModel.state == TrialState.RUNNING)
                .filter(models.TrialModel.study_id == study_id)
                .all()
            )
            for trial in running:
                started = trial.datetime_start
                if not trial.heartbeats and started is not None and now - started > grace:
                    stale.append(trial.trial_id)
        return stale


def open_storage(url: str, heartbeat: int | None, out: Path) -> BaseStorage:
    """Open (creating its tables or file) and check the storage at ``url``, with
    heartbeats every ``heartbeat`` seconds (None: none, for reading a finished sweep).
    Raises a one-line ``ValueError`` naming the URL and the fix if it cannot be opened."""
    grace = None if heartbeat is None else GRACE_BEATS * heartbeat
    with quiet_experimental():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        try:
            path = journal_path(url)
            if path is not None:
                backend = JournalFileBackend(str(path))  # creates the file
                if heartbeat is None:
                    return JournalStorage(backend)
                return HeartbeatJournalStorage(backend, heartbeat, grace, retry)
            beats = {}
            if heartbeat is not None:
                beats = dict(heartbeat_interval=heartbeat, grace_period=grace)
                beats["heartbeat_stale_trial_callback"] = retry
            # SQLite: wait for another worker's write rather than fail at once.
            engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
            return _rdb_storage(url, engine, beats)
        except Exception as err:  # sqlalchemy's, a missing driver, the OS's: one line
            reason = _first_line(getattr(err, "orig", None) or err)
            if isinstance(err, ImportError) and err.__cause__ is not None:  # which driver
                reason = f"{reason.rstrip('.')} ({_first_line(err.__cause__)})"
            raise ValueError(
                f"cannot open the study storage {shown_url(url)}: {reason}; give a reachable "
                f"--storage (a running database server with its driver installed, a SQLite "
                f"or journal file in a writable directory), or leave it out for "
                f"sqlite:///{Path(out) / DEFAULT_DB}"
            ) from None


# What a worker sees when another creates the same database's tables at the same moment
# (Optuna makes them on first connection, with no lock between processes: optuna#1092).
_CREATION_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key")


def _rdb_storage(url: str, engine: dict | None, beats: dict, attempts: int = 5) -> RDBStorage:
    """``HeartbeatRDBStorage(url)``, which connects and makes the tables; tried again,
    after a short wait, when another worker was making them at the same moment."""
    for attempt in range(attempts):
        try:
            return HeartbeatRDBStorage(url, engine_kwargs=engine, **beats)
        except Exception as err:
            raced = any(text in str(err) for text in _CREATION_RACE)
            if not raced or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))  # the other worker's tables are then in place
    raise AssertionError("unreachable")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_study(storage: BaseStorage, name: str) -> optuna.Study:
    """The existing study ``name``; a one-line ``ValueError`` if there is none."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = ", ".join(optuna.get_all_study_names(storage)) or "none"
        raise ValueError(
            f"no study {name!r} in this storage (studies there: {known}); start it with "
            "--env and the grid (--budgets, --seeds) or --search N, or name it with --study"
        ) from None


def reference_name(name: str) -> str:
    """A search's second study: the full reference runs, queued as a grid is."""
    return f"{name}-full"


def join_sweep(
    storage: BaseStorage, name: str, spec: SweepSpec | None
) -> tuple[list[tuple[optuna.Study, bool]], SweepSpec]:
    """Join (or start) the sweep ``name``: its studies, each with whether the worker may
    ask its sampler for new trials (the search), and its settings."""
    study, spec = join_study(storage, name, spec, grid_points)
    if spec.mode == "grid":
        return [(study, False)], spec
    if spec.mode == "tune":  # RL Zoo's sampler; the runs are their own references
        # Unseeded, as NSGA-II: seeded alike, every worker would ask for the same settings.
        study.sampler = TPESampler(n_startup_trials=max(1, min(10, spec.trials // 3)))
        return [(study, True)], spec
    population = max(2, min(50, spec.trials // 4))  # a few generations even in short searches
    study.sampler = NSGAIISampler(population_size=population)
    reference, _ = join_study(storage, reference_name(name), spec, reference_points)
    return [(reference, False), (study, True)], spec


def sweep_studies(storage: BaseStorage, name: str) -> tuple[SweepSpec, list[optuna.Study]]:
    """An existing sweep's settings and studies (for its report)."""
    study = load_study(storage, name)
    if SPEC not in study.user_attrs:
        raise ValueError(f"study {name!r} holds no sweep settings: it is not a sweep's study")
    spec = SweepSpec.from_dict(study.user_attrs[SPEC])
    if spec.mode in ("grid", "tune"):
        return spec, [study]
    return spec, [load_study(storage, reference_name(name)), study]


def describe(studies: list[optuna.Study]) -> str:
    """How many trials of each state the sweep's studies hold, e.g. ``3 waiting, 1 running``
    (trials set aside unrun apart from the failed)."""
    counts: dict[str, int] = {}
    for study in studies:
        for trial in study.get_trials(deepcopy=False):
            state = "set aside" if SET_ASIDE in trial.user_attrs else trial.state.name.lower()
            counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no trials yet"


def join_study(
    storage: BaseStorage, name: str, spec: SweepSpec | None, points_of: Callable
) -> tuple[optuna.Study, SweepSpec]:
    """Create the study ``name`` and queue ``points_of(spec)`` (the first worker), or join
    it and check that ``spec`` is its sweep (the others; ``spec`` None: take the
    study's). Returns the study and its spec. Points that no trial holds any more (failed
    for good) are queued again, so a sweep run again fills its holes; a grid joined with
    more budgets, tols, seeds or methods (``SweepSpec.extended_by``) becomes that grid."""
    created = False
    if spec is not None:
        try:
            study = optuna.create_study(
                storage=storage, study_name=name, directions=list(DIRECTIONS)
            )
            study.set_user_attr(SPEC, spec.to_dict())
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = load_study(storage, name)
    else:  # a worker joining without the settings may start before the first one
        deadline = time.monotonic() + JOIN_WAIT_S
        while name not in optuna.get_all_study_names(storage) and time.monotonic() < deadline:
            time.sleep(0.5)
        study = load_study(storage, name)
    saved = _wait_for(study, SPEC)
    if saved is None:
        raise ValueError(f"study {name!r} holds no sweep settings: it is not a sweep's study")
    saved = SweepSpec.from_dict(saved)
    if spec is not None and not created:
        differ = saved.differences(spec)
        if differ and saved.extended_by(spec):  # the grid grows: its new points are queued
            _wait_for(study, QUEUED)
            study.set_user_attr(SPEC, spec.to_dict())
            saved, differ = spec, []
        if differ:
            raise ValueError(
                f"study {name!r} is a sweep of other settings ({', '.join(differ)} differ); "
                "join it with its own settings (or with --out and --study alone), or start "
                "another with --study"
            )
    if not created:
        _wait_for(study, QUEUED)  # the first worker queues the grid (once, in order)
    spec = spec or saved
    enqueue_missing(study, points_of(spec))
    if study.user_attrs.get(QUEUED) is None:
        study.set_user_attr(QUEUED, True)
    return study, spec


def _wait_for(study: optuna.Study, key: str):
    """The study's user attribute ``key``, waited for up to ``JOIN_WAIT_S`` (the worker
    that created the study writes it next); None if it never came."""
    deadline = time.monotonic() + JOIN_WAIT_S
    while True:
        value = study.user_attrs.get(key)
        if value is not None or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def enqueue_missing(study: optuna.Study, points: list[dict]) -> int:
    """Queue each of ``points`` that no waiting, running or finished trial holds (by its
    parameters); returns how many were queued."""
    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    held = [params_of(t) for t in study.get_trials(deepcopy=False, states=live)]
    missing = [p for p in points if p not in held]
    for params in missing:
        study.enqueue_trial(params)
    return len(missing)


def params_of(trial) -> dict:
    """A trial's parameters: its own, or the fixed ones it was queued with."""
    return dict(trial.system_attrs.get("fixed_params") or trial.params)


def results_of(trial) -> dict:
    """A finished trial's user attributes with its measurements (``RESULT``) spread
    among them, as earlier sweeps wrote them (one attribute each)."""
    attrs = dict(trial.user_attrs)
    return {**attrs.pop(RESULT, {}), **attrs}
