"""``compressm-rl train --nproc N``'s launcher: torchrun's engine (``torch.distributed.run``),
called in-process so that a job ends like a one-process run.

- It dies with the command that started it (``PR_SET_PDEATHSIG``: SIGTERM, which it passes
  on to the ranks, which save and exit), and so do the ranks with it.
- A stop (SIGINT / SIGTERM) exits 130 / 143 and a failed rank exits with the rank's own
  status, each without torchrun's traceback: the ranks print their own one-line message
  (a rank killed by a signal nobody sent is named here, in one line).

Run as ``python -m compressm_rl.rl.launch TORCHRUN_ARGS...`` with
``COMPRESSM_RL_LAUNCHER_PID`` set to the launching process's pid.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from compressm_rl.rl.process import die_with_parent

LAUNCHER_PID = "COMPRESSM_RL_LAUNCHER_PID"


def wants_ranks(nproc: int | None) -> bool:
    """Whether a command asking for ``nproc`` ranks must launch them (it is not one of them
    yet). ValueError when ``nproc`` is not 1 to the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if nproc is not None and not 1 <= nproc <= (cpus or 1):
        raise ValueError(
            f"--nproc = {nproc} is out of range: 1 to {cpus}, the CPUs this process may "
            "use (each rank steps its own envs and model; more ranks than cores only "
            "time-share them, and each holds its own memory)"
        )
    return (nproc or 1) > 1 and "WORLD_SIZE" not in os.environ


def launch_ranks(argv: list[str], nproc: int) -> int:
    """Run ``compressm-rl ARGV`` (without its ``--nproc``) as ``nproc`` ranks through this
    module on the loopback address; returns the job's exit status. The settings were
    checked by the caller first."""
    import subprocess

    from compressm_rl.rl.distributed import free_loopback_port

    command_argv, skip = [], False
    for arg in argv:  # the command as given, without --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            command_argv.append(arg)
    command = [sys.executable, "-m", "compressm_rl.rl.launch", "--nnodes", "1"]
    command += ["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(free_loopback_port()), "-m", "compressm_rl.cli"]
    command += command_argv
    # torchrun in its own session: a Ctrl-C reaches this process only, which passes it on
    # once, and torchrun gives each rank exactly one signal (it sends SIGKILL itself after
    # its shutdown timeout). subprocess.run would kill torchrun 0.25 s after a SIGINT and
    # orphan the ranks mid-save.
    env = {**os.environ, LAUNCHER_PID: str(os.getpid())}  # it dies with this process
    launcher = subprocess.Popen(command, start_new_session=True, env=env)

    def pass_on(signum: int, _frame) -> None:
        launcher.send_signal(signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = launcher.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status  # 130 / 143 after a stop, as a shell reports it (main)


def main(argv: list[str]) -> int:
    parent = os.environ.get(LAUNCHER_PID)
    die_with_parent(signal.SIGTERM, int(parent) if parent else None)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's own notices (OMP threads, shutting down workers) are not the user's news;
    # its loggers set their own levels, so each one is lowered. The ranks set their torch
    # threads themselves (TrainConfig.torch_threads); 1 is torchrun's default too.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        run(parse_args(argv))
    except SignalException as stop:
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        if failed.failures.get(0) is not None:  # rank 0 speaks for the job (the others
            rank, failure = 0, failed.failures[0]  # may only have lost it)
        if failure.exitcode >= 0:
            return failure.exitcode  # the rank said why itself
        name = signal.Signals(-failure.exitcode).name
        print(f"error: rank {rank} was killed by {name}", file=sys.stderr)
        return 128 - failure.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
