"""``compressm-rl sweep``: how far to compress, decided over many runs and seeds, with the
trials shared by any number of worker processes through an Optuna study.

One module per job:

    plan.py      the sweep's settings (stored in the study), its trials' parameters, run
                 directories and configs
    study.py     the storage (SQLAlchemy URL or journal file, with heartbeats) and the study
                 every worker joins; the grid queued once
    worker.py    a worker's loop: take a trial, run it under a heartbeat, tell the study
    trials.py    one trial: train (or resume, or wait for) its run, evaluate it, export it
                 to C and time the C step
    stats.py     training return, bootstrap intervals over seeds, where two runs parted
    report.py    pareto.md and pareto.png
    tune_report.py  a tune's tune.md and tune.png
    command.py   the command line

Nothing heavy is imported here: ``compressm-rl --help`` imports ``command`` alone.
"""
