"""Run a generated C policy (``policy.c`` from ``export.c_codegen``) from Python.

    policy = CPolicy("hopper_c/")           # compiles policy.c with gcc, loads it (ctypes)
    policy.reset()                          # at every episode start
    action = policy.act(obs)                # obs [obs_dim] -> action [act_dim]

The same interface and input contract as ``export.runtime.OnnxPolicy`` (``act``, ``run``,
``reset(mask)``, ``state``, ``metadata``; float inputs cast to float32, NaN/inf and
out-of-range values rejected), so evaluation and the parity check take either. A call
through ``ctypes`` costs ~1 µs, as much as the step itself: time the step with
``export.c_build.bench_c``, inside C. Needs numpy and a C compiler only (no torch, gym, onnx).
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

import numpy as np

from export.c_build import compile_c, read_header_dims, read_metadata, source_dir
from export.runtime import StepPolicy


class CPolicy(StepPolicy):
    """A generated C policy step, compiled and loaded, holding its recurrent state.

    Args:
        path: the export directory, its ``policy.c``, or a shared library built from it
            (loaded as is; its ``policy.c`` beside it gives the metadata).
        batch_size: rows per ``act`` call (the C step runs once per row).
        validate: check every ``act`` input for NaN/inf.
        flags: compiler flags (``export.c_build.HOST_FLAGS`` by default).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int = 1,
        validate: bool = True,
        flags: list[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.sources = source_dir(self.path)
        meta = read_metadata(self.sources)
        header = read_header_dims(self.sources)
        recorded = tuple(int(meta[k]) for k in ("obs_dim", "act_dim", "state_size"))
        if header != recorded:
            raise ValueError(
                f"{self.sources}: policy.h declares (obs, action, state) dims {header} but "
                f"policy.c was generated for {recorded}; re-export the directory"
            )
        if self.path.suffix in (".so", ".dylib", ".dll"):
            self._lib = ctypes.CDLL(str(self.path))
        else:
            with tempfile.TemporaryDirectory(prefix="compressm-c-") as tmp:
                library = compile_c(
                    self.sources, Path(tmp) / "libpolicy.so", flags=flags, shared=True
                )
                self._lib = ctypes.CDLL(str(library))  # stays mapped after the file is gone
        self._step = self._lib.policy_step
        self._step.argtypes = [ctypes.c_void_p] * 4
        self._step.restype = None
        super().__init__(meta, batch_size, validate)

    def _compute(
        self, obs: np.ndarray, state: np.ndarray, action: np.ndarray, state_out: np.ndarray
    ) -> None:
        """One C step per row of the float32 C-contiguous buffers."""
        step, null = self._step, None
        for row in range(obs.shape[0]):
            step(
                obs[row].ctypes.data,
                state[row].ctypes.data if state.shape[1] else null,
                action[row].ctypes.data,
                state_out[row].ctypes.data if state.shape[1] else null,
            )

    @property
    def provider(self) -> str:
        return "C (ctypes)"
