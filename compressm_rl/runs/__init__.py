"""Run directories. A run directory holds::

    config.yaml        every setting of the run (TrainConfig), PPO and compression resolved
    metrics.csv        one row per PPO iteration (MetricsLog)
    checkpoint.pt      latest state (TrainingState: policy, optimiser, normalisers, RNG, step)
    compression.json   reduction events (EventLog), with hsv_K.png per reduction point
    report.md          after `compressm-rl report`, with learning_curve.png
    .lock              held while a process trains here

One module per file kind; ``files`` has the atomic write and the lock they share.
"""

from compressm_rl.runs.checkpoint import (
    TrainingState,
    load_checkpoint,
    load_policy,
    save_checkpoint,
)
from compressm_rl.runs.config import TrainConfig, load_config, save_config
from compressm_rl.runs.evaluate import Controller, TorchController, evaluate, load_controller
from compressm_rl.runs.events import EventLog
from compressm_rl.runs.files import RunDirectoryBusy, locked_run_dir
from compressm_rl.runs.metrics import MetricsLog

__all__ = [
    "Controller",
    "EventLog",
    "MetricsLog",
    "RunDirectoryBusy",
    "TorchController",
    "TrainConfig",
    "TrainingState",
    "evaluate",
    "load_checkpoint",
    "load_config",
    "load_controller",
    "load_policy",
    "locked_run_dir",
    "save_checkpoint",
    "save_config",
]
