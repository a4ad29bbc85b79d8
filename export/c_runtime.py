"""Run a generated C policy (``policy.c`` from ``export.c_codegen``) from Python.

    policy = CPolicy("hopper_c/")           # compiles policy.c with gcc, loads it (ctypes)
    policy.reset()                          # at every episode start
    action = policy.act(obs)                # obs [obs_dim] -> action [act_dim]

The same interface and input contract as ``export.runtime.OnnxPolicy`` (``act``, ``run``,
``reset(mask)``, ``state``, ``metadata``, ``safe_action``, ``last_status``; float inputs
cast to float32; NaN/inf inputs and non-finite results raise ValueError, or with
``validate=False`` give the C step's safe outputs), so evaluation and the parity check take
either. A call through ``ctypes`` costs ~1 µs, as much as the step itself: time the step
with ``export.c_bench.bench_c``, inside C. Needs numpy and a C compiler only (no torch,
gym, onnx).
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from export.c_build import (
    HEADER_NAME,
    check_weights_finite,
    compile_c,
    read_header_dims,
    read_metadata,
    source_dir,
)
from export.runtime import StepPolicy

LIBRARY_SUFFIXES = (".so", ".dylib", ".dll")


class CPolicy(StepPolicy):
    """A generated C policy step, compiled and loaded, holding its recurrent state.

    Args:
        path: the export directory, its ``policy.c``, or a shared library built from it
            (that file exactly, relative to the working directory or absolute: never
            looked up on the dynamic loader's search path; its ``policy.c`` beside it gives
            the metadata).
        batch_size: rows per ``act`` call (the C step runs once per row).
        validate: True: NaN/inf in an input, or a non-finite result, raises ValueError
            (the held state is left as it was). False: no checks in Python; such rows get
            the C step's safe outputs (``safe_action``, zero state) and their code in
            ``last_status`` (``export.runtime.StepPolicy``).
        flags: compiler flags (``export.c_build.HOST_FLAGS``, portable, by default;
            ``NATIVE_FLAGS`` for this machine's full instruction set).

    Raises:
        FileNotFoundError: no sources, or no shared library at ``path``.
        ValueError: the sources are not a compressm-rl export of this version, or their
            weights are not all finite.
        export.c_build.ToolchainError: ``policy.c`` does not compile (the message names the
            file and the compiler's first error).
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
        if not re.search(r"^int policy_step\(", (self.sources / HEADER_NAME).read_text(), re.M):
            raise ValueError(
                f"{self.sources / HEADER_NAME} does not declare `int policy_step(...)`: an "
                f"export from an older compressm-rl, without the non-finite input contract; "
                f"re-export it with `compressm-rl export RUN_DIR --format c --out DIR`"
            )
        check_weights_finite(self.sources)
        if self.path.suffix in LIBRARY_SUFFIXES:
            # An absolute path: dlopen searches its path list only for a bare name.
            library = self.path.absolute()
            if not library.is_file():
                raise FileNotFoundError(f"no shared library at {library}")
            self._lib = ctypes.CDLL(str(library))
        else:
            with tempfile.TemporaryDirectory(prefix="compressm-c-") as tmp:
                library = compile_c(
                    self.sources, Path(tmp) / "libpolicy.so", flags=flags, shared=True
                )
                self._lib = ctypes.CDLL(str(library))  # stays mapped after the file is gone
        self._step = self._lib.policy_step
        self._step.argtypes = [ctypes.c_void_p] * 4
        self._step.restype = ctypes.c_int
        super().__init__(meta, batch_size, validate)

    def _compute(
        self, obs: np.ndarray, state: np.ndarray, action: np.ndarray, state_out: np.ndarray
    ) -> np.ndarray | None:
        """One C step per row of the float32 C-contiguous buffers; the rows' return codes
        (None if all are ``POLICY_OK``)."""
        step, null, status = self._step, None, None
        for row in range(obs.shape[0]):
            code = step(
                obs[row].ctypes.data,
                state[row].ctypes.data if state.shape[1] else null,
                action[row].ctypes.data,
                state_out[row].ctypes.data if state.shape[1] else null,
            )
            if code:
                status = np.zeros(obs.shape[0], np.int32) if status is None else status
                status[row] = code
        return status

    @property
    def provider(self) -> str:
        return "C (ctypes)"
