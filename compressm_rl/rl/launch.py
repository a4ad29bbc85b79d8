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
