"""Run an exported policy with onnxruntime alone (numpy + onnxruntime, no torch, no gym).

    policy = OnnxPolicy("hopper.onnx")
    policy.reset()                          # at every episode start
    action = policy.act(obs)                # obs [obs_dim] -> action [act_dim]

``OnnxPolicy`` owns the recurrent state ``[batch_size, S]`` and feeds it back each step; an
MLP export has no state (``state_size == 0``) and the same interface. The session is tuned
for single-sample latency: one intra-op and one inter-op thread, sequential execution,
spinning off (a spinning pool burns a core between control steps), all graph optimisations,
and by default IOBinding onto preallocated buffers (skips ``run()``'s per-call allocation
and dict handling: ~4 µs of ~18 µs for a 2-layer n=128 LRU on one Xeon core).

Input convention for ``act``: float32 is used as is; other floating dtypes (float64 from
gymnasium, float16) are cast to float32 silently; integer, bool, complex and object arrays
are rejected with a ValueError, as are wrong shapes.

Non-finite values, the same in ``OnnxPolicy`` and ``export.c_runtime.CPolicy`` (and the
generated C step's contract, ``policy.h``): with ``validate=True`` (the default) NaN or
±inf in ``obs`` or ``state`` (checked after the float32 cast: float64 1e300 is inf in
float32) raises ValueError before the step, and so does a non-finite action or new state
computed from finite inputs (values so large that the arithmetic overflows, e.g. 3e38 in
``state``); the held state is then left as it was. With ``validate=False`` nothing is
raised: every row whose inputs or results are not finite gets the *safe outputs*, the
action ``safe_action`` (0 clipped into the action bounds) and an all-zero new state (an
episode start), and ``last_status`` gives each row's code: 0 ``STATUS_OK``, 1
``STATUS_NONFINITE_INPUT``, 2 ``STATUS_NONFINITE_RESULT``. Either way an action returned
is finite and within the bounds, and the state carried on is finite. A finite input of any
size (1e30 in ``obs`` is clipped by the normaliser) is stepped normally.

``StepPolicy`` holds what does not depend on the runtime (state, checks, interface);
``export.c_runtime.CPolicy`` is the same interface over the generated C step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.c_build import safe_action

PRODUCER = "compressm-rl"
# A step's outcome per row (the C step's return codes, policy.h).
STATUS_OK, STATUS_NONFINITE_INPUT, STATUS_NONFINITE_RESULT = 0, 1, 2
SUPPORTED_FORMAT_VERSIONS = ("1",)
_EXPORT_HINT = "export a trained run with `compressm-rl export RUN_DIR --out FILE.onnx`"


def session_options(threads: int = 1) -> ort.SessionOptions:
    """ORT session options for lowest single-sample latency on a CPU core."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads cut wake-up latency but burn CPU between control steps; with one
    # thread there is nothing to wake, so turn it off.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only
    return opts


def make_session(
    model: str | os.PathLike | bytes, provider: str = "CPUExecutionProvider", threads: int = 1
) -> ort.InferenceSession:
    """An ``InferenceSession`` on ``provider`` with ``session_options``; clear errors."""
    available = ort.get_available_providers()
    if provider not in available:
        raise ValueError(
            f"execution provider {provider!r} is not available in this onnxruntime "
            f"({ort.__version__}); available: {', '.join(available)}. Pass one of those, or "
            f"install the onnxruntime build that ships {provider}."
        )
    if not isinstance(model, bytes):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}; {_EXPORT_HINT}")
        model = str(path)
    try:
        return ort.InferenceSession(model, session_options(threads), providers=[provider])
    except Exception as err:  # ORT raises several types (InvalidProtobuf, Fail, ...)
        name = model if isinstance(model, str) else "the given bytes"
        raise ValueError(
            f"{name} is not a loadable ONNX model ({type(err).__name__}: {err}); {_EXPORT_HINT}"
        ) from err


class StepPolicy:
    """What every compiled policy step shares: its metadata, the held recurrent state
    ``[batch_size, S]``, the input checks and the ``act``/``run``/``reset`` interface.

    Subclasses (``OnnxPolicy``, ``export.c_runtime.CPolicy``) implement ``_compute`` on
    float32 buffers; ``OnnxPolicy`` also overrides ``_advance`` (IOBinding).
    """

    def __init__(self, meta: dict[str, str], batch_size: int, validate: bool) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._meta = meta
        self.batch_size = int(batch_size)
        self.validate = validate
        self.obs_dim = int(self._meta["obs_dim"])
        self.act_dim = int(self._meta["act_dim"])
        self.state_size = int(self._meta["state_size"])
        self.layer_state_dims: list[int] = json.loads(self._meta["layer_state_dims"])
        self._recurrent = self.state_size > 0

        b = self.batch_size
        self._obs = np.zeros((b, self.obs_dim), np.float32)
        self._single_shape = (self.obs_dim,) if b == 1 else None  # 1-D obs allowed at batch 1
        self._action = np.zeros((b, self.act_dim), np.float32)
        # Two state buffers used in turn: step k reads one and writes the other.
        self._states = [np.zeros((b, self.state_size), np.float32) for _ in range(2)]
        self._current = 0
        self._safe_action = safe_action(self._meta)
        self._all_ok = np.zeros(b, np.int32)
        self._all_ok.flags.writeable = False
        self.last_status: np.ndarray = self._all_ok
        """Each row's outcome in the last ``act``/``run`` call, ``[rows]`` int32: 0
        ``STATUS_OK``, 1 ``STATUS_NONFINITE_INPUT``, 2 ``STATUS_NONFINITE_RESULT`` (the last
        two only with ``validate=False``; with ``validate`` they raise)."""

    def _compute(
        self, obs: np.ndarray, state: np.ndarray, action: np.ndarray, state_out: np.ndarray
    ) -> np.ndarray | None:
        """One step on float32 C-contiguous buffers ``[B, obs_dim]``, ``[B, S]`` (read) and
        ``[B, act_dim]``, ``[B, S]`` (written), with the non-finite contract applied (the
        safe outputs in every row whose inputs or results are not finite); returns each
        row's status ``[B]`` int32, or None when every row is ``STATUS_OK``."""
        raise NotImplementedError

    def _advance(self) -> np.ndarray | None:
        """Step the held buffers: ``_obs`` and the current state in, ``_action`` and the
        other state buffer out (``act`` makes it the current one); as ``_compute``."""
        state = self._states[self._current]
        return self._compute(self._obs, state, self._action, self._states[self._current ^ 1])

    def _apply_contract(
        self, obs: np.ndarray, state: np.ndarray, action: np.ndarray, state_out: np.ndarray
    ) -> np.ndarray | None:
        """The C step's non-finite contract on outputs computed by another runtime: rows
        with a non-finite input (status 1) or result (status 2) get the safe outputs.
        Returns the status ``[B]``, None if all rows are fine. Inputs already validated are
        not checked again."""
        results_ok = _all_finite(action) and _all_finite(state_out)
        if results_ok and (self.validate or (_all_finite(obs) and _all_finite(state))):
            return None
        status = np.zeros(obs.shape[0], np.int32)

        def rows(x: np.ndarray) -> np.ndarray:
            return ~np.isfinite(x).all(axis=1)

        status[rows(action) | rows(state_out)] = STATUS_NONFINITE_RESULT
        status[rows(obs) | rows(state)] = STATUS_NONFINITE_INPUT
        bad = status != STATUS_OK
        action[bad] = self._safe_action
        state_out[bad] = 0.0
        return status

    def _set_status(self, status: np.ndarray | None, batch: int) -> None:
        """Record ``last_status`` (``batch`` rows); with ``validate``, ValueError for rows
        whose step did not give its own result (raised before ``act`` swaps its state
        buffers, so the held state stays as it was)."""
        if status is None:
            ok = self._all_ok if batch == self.batch_size else np.zeros(batch, np.int32)
            self.last_status = ok
            return
        if not self.validate or not status.any():
            self.last_status = status
            return
        rows = np.nonzero(status)[0].tolist()
        if (status == STATUS_NONFINITE_INPUT).any():
            raise ValueError(f"obs or state contains NaN or inf (rows {rows})")
        raise ValueError(
            f"the policy step's action or new state is not finite (NaN or inf; rows {rows}) "
            f"although its inputs are: inputs so large that the arithmetic overflowed (check "
            f"the environment and the state passed), or non-finite weights. The held state "
            f"is unchanged; reset() the affected episodes, or pass validate=False to get the "
            f"safe action ({self._safe_action.tolist()}) and a zero state instead"
        )

    # ----- properties --------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, str]:
        """The model's metadata props (env_id, sizes, policy_type, training_steps, ...)."""
        return dict(self._meta)

    @property
    def env_id(self) -> str:
        return self._meta.get("env_id", "")

    @property
    def policy_type(self) -> str:
        return self._meta.get("policy_type", "")

    @property
    def recurrent(self) -> bool:
        return self.state_size > 0

    @property
    def safe_action(self) -> np.ndarray:
        """The action given for non-finite input: 0 clipped into the action bounds
        ``[act_dim]`` float32 (a copy)."""
        return self._safe_action.copy()

    @property
    def state(self) -> np.ndarray:
        """A copy of the current recurrent state ``[batch_size, S]`` float32."""
        return self._states[self._current].copy()

    # ----- episode control ---------------------------------------------------------
    def reset(self, mask: np.ndarray | None = None) -> None:
        """Start new episodes: all rows (``mask`` None) or rows where ``mask`` [batch_size] is True."""
        state = self._states[self._current]
        if mask is None:
            state.fill(0.0)
            return
        mask = np.asarray(mask)
        if mask.shape != (self.batch_size,) or mask.dtype.kind not in "biu":
            raise ValueError(
                f"reset mask must be bool [{self.batch_size}] (True = new episode in that row), "
                f"got {mask.dtype} {mask.shape}"
            )
        state[mask.astype(bool)] = 0.0

    # ----- stepping ----------------------------------------------------------------
    def act(self, obs: np.ndarray) -> np.ndarray:
        """One control step: raw ``obs`` -> deterministic action within the action bounds.

        Args:
            obs: ``[batch_size, obs_dim]``, or ``[obs_dim]`` when ``batch_size == 1``; float.

        Returns:
            ``[batch_size, act_dim]`` float32 (``[act_dim]`` for a 1-D ``obs``), a new array.
        """
        obs, single = self._check_obs(obs)
        if single:
            self._obs[0] = obs  # casts float64 -> float32 on the way
        else:
            self._obs[...] = obs
        if self.validate:  # after the cast: 1e300 is finite in float64, inf in float32
            self._check_finite(self._obs)
        self._set_status(self._advance(), self.batch_size)  # raises before the swap
        if self._recurrent:
            self._current ^= 1  # the buffer written this step is read by the next
        return self._action[0].copy() if single else self._action.copy()

    def run(
        self, obs: np.ndarray, state: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stateless step for any batch: ``obs`` ``[B, obs_dim]``, ``state`` ``[B, S]`` (zeros
        if None) -> ``(action [B, act_dim], state_out [B, S])``; the held state is untouched.

        Float inputs are cast to float32, then (unless ``validate=False``) checked for NaN
        and inf, as in ``act``: a float64 1e300 becomes inf in float32 and is rejected.
        Non-finite inputs and results are handled as in ``act`` (module docstring);
        ``last_status`` is set to the ``[B]`` codes.
        """
        obs = self._as_float32(obs, "obs")
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"obs must be [B, {self.obs_dim}], got {obs.shape}")
        if self.validate:
            self._check_finite(obs)
        batch = obs.shape[0]
        action = np.zeros((batch, self.act_dim), np.float32)
        state_out = np.zeros((batch, self.state_size), np.float32)
        if not self.recurrent:
            self._set_status(self._compute(obs, state_out, action, state_out), batch)
            return action, state_out
        state = np.zeros((batch, self.state_size), np.float32) if state is None else state
        state = self._as_float32(state, "state")
        if state.shape != (batch, self.state_size):
            raise ValueError(
                f"state must be [{batch}, {self.state_size}] "
                f"(Σ 2n over layers {self.layer_state_dims}), got {state.shape}"
            )
        if self.validate:
            self._check_finite(state, "state")
        self._set_status(self._compute(obs, state, action, state_out), batch)
        return action, state_out

    # ----- internals ---------------------------------------------------------------
    def _check_obs(self, obs: np.ndarray) -> tuple[np.ndarray, bool]:
        """Validate ``obs`` for ``act``; returns it as an array and whether it is one 1-D row.

        Written for the common case (a float ndarray of the right shape) to cost ~0.5 µs.
        """
        if type(obs) is not np.ndarray:
            obs = np.asarray(obs)
        if obs.dtype.kind != "f":
            raise ValueError(
                f"obs must be a float array (float32, or float64/float16 cast to float32), got "
                f"dtype {obs.dtype}; convert it with obs.astype(np.float32)"
            )
        shape = obs.shape
        single = shape == self._single_shape
        if not single and shape != self._obs.shape:
            want = f"[{self.batch_size}, {self.obs_dim}]" + (
                f" or [{self.obs_dim}]" if self.batch_size == 1 else ""
            )
            raise ValueError(
                f"obs must have shape {want} for this policy (env {self.env_id or '?'}, "
                f"batch_size={self.batch_size}), got {shape}; pass the env's raw "
                f"observation, or create {type(self).__name__}(..., batch_size=B) for B envs"
            )
        return obs, single

    @staticmethod
    def _check_finite(x: np.ndarray, name: str = "obs") -> None:
        """ValueError if the float32 ``x`` (``obs`` or ``state``) holds NaN or inf (the
        graph's normalising Gemm would turn an inf into NaN: inf · 0 off the diagonal)."""
        if not _all_finite(x):
            rows = np.unique(np.nonzero(~np.isfinite(x))[0]).tolist()
            fix = (
                "the policy state would be corrupted. Check the environment, or reset() "
                "the affected episodes"
                if name == "obs"
                else "pass the state_out of the previous step, or zeros at an episode start"
            )
            raise ValueError(
                f"{name} contains NaN or inf, or values beyond float32's range (rows {rows}); {fix}"
            )

    @staticmethod
    def _as_float32(x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)


def _all_finite(x: np.ndarray) -> bool:
    """Whether every value of the float32 ``x`` is finite. x·x is finite iff every x is,
    barring overflow past ~1e19, which the exact test then sorts out: one ``vdot`` (which,
    unlike ``dot``, raises no floating-point warning on overflow) is 2x cheaper than
    ``isfinite().all()`` at these sizes."""
    return math.isfinite(float(np.vdot(x, x))) or bool(np.isfinite(x).all())


class OnnxPolicy(StepPolicy):
    """An exported compressm-rl policy running in onnxruntime, holding its recurrent state.

    Args:
        path: the ``.onnx`` file written by ``export.onnx_export.to_onnx``.
        provider: ORT execution provider (``"CPUExecutionProvider"``).
        batch_size: rows per ``act`` call (envs stepped together); fixed per instance.
        io_binding: bind preallocated buffers (faster); False uses ``session.run``.
        validate: True: NaN/inf in an ``act``/``run`` input (after the float32 cast), or a
            non-finite result, raises ValueError (the held state is left as it was). False:
            nothing is raised; such rows get ``safe_action`` and a zero state, their codes
            in ``last_status``, as the C step does (module docstring). Shape and dtype are
            always checked.
        threads: ORT intra-op threads (1 is fastest at these sizes).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        provider: str = "CPUExecutionProvider",
        batch_size: int = 1,
        io_binding: bool = True,
        validate: bool = True,
        threads: int = 1,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        self.session = make_session(self.path, provider, threads)
        self.provider = provider
        super().__init__(_read_metadata(self.session, self.path), batch_size, validate)
        self._bindings = self._make_bindings() if io_binding else None

    def _compute(
        self, obs: np.ndarray, state: np.ndarray, action: np.ndarray, state_out: np.ndarray
    ) -> np.ndarray:
        feeds = {"obs": obs, **({"state": state} if self._recurrent else {})}
        outputs = self.session.run(None, feeds)
        action[...] = outputs[0]
        if self._recurrent:
            state_out[...] = outputs[1]
        return self._apply_contract(obs, state, action, state_out)

    def _advance(self) -> np.ndarray:
        if self._bindings is None:
            return super()._advance()
        self.session.run_with_iobinding(self._bindings[self._current])
        state, state_out = self._states[self._current], self._states[self._current ^ 1]
        return self._apply_contract(self._obs, state, self._action, state_out)

    def _make_bindings(self) -> list:
        """One IOBinding per state buffer parity (the two swap roles every step)."""
        obs_v = ort.OrtValue.ortvalue_from_numpy(self._obs)  # CPU buffers are shared, not copied
        act_v = ort.OrtValue.ortvalue_from_numpy(self._action)
        state_v = [ort.OrtValue.ortvalue_from_numpy(s) for s in self._states]
        bindings = []
        for k in range(2 if self._recurrent else 1):
            binding = self.session.io_binding()
            binding.bind_ortvalue_input("obs", obs_v)
            binding.bind_ortvalue_output("action", act_v)
            if self._recurrent:
                binding.bind_ortvalue_input("state", state_v[k])
                binding.bind_ortvalue_output("state_out", state_v[1 - k])
            bindings.append(binding)
        self._ortvalues = (obs_v, act_v, state_v)  # keep the buffers' OrtValues alive
        return bindings

    def __repr__(self) -> str:
        return (
            f"OnnxPolicy({str(self.path)!r}, env={self.env_id!r}, type={self.policy_type}, "
            f"obs_dim={self.obs_dim}, act_dim={self.act_dim}, state_dims={self.layer_state_dims}, "
            f"batch_size={self.batch_size}, provider={self.provider})"
        )


def _read_metadata(session: ort.InferenceSession, path: Path) -> dict[str, str]:
    """The compressm-rl metadata of a loaded model, or a ValueError saying what is missing."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get("producer") != PRODUCER:
        raise ValueError(
            f"{path} is an ONNX model but not a compressm-rl policy (metadata 'producer' is "
            f"{meta.get('producer')!r}, expected {PRODUCER!r}); {_EXPORT_HINT}"
        )
    version = meta.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{path} has policy format version {version!r}; this runtime reads "
            f"{', '.join(SUPPORTED_FORMAT_VERSIONS)}. Re-export it with this version of compressm-rl"
        )
    required = ("obs_dim", "act_dim", "state_size", "layer_state_dims")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks metadata {missing}; {_EXPORT_HINT}")
    inputs = {i.name for i in session.get_inputs()}
    expected = {"obs", "state"} if int(meta["state_size"]) > 0 else {"obs"}
    if inputs != expected:
        raise ValueError(f"{path} has inputs {sorted(inputs)}, expected {sorted(expected)}")
    return meta
