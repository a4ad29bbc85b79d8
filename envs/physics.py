"""``mj_step`` of N envs on several threads: one C call per vector step, GIL released.

A Hopper-v5 8-env step spends ~0.9-1 ms in ``mj_step`` (4 RK4 frames, ~115 µs an env),
and a training process runs it on one core. Python threads cannot split it: each
``mj_step`` call hands the GIL back and forth (a 2-thread Python pool: 1.1-1.3×). Nor can
threads started per step: on the EPYC VM waking a thread on the other vCPU costs about as
much as the work handed to it (2 threads no faster than 1 at 4 frames, 1.7× at 400).

:class:`ParallelPhysics` hands all N ``(mjModel*, mjData*)`` pairs to a small C function
that runs contiguous slices of the envs on a pool of helper threads (started on first
use, kept for the process) and the calling thread, each calling MuJoCo's own ``mj_step``
on its envs' own data. Every env is stepped by the same function on the same data in the
same order, so the result is bit-identical to the loop (``tests/test_envs.py``).

After a job a helper spins for up to 2 ms (the rollout's Python between two physics
calls is ~0.3-0.5 ms) and then sleeps until the next (through the PPO update). The spin
is why this is opt-in (``physics_threads``, default 1): it pays only where the process
has that many cores to itself. More spinning threads than cores made a 1 ms step take
8 ms (4 on 2 cores, before the spin yielded the core), so :func:`parallel_physics` never
starts more threads than the CPUs the process may run on (its affinity; a cgroup quota
is not seen); two training processes sharing two cores should keep one thread each.

On the pool's threads ``mj_step`` runs outside the bindings' error handling: a MuJoCo
fatal error (which Gymnasium's tasks do not raise) would end the process instead of
raising ``mujoco.FatalError``, and Python ``mjcb_*`` callbacks must not be set.

The C source is built once with the host's C compiler (``cc``, or ``$CC``) into the
user's cache directory, keyed by its hash, platform and compiler, and loaded with ctypes,
whose calls release the GIL. The cache directory is opened once without following a
symbolic link and used through that descriptor; it, and the library in it, must be the
user's own and writable by no one else, and the library is loaded through the descriptor
that was checked, so another user can neither plant nor swap in code (a shared ``/tmp``
with ``fs.protected_symlinks=0`` included). Where that is not possible (no compiler, no
POSIX threads, MuJoCo's library not found, a cache directory or library that fails those
checks), :func:`parallel_physics` returns None with the reason and the envs step one by
one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import platform
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import mujoco

C_SOURCE = r"""
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ volatile("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

typedef void (*mj_step_fn)(const void *m, void *d);
enum { MAX_THREADS = 64 };
static const double SPIN_SECONDS = 2e-3; /* then sleep: longer than a rollout step's Python */

static struct {
  pthread_mutex_t call, lock; /* call: one job at a time; lock: goes with `wake` */
  pthread_cond_t wake;
  int helpers;                /* started helper threads, slices 1 .. helpers */
  atomic_uint generation;     /* bumped once per job */
  atomic_int pending;         /* helpers still on the current job */
  atomic_int sleeping;
  mj_step_fn step;
  void *const *models;
  void *const *datas;
  int n, nstep, threads;
} pool = {.call = PTHREAD_MUTEX_INITIALIZER,
          .lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER};

typedef struct { int slice; unsigned seen; } start_t;
static start_t starts[MAX_THREADS];

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int fork_safe; /* the child handler below is registered */

static void forget_helpers(void) { /* in a forked child: the helpers were not copied */
  pthread_mutex_init(&pool.call, 0);
  pthread_mutex_init(&pool.lock, 0);
  pthread_cond_init(&pool.wake, 0);
  pool.helpers = 0;
  atomic_store(&pool.sleeping, 0);
}

__attribute__((constructor)) static void register_fork_handler(void) {
  fork_safe = pthread_atfork(0, 0, forget_helpers) == 0;
}

static void run_slice(int slice) { /* envs [n*slice/threads, n*(slice+1)/threads) */
  int begin = pool.n * slice / pool.threads, end = pool.n * (slice + 1) / pool.threads;
  for (int i = begin; i < end; ++i)
    for (int k = 0; k < pool.nstep; ++k) pool.step(pool.models[i], pool.datas[i]);
}

static void *helper(void *arg) {
  const start_t *start = (const start_t *)arg;
  unsigned seen = start->seen; /* the generation before this helper's first job */
  for (;;) {
    double until = now() + SPIN_SECONDS;
    while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen) {
      for (int i = 0; i < 64; ++i) CPU_RELAX();
      sched_yield(); /* a core another process wants is given up */
      if (now() < until) continue;
      pthread_mutex_lock(&pool.lock); /* idle for long (the PPO update): sleep */
      atomic_fetch_add(&pool.sleeping, 1);
      while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
      atomic_fetch_sub(&pool.sleeping, 1);
      pthread_mutex_unlock(&pool.lock);
    }
    seen = atomic_load(&pool.generation);
    if (start->slice < pool.threads) run_slice(start->slice);
    atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
  }
  return 0;
}

/* Steps env i (models[i], datas[i]) nstep times, the envs split in contiguous slices over
   `threads` threads, this one included; returns how many threads ran. */
int step_all(mj_step_fn step, void *const *models, void *const *datas, int n, int nstep,
             int threads) {
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads > n) threads = n;
  if (threads <= 1 || !fork_safe) {
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < nstep; ++k) step(models[i], datas[i]);
    return 1;
  }
  pthread_mutex_lock(&pool.call);
  while (pool.helpers < threads - 1) {
    start_t *start = &starts[pool.helpers + 1];
    start->slice = pool.helpers + 1;
    start->seen = atomic_load(&pool.generation);
    pthread_t id;
    if (pthread_create(&id, 0, helper, start)) break;
    pthread_detach(id);
    ++pool.helpers;
  }
  if (threads > pool.helpers + 1) threads = pool.helpers + 1;
  pool.step = step, pool.models = models, pool.datas = datas;
  pool.n = n, pool.nstep = nstep, pool.threads = threads;
  atomic_store(&pool.pending, pool.helpers);
  pthread_mutex_lock(&pool.lock);
  atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
  if (atomic_load(&pool.sleeping)) pthread_cond_broadcast(&pool.wake);
  pthread_mutex_unlock(&pool.lock);
  run_slice(0);
  while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) sched_yield();
  pthread_mutex_unlock(&pool.call);
  return threads;
}
"""


class ParallelPhysics:
    """``step(nstep)`` runs ``mj_step`` ``nstep`` times on every ``(model, data)`` in
    ``sims``, the envs split over ``threads`` threads. Holds the raw pointers: the
    ``MjModel``/``MjData`` objects must outlive it (the envs own them)."""

    def __init__(self, library: ctypes.CDLL, sims: list, threads: int) -> None:
        self._step_all = library.step_all
        self._mj_step = ctypes.cast(_mujoco_library().mj_step, ctypes.c_void_p)
        self._models = (ctypes.c_void_p * len(sims))(*(m._address for m, _ in sims))
        self._datas = (ctypes.c_void_p * len(sims))(*(d._address for _, d in sims))
        self._n, self.threads = len(sims), threads
        self._sims = sims  # keeps the objects the pointers point into alive

    def step(self, nstep: int) -> None:
        self._step_all(self._mj_step, self._models, self._datas, self._n, nstep, self.threads)


def parallel_physics(sims: list, threads: int) -> tuple[ParallelPhysics | None, str]:
    """A :class:`ParallelPhysics` for ``sims`` on at most ``threads`` threads (and no more
    than the envs, or the CPUs this process may run on), or None and why not."""
    if threads <= 1:
        return None, "one thread asked for"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if min(len(sims), cpus or 1) <= 1:
        why = "one env" if len(sims) <= 1 else "one CPU available to this process"
        return None, f"physics_threads = {threads} ignored: {why}; stepping env by env"
    threads = min(threads, len(sims), cpus)
    try:
        return ParallelPhysics(_build(), sims, threads), ""
    except (OSError, RuntimeError, AttributeError) as error:
        return None, f"the threaded physics step is unavailable ({error}); stepping env by env"


@functools.cache
def _mujoco_library() -> ctypes.CDLL:
    """MuJoCo's shared library as the ``mujoco`` bindings loaded it (their extension links
    it, so ``mj_step`` resolves to the same code and the same global state)."""
    return ctypes.CDLL(mujoco._functions.__file__)


_library: ctypes.CDLL | None = None


def _cache_directory() -> tuple[int, Path]:
    """An open descriptor of ``$XDG_CACHE_HOME/compressm-rl`` (``~/.cache``), or of a
    per-user temporary one where that cannot be created, and its path (for messages).

    The directory is opened once, without following a symbolic link, and checked through
    the descriptor (a directory, this user's, writable by nobody else); everything after
    works relative to that descriptor, so swapping the path afterwards changes nothing.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compressm-rl"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _make_private_directory(cache)
    except OSError:  # no writable home directory
        cache = Path(tempfile.gettempdir()) / f"compressm-rl-{os.getuid()}"
        _make_private_directory(cache)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(cache, flags)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(
                f"the build cache {cache} is a symbolic link or not a directory; refusing to "
                "use it (remove it, or point XDG_CACHE_HOME at a directory of your own)"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise OSError(f"the build cache {cache} belongs to another user; refusing to use it")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(
                f"the build cache {cache} is writable by other users; refusing to use it "
                f"(chmod go-w {shlex.quote(str(cache))})"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, cache


def _make_private_directory(path: Path) -> None:
    """``mkdir path`` (mode 0700) unless something is already there: a symbolic link is
    left as it is (not followed) and refused when opened."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _open_library(directory: int, name: str, where: Path) -> int | None:
    """A descriptor of the built library ``name`` in the open ``directory``, opened without
    following a link and checked (a regular file of this user's, writable by nobody else),
    or None where there is none yet."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(f"{where / name} is a symbolic link; refusing to load it") from None
        raise
    info = os.fstat(fd)
    problem = (
        "is not a regular file"
        if not stat.S_ISREG(info.st_mode)
        else "belongs to another user"
        if info.st_uid != os.getuid()
        else "is writable by other users"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        else None
    )
    if problem:
        os.close(fd)
        raise OSError(f"{where / name} {problem}; refusing to load it (delete it to rebuild)")
    return fd


def _compile(compiler: list[str], directory: int, name: str) -> None:
    """Compile ``C_SOURCE`` in a private temporary directory and put the library in the
    open cache ``directory`` as ``name``: written under a fresh name there, then renamed
    over ``name`` (atomic: a concurrent build leaves one whole file)."""
    with tempfile.TemporaryDirectory(prefix="compressm-rl-build-") as tmp:  # mode 0700
        source, built = Path(tmp) / "step_all.c", Path(tmp) / "step_all.so"
        source.write_text(C_SOURCE)
        flags = ["-O2", "-shared", "-fPIC", "-pthread"]
        command = [*compiler, *flags, str(source), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler[0]} failed: {result.stderr.strip()[-400:]}")
        data = built.read_bytes()
    partial = f".{name}.{os.getpid()}.{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(partial, flags, 0o700, dir_fd=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(partial, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial, dir_fd=directory)
        raise


def _build() -> ctypes.CDLL:
    """Compile ``C_SOURCE`` once per source and machine into the cache and load it."""
    global _library
    if _library is not None:
        return _library
    if not sys.platform.startswith(("linux", "darwin")):
        raise RuntimeError("POSIX threads are needed")
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc")]
    if compiler[0] is None:
        raise RuntimeError("no C compiler (cc) on PATH; install gcc or set CC")
    # One build per source, platform and compiler (a home directory may be shared).
    key = f"{C_SOURCE}{sys.platform}{platform.machine()}{compiler}"
    name = f"step_all-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    directory, where = _cache_directory()
    try:
        fd = _open_library(directory, name, where)
        if fd is None:
            _compile(compiler, directory, name)
            fd = _open_library(directory, name, where)
            if fd is None:
                raise OSError(f"{where / name} vanished after it was built")
    finally:
        os.close(directory)
    # Load the very file checked above, through its descriptor: nothing can be swapped in
    # between. The descriptor stays open for the process, so the loader (which recognises
    # a library already loaded by its path) never meets this path naming another file.
    if Path(f"/proc/self/fd/{fd}").exists():
        path = f"/proc/self/fd/{fd}"
    else:  # no /proc (macOS): by name, in a directory only this user can write to
        path = str(where / name)
    try:
        library = ctypes.CDLL(path)
    except BaseException:
        os.close(fd)
        raise
    library.step_all.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
    library.step_all.restype = ctypes.c_int
    _library = library
    return library
