"""The ONNX step graph as dependency-free C99: ``policy.c``, ``policy.h``, a README, and
``bench.c`` with a ``Makefile`` (``make bench``: the step timed on any board, no Python).

The C is generated from the ``.onnx`` model (the one artefact of truth), node by node in
the graph's order, at batch 1. The header is the whole interface::

    #define POLICY_OBS_DIM    11
    #define POLICY_ACTION_DIM 3
    #define POLICY_STATE_DIM  100      /* 0 for an MLP policy */
    #define POLICY_OK 0                /* and POLICY_NONFINITE_INPUT 1, _RESULT 2 */
    int policy_step(const float *obs, const float *state, float *action, float *state_out);

``state`` all zeros is an episode start; raw observations in, bounded actions out, exactly
the ONNX graph's function. ``state`` and ``state_out`` may be the same array (every read of
``state`` happens before ``state_out`` is written). No heap, no writable globals (weights
are ``static const``, temporaries live on the stack and are reused once dead), nothing
from the C library but ``C_LIBRARY_SYMBOLS`` (``copysignf``, ``fabsf``, ``sqrtf``,
``memcpy``, ``memset``; compilers inline most of them).

Non-finite input: the step returns ``POLICY_NONFINITE_INPUT`` when any element of ``obs``
or ``state`` is NaN or ±inf (computing nothing from them), ``POLICY_NONFINITE_RESULT``
when finite inputs give a non-finite action or state (overflow), and in both cases writes
the safe outputs: the action 0 clipped into the bounds (``export.c_build.safe_action``)
and a zero ``state_out``. So the action is always finite and within the bounds, and the
state always finite. Constants in the graph must be finite (``ValueError`` naming the
tensor otherwise). Strings from the model (env id, metadata) reach the C only inside
comments, reduced to characters that cannot end one (``comment_text``, ``comment_json``).

Why our own emitter instead of a general ONNX-to-C compiler (docs/design.md §8): the
graphs hold ~12 kinds of node at batch 1, where the work is matrix-vector products and
GELU/tanh. emmtrix's ``emx-onnx-cgen`` (1.4.0) writes each Gemm as a dot product per
output over a strided weight column and calls libm's ``erff``/``tanhf``; gcc -O3
vectorises neither, and the C step of a compressed Hopper policy took 4.5 µs (n = 25 per
layer) and an MLP 3.3 µs (AMD EPYC, ``-O3 -march=native``). Here a product is written as
``y += x[k] · W[k, :]``, up to ``BLOCK`` outputs held in registers while contiguous rows
stream through (no reassociation a compiler must be allowed, so gcc vectorises it without
``-ffast-math``; narrow products split k over up to 4 accumulator sets), and erf/exp are
branch-free rational and polynomial approximations (Eigen's erf, Cephes' exp) that
vectorise too: erf within 5e-7 of float64 and in [-1, 1], tanh within 1e-7, GELU within
1.3e-6 (absolute; relative where |GELU| > 1: 1 + erf cancels for x < -3, where erf's
few-ulp error is the whole of GELU) and never positive for x < 0 (checked on a dense grid,
with and without FMA, by ``tests/test_c_export.py``). 1.2 µs and 0.4 µs for the two
policies above (``-march=native``, ``python benchmarks/latency.py``). ``emx-onnx-cgen``
stays in the tests as an independent reference (``tests/test_c_export.py``) and in
``benchmarks/latency.py`` as a row.

Only the ops this project's exporter writes are supported; any other op, attribute or
shape raises ``UnsupportedGraphError`` naming the node.

The parts: ``export.c_text`` holds the C text that does not depend on the graph (the math
primitives above, the header and README templates, the comment-safe strings),
``export.c_emitter`` the emitter of the graph's nodes; this module checks the graph's
interface against its metadata and assembles the three files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from export.c_bench import BENCH_NAME, MAKEFILE_NAME, bench_source, makefile
from export.c_build import (
    AARCH64_FLAGS,
    CORTEX_M4_FLAGS,
    HEADER_NAME,
    HOST_FLAGS,
    METADATA_TAG,
    SOURCE_NAME,
    safe_action,
)
from export.c_emitter import BLOCK, Emitter, UnsupportedGraphError, c_array
from export.c_text import C_LIBRARY_SYMBOLS, HEADER, PRELUDE, README, comment_json, comment_text

__all__ = [
    "BLOCK",
    "C_LIBRARY_SYMBOLS",
    "CSources",
    "UnsupportedGraphError",
    "comment_json",
    "comment_text",
    "generate",
]


@dataclass(frozen=True)
class CSources:
    """The generated files' text and the step's dimensions."""

    source: str
    header: str
    readme: str
    bench: str
    makefile: str
    obs_dim: int
    action_dim: int
    state_dim: int
    metadata: dict[str, str]

    def files(self) -> dict[str, str]:
        """The export directory's generated text files by name (``compressm-rl export
        --format c`` writes the ``policy.onnx`` they came from beside them)."""
        return {
            SOURCE_NAME: self.source,
            HEADER_NAME: self.header,
            "README.md": self.readme,
            BENCH_NAME: self.bench,
            MAKEFILE_NAME: self.makefile,
        }


def generate(
    model: onnx.ModelProto, onnx_name: str = "policy.onnx", dir_name: str = "DIR"
) -> CSources:
    """``policy.c``, ``policy.h``, ``README.md``, ``bench.c`` and ``Makefile`` for a
    compressm-rl ONNX step graph.

    Args:
        model: the graph written by ``export.onnx_export.build_model`` (any batch size:
            the C step is batch 1).
        onnx_name: the file name the sources say they came from.
        dir_name: the directory named in the README's commands.

    Raises:
        UnsupportedGraphError: an op, attribute or shape the emitter does not handle.
        ValueError: the model is not a compressm-rl policy (metadata missing).
    """
    meta = {p.key: p.value for p in model.metadata_props}
    obs_dim, action_dim, state_dim = _step_dims(meta)
    emitter = _emit_graph(model, obs_dim, state_dim)
    function = _step_function(emitter, action_dim, state_dim)
    safe = safe_action(meta)
    env = comment_text(meta.get("env_id") or "unknown env")
    title = f"compressm-rl policy step ({env})"
    onnx_name = comment_text(onnx_name)
    info = dict(sorted(meta.items()))
    source = (
        f"/* {title}\n * Generated by compressm-rl from {onnx_name} (nodes: "
        f"{len(model.graph.node)}, weights: {emitter.weight_bytes} bytes). */\n"
        f"/* {METADATA_TAG} {comment_json(info)} */\n"
        + PRELUDE
        + "\n"
        + "\n\n".join([*emitter.weights, _safe_outputs(safe, action_dim, state_dim)])
        + "\n"
        + function
    )
    safe_text = ", ".join(f"{float(v):.9g}" for v in safe)
    header = _header(title, onnx_name, (obs_dim, action_dim, state_dim), safe_text)
    readme = _readme(title, onnx_name, env, meta, dir_name, safe_text)
    bench = bench_source(meta, f"C {Path(dir_name).name or 'policy'}")
    build = makefile(HOST_FLAGS, _aarch64_flags())
    return CSources(source, header, readme, bench, build, obs_dim, action_dim, state_dim, meta)


def _step_dims(meta: dict[str, str]) -> tuple[int, int, int]:
    """``(obs_dim, action_dim, state_dim)`` from the model's metadata (ValueError if the
    model is not a compressm-rl policy export)."""
    for key in ("obs_dim", "act_dim", "state_size"):
        if key not in meta:
            raise ValueError(
                f"the ONNX model lacks metadata {key!r}: not a compressm-rl policy export"
            )
    obs_dim, action_dim, state_dim = (int(meta[k]) for k in ("obs_dim", "act_dim", "state_size"))
    return obs_dim, action_dim, state_dim


def _emit_graph(model: onnx.ModelProto, obs_dim: int, state_dim: int) -> Emitter:
    """The emitter after every node of the graph, its inputs checked against the metadata."""
    emitter = Emitter(model)
    expected = {"obs": obs_dim, **({"state": state_dim} if state_dim else {})}
    if {k: emitter.lengths.get(k) for k in expected} != expected or len(emitter.lengths) != len(
        expected
    ):
        raise UnsupportedGraphError(
            f"graph inputs {emitter.lengths} do not match the metadata {expected}"
        )
    for index, node in enumerate(model.graph.node):
        emitter.node(node)
        emitter.release_dead(index)
    return emitter


def _step_function(emitter: Emitter, action_dim: int, state_dim: int) -> str:
    """The C text of ``policy_step``: the input check, the graph's body, the result check
    and the copies to the outputs (whose names and sizes are checked here)."""
    outputs = {"action": action_dim, **({"state_out": state_dim} if state_dim else {})}
    if emitter.outputs != list(outputs):
        raise UnsupportedGraphError(f"graph outputs {emitter.outputs}, expected {list(outputs)}")
    copies, checks = [], []
    for name, length in outputs.items():
        c_name, n = emitter.c_names[name], emitter.lengths[name]
        if n != length:
            raise UnsupportedGraphError(f"output {name!r} has {n} values, expected {length}")
        # Outputs are written last, from stack buffers: state_out may alias state.
        copies.append(f"    memcpy({name}, {c_name}, {length} * sizeof(float));")
        checks.append(f"cm_all_finite({c_name}, {length})")
    inputs = ["cm_all_finite(obs, POLICY_OBS_DIM)"]
    if state_dim:
        inputs.append("cm_all_finite(state, POLICY_STATE_DIM)")
    unused = "" if state_dim else "    (void)state;\n    (void)state_out;\n"
    return (
        "int policy_step(const float *obs, const float *state, float *action, "
        "float *state_out)\n{\n"
        + unused
        + f"    if (!({' && '.join(inputs)})) {{\n"
        + "        cm_safe_outputs(action, state_out);\n"
        + "        return POLICY_NONFINITE_INPUT;\n"
        + "    }\n"
        + "\n".join(emitter.declarations())
        + "\n\n"
        + "\n".join(emitter.body)
        + "\n\n"
        + f"    if (!({' && '.join(checks)})) {{\n"
        + "        cm_safe_outputs(action, state_out);\n"
        + "        return POLICY_NONFINITE_RESULT;\n"
        + "    }\n"
        + "\n".join(copies)
        + "\n    return POLICY_OK;\n}\n"
    )


def _safe_outputs(safe: np.ndarray, action_dim: int, state_dim: int) -> str:
    """The C text of ``cm_safe_action`` and ``cm_safe_outputs`` (policy.h's safe outputs)."""
    return (
        "/* The safe outputs (policy.h): the safe action, 0 clipped into the bounds, and\n"
        " * zeros for the state. */\n"
        f"static const float cm_safe_action[{action_dim}] = {c_array(safe)};\n\n"
        "static void cm_safe_outputs(float *action, float *state_out)\n{\n"
        + f"    memcpy(action, cm_safe_action, {action_dim} * sizeof(float));\n"
        + (
            f"    memset(state_out, 0, {state_dim} * sizeof(float));\n"
            if state_dim
            else "    (void)state_out;\n"
        )
        + "}\n"
    )


def _aarch64_flags() -> list[str]:
    """The aarch64 build's flags for an object or a dynamically linked program."""
    return [f for f in AARCH64_FLAGS if f != "-static"]


def _library() -> str:
    """``C_LIBRARY_SYMBOLS`` as Markdown code spans, comma separated."""
    return ", ".join(f"`{name}`" for name in C_LIBRARY_SYMBOLS)


def _header(title: str, onnx_name: str, dims: tuple[int, int, int], safe_text: str) -> str:
    """``policy.h``; ``dims`` is ``(obs_dim, action_dim, state_dim)``."""
    obs_dim, action_dim, state_dim = dims
    return HEADER.format(
        title=title,
        onnx_name=onnx_name,
        obs_dim=obs_dim,
        action_dim=action_dim,
        state_dim=state_dim,
        safe_action=safe_text,
        library=_library().replace("`", ""),
    )


def _readme(
    title: str, onnx_name: str, env: str, meta: dict[str, str], dir_name: str, safe_text: str
) -> str:
    """``README.md``: the use, the safe outputs, the builds per target, the checks."""
    return README.format(
        title=title,
        onnx_name=onnx_name,
        env_id=env,
        policy_type=comment_text(meta.get("policy_type", "")),
        layer_state_dims=comment_text(meta.get("layer_state_dims", "[]")),
        dir_name=comment_text(dir_name, limit=1000),
        safe_action=safe_text,
        host_flags=" ".join(HOST_FLAGS),
        aarch64_flags=" ".join(_aarch64_flags()),
        cortex_m4_flags=" ".join(f for f in CORTEX_M4_FLAGS if not f.startswith("-fstack")),
        library=_library(),
    )
