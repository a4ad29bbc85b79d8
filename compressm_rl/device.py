"""Where training's learner runs: ``--device cpu|cuda|auto`` (docs/design.md §5).

The device is a property of the machine a run is trained on, not of the run: a
``config.yaml`` that says ``cuda`` still loads (for ``eval``, ``export``, ``report``) on a
machine without CUDA, and ``--resume --device cpu`` continues it there. So ``TrainConfig``
checks only the name; ``resolve_device`` checks that the machine has it, before a run
directory is touched.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``device`` setting: ``auto`` is CUDA where
    ``torch.cuda.is_available()``, else the CPU.

    Raises:
        ValueError: an unknown name, or ``cuda`` on a machine without CUDA (the message
            names the fix).
    """
    if name not in DEVICES:
        raise ValueError(f"device = {name!r} is out of range: one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )
        raise ValueError(
            f"device = 'cuda' but CUDA is not available: {why} (torch {torch.__version__}). "
            "Train on the CPU with --device cpu (or --device auto, which picks CUDA only "
            "where it is available; in a config file: device: cpu)"
        )
    return torch.device(name)
