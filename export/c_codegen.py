"""The ONNX step graph as dependency-free C99: ``policy.c``, ``policy.h`` and a README.

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
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from export.c_build import (
    AARCH64_FLAGS,
    CORTEX_M4_FLAGS,
    HOST_FLAGS,
    METADATA_TAG,
    safe_action,
)

BLOCK = 64  # outputs of a matrix-vector product held in registers at once


class UnsupportedGraphError(ValueError):
    """The ONNX graph holds an op, attribute or shape the C emitter does not handle."""


@dataclass(frozen=True)
class CSources:
    """The generated files' text and the step's dimensions."""

    source: str
    header: str
    readme: str
    obs_dim: int
    action_dim: int
    state_dim: int
    metadata: dict[str, str]


# ----- the C text that does not depend on the graph -----------------------------------
_PRELUDE = r"""#include <math.h>
#include <stdint.h>
#include <string.h>

#include "policy.h"

/* gcc unrolls loops of up to 16 iterations completely before vectorising, and then fails
 * to vectorise a 16-wide accumulator update (n = 8: 1.6 us a step instead of 0.7 us). */
#if defined(__GNUC__) && !defined(__clang__)
#define CM_KEEP_LOOP _Pragma("GCC unroll 1")
#else
#define CM_KEEP_LOOP
#endif

/* e^x for x <= 0 (Cephes' expf): e^x = 2^k e^f, |f| <= ln2/2, e^f by a degree-7
 * polynomial, 2^k written into the exponent bits. Branch-free, so loops vectorise. */
static inline float cm_exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x; /* NaN stays NaN, and so does the result */
    /* k = floor(x log2(e) + 1/2) as a truncation of a positive number (no libm floorf,
     * vectorisable); within rounding of an integer it may be one more, which leaves |f|
     * a hair above ln2/2, where the polynomial is still accurate. k is taken from x
     * clamped to [-87, 0] with NaN sent to -87 (a comparison with NaN is false), so the
     * float-to-int conversion is always in range: converting NaN is undefined in C. */
    float xk = x > -87.0f ? x : -87.0f;
    xk = xk < 0.0f ? xk : 0.0f;
    const int32_t ki = (int32_t)(xk * 1.44269504088896341f + 128.5f) - 128;
    const float k = (float)ki;
    const float f = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    const int32_t bits = (ki + 127) * 8388608; /* (k + 127) << 23 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* erf (Eigen's generic_fast_erf_float): x P(x^2) / Q(x^2) on [-4, 4], +-1 beyond. The
 * rational form overshoots 1 by an ulp near |x| = 4 (1.00000012 at 3.999 with FMA), which
 * made GELU positive for x in [-5.66, -5.21]: the result is clamped into [-1, 1] (NaN
 * stays NaN). */
static inline float cm_erf(float x)
{
    x = x < -4.0f ? -4.0f : x;
    x = x > 4.0f ? 4.0f : x;
    const float x2 = x * x;
    float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
    p = x2 * p + -2.10102402082508e-06f;
    p = x2 * p + -5.69250639462346e-05f;
    p = x2 * p + -7.34990630326855e-04f;
    p = x2 * p + -2.95459980854025e-03f;
    p = x2 * p + -1.60960333262415e-02f;
    float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
    q = x2 * q + -1.68282697438203e-03f;
    q = x2 * q + -7.37332916720468e-03f;
    q = x2 * q + -1.42647390514189e-02f;
    const float r = x * p / q;
    return r > 1.0f ? 1.0f : (r < -1.0f ? -1.0f : r);
}

/* tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}). */
static inline float cm_tanh(float x)
{
    const float t = cm_exp_nonpositive(-2.0f * fabsf(x));
    return copysignf((1.0f - t) / (1.0f + t), x);
}

/* Exact (erf) GELU, as torch.nn.functional.gelu's default. */
static inline float cm_gelu(float x)
{
    return 0.5f * x * (1.0f + cm_erf(x * 0.70710678118654752f));
}

/* 1 if x[0..n) are all finite (exponent bits not all ones), else 0. An integer test of
 * the bits: exact under any floating-point flags (-ffinite-math-only may delete an
 * isfinite() or x != x test), branch-free, vectorisable. */
static inline int cm_all_finite(const float *x, int n)
{
    uint32_t bad = 0;
    for (int i = 0; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, &x[i], sizeof bits);
        bad |= (uint32_t)((bits & 0x7f800000u) == 0x7f800000u);
    }
    return bad == 0u;
}
"""

_HEADER = """\
/* {title}
 * Generated by compressm-rl from {onnx_name}; see README.md. */
#ifndef COMPRESSM_POLICY_H
#define COMPRESSM_POLICY_H

#define POLICY_OBS_DIM {obs_dim}
#define POLICY_ACTION_DIM {action_dim}
#define POLICY_STATE_DIM {state_dim}

/* What policy_step returns. */
#define POLICY_OK 0               /* the step's action and state */
#define POLICY_NONFINITE_INPUT 1  /* obs or state held NaN or +-inf: the safe outputs */
#define POLICY_NONFINITE_RESULT 2 /* finite inputs, non-finite result: the safe outputs */

#ifdef __cplusplus
extern "C" {{
#endif

/* One control step at batch 1.
 *   obs       [POLICY_OBS_DIM]     raw observation (normalised inside)
 *   state     [POLICY_STATE_DIM]   recurrent state; all zeros at an episode start
 *   action    [POLICY_ACTION_DIM]  deterministic action: always finite, within the bounds
 *   state_out [POLICY_STATE_DIM]   the state to pass as `state` next step: always finite
 * Returns POLICY_OK, or writes the safe outputs and returns
 *   POLICY_NONFINITE_INPUT   when any element of obs or state is NaN or +-inf (nothing is
 *                            computed from them), or
 *   POLICY_NONFINITE_RESULT  when the inputs are finite but the action or new state is not
 *                            (inputs so large that the arithmetic overflows, e.g. 3e38 in
 *                            state; a huge finite obs is clipped by the normaliser).
 * The safe outputs: action = 0 clipped into the action bounds, here
 *   {{{safe_action}}},
 * and state_out = all zeros (an episode start: the next step begins afresh).
 * state and state_out may be the same array. With POLICY_STATE_DIM 0 (an MLP policy)
 * state and state_out are not touched and may be NULL. Reentrant: no globals written.
 * From the C library it may call {library} (see README.md). */
int policy_step(const float *obs, const float *state, float *action, float *state_out);

#ifdef __cplusplus
}}
#endif

#endif /* COMPRESSM_POLICY_H */
"""

_README = """\
# {title}

Generated by compressm-rl from the ONNX step graph `{onnx_name}` (env `{env_id}`,
policy `{policy_type}`, recurrent state sizes per layer {layer_state_dims}).
Dependency-free C99: no heap, no writable globals.

```c
#include "policy.h"

float state[POLICY_STATE_DIM + 1] = {{0}};   /* zeros = episode start (+1: C has no [0]) */
float action[POLICY_ACTION_DIM];
/* every control step: */
if (policy_step(obs, state, action, state) != POLICY_OK) {{  /* in place is allowed */
    /* obs or state held NaN/inf (POLICY_NONFINITE_INPUT), or the result overflowed
     * (POLICY_NONFINITE_RESULT): action is the safe action and state was reset to zeros */
}}
/* at an episode start: */
memset(state, 0, sizeof state);
```

Non-finite input: `policy_step` never returns a NaN or infinite action or state. When any
element of `obs` or `state` is NaN or ±inf it computes nothing from them and returns
`POLICY_NONFINITE_INPUT` (1); when the inputs are finite but the action or new state is not
(values so large that the arithmetic overflows, e.g. 3e38 in `state`; a huge finite `obs` is
clipped by the normaliser) it returns `POLICY_NONFINITE_RESULT` (2). Either way `action` is
the safe action, 0 clipped into the action bounds ({{{safe_action}}}), and `state_out` is all
zeros, an episode start. Otherwise it returns `POLICY_OK` (0) with the policy's action,
within the action bounds.

Build, portable (the object runs on every CPU of the target architecture):
`gcc {host_flags} -std=c99 -c policy.c`
(`-fno-trapping-math` lets gcc vectorise the clamps of erf/exp; it changes no result).
Add `-march=native` only when building on the machine that runs the policy: it lets gcc
use every instruction of the build machine (FMA, AVX2, AVX-512, ...), and such an object
dies with SIGILL (illegal instruction) on a CPU that lacks one; to tune for a known
deployment CPU name it instead (`-march=x86-64-v3`, `-mcpu=cortex-a72`).

- aarch64: `aarch64-linux-gnu-gcc {aarch64_flags} -std=c99 -c policy.c`
- Cortex-M4: `arm-none-eabi-gcc {cortex_m4_flags} -std=c99 -c policy.c`
  (`-fno-math-errno` turns `sqrtf` into one instruction)

From the C library `policy.c` may call {library}, and nothing else.
Which of them stay calls depends on the compiler and flags (gcc inlines `fabsf` and
`copysignf` when optimising, and `sqrtf` with `-fno-math-errno`): link with `-lm`, or
provide these symbols on a bare-metal target.

Check it against the ONNX graph and evaluate it in MuJoCo with compressm-rl:
`compressm-rl eval {dir_name}` and `compressm-rl bench {dir_name}` (times the step inside C).
"""

# What the generated C may call from the C library (math.h: libm, string.h: libc), for
# the header and README; tests/test_c_export.py checks it against `nm -u`.
C_LIBRARY_SYMBOLS = ("copysignf", "fabsf", "sqrtf", "memcpy", "memset")

# Text from the model (env id, file names, metadata) reaches C only inside comments, and
# only as these characters: no `*` (no `*/` to end a comment, no `/*` to nest one), no
# backslash, `?` (the `??/` trigraph is a backslash) or line break (no line splice, no
# preprocessor line), no backtick (the README's Markdown), nothing outside printable
# ASCII. Everything else becomes `_`.
_COMMENT_UNSAFE = re.compile(r"[^0-9A-Za-z _.,:;=+@%~/()\[\]{}<>-]")


def comment_text(text: str, limit: int = 120) -> str:
    """``text`` reduced to characters that cannot end or alter a C comment (or the
    README's Markdown), at most ``limit`` of them."""
    text = _COMMENT_UNSAFE.sub("_", str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def comment_json(info: dict[str, str]) -> str:
    """``info`` as one line of JSON that reads back exactly (``json.loads``) and is safe
    inside a C comment: ASCII only (control characters and line breaks escaped), and the
    three characters that could end a comment or form a trigraph written as ``\\uXXXX``
    escapes; a backslash is then always followed by another escape character, never by a
    line break."""
    text = json.dumps(info, ensure_ascii=True, sort_keys=True)
    for char in "*/?":  # only ever inside JSON strings, where \\uXXXX means the same
        text = text.replace(char, f"\\u{ord(char):04x}")
    if not re.fullmatch(r"[\x20-\x7e]*", text) or "*/" in text or "??" in text:
        raise AssertionError(f"metadata comment is not comment-safe: {text!r}")
    return text


# ----- the emitter ---------------------------------------------------------------------
def _c_float(value: float) -> str:
    """A float32 value as an exact C hex-float literal (ValueError if not finite: C has no
    literal for NaN or inf, and a policy's constants are finite)."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, refused below
        value = float(np.float32(value))
    if not np.isfinite(value):
        raise ValueError(f"non-finite constant {value} (float32) in the graph")
    if value == 0.0:
        return "-0.0f" if np.signbit(value) else "0.0f"
    return f"{value.hex()}f"


def _c_array(values: np.ndarray) -> str:
    flat = np.asarray(values, np.float32).ravel()
    items = [_c_float(v) for v in flat]
    lines = [", ".join(items[i : i + 8]) for i in range(0, len(items), 8)]
    return "{\n    " + ",\n    ".join(lines) + "\n}"


class _Emitter:
    """Walks the graph once; activations live in ``float v<i>[n]`` stack arrays."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for name, value in self.constants.items():
            _check_finite_constant(name, value)
        self.lengths: dict[str, int] = {}  # activation name -> length at batch 1
        self.c_names: dict[str, str] = {}  # activation name -> C expression of its buffer
        self.weights: list[str] = []  # static const definitions
        self.weight_names: dict[str, str] = {}
        # Stack arrays, reused once their values are dead (a node's inputs are released
        # after its loop is written, so no node writes an array it reads).
        self.arrays: list[int] = []  # capacity (floats) of array v<i>
        self.array_of: dict[str, int] = {}  # activation name -> the array that holds it
        self.free: list[int] = []
        self.last_use: dict[str, int] = {}
        for index, node in enumerate(graph.node):
            for name in [*node.input, *node.output]:
                self.last_use[name] = index
        for value in graph.output:
            self.last_use[value.name] = len(graph.node)  # copied out after the last node
        self.body: list[str] = []
        self.weight_bytes = 0
        self.sums = 0  # partial-sum arrays written so far (their names are s1, s2, ...)
        for value in graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in _dims(value)]
            if len(dims) != 2:
                raise UnsupportedGraphError(f"graph input {value.name!r} is not [batch, n]")
            self.lengths[value.name] = int(dims[1])
            self.c_names[value.name] = value.name
        self.outputs = [v.name for v in graph.output]

    # -- names and buffers ------------------------------------------------------------
    def weight(self, name: str, values: np.ndarray) -> str:
        """The C name of a ``static const float`` array holding ``values`` (row-major)."""
        if name in self.weight_names:
            return self.weight_names[name]
        c_name = f"w{len(self.weights)}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"
        values = np.asarray(values, np.float32)
        self.weights.append(f"static const float {c_name}[{values.size}] = {_c_array(values)};")
        self.weight_bytes += 4 * values.size
        self.weight_names[name] = c_name
        return c_name

    def buffer(self, name: str, length: int) -> str:
        """A stack array for activation ``name``: a dead one (grown if needed) or a new one."""
        if self.free:  # the free array closest in size: least growth, least waste
            array = min(self.free, key=lambda a: abs(self.arrays[a] - length))
            self.free.remove(array)
            self.arrays[array] = max(self.arrays[array], length)
        else:
            array = len(self.arrays)
            self.arrays.append(length)
        self.array_of[name] = array
        self.lengths[name] = length
        self.c_names[name] = f"v{array}"
        return f"v{array}"

    def release_dead(self, index: int) -> None:
        """Return the arrays whose every value was last read by node ``index``."""
        live = {a for n, a in self.array_of.items() if self.last_use.get(n, index) > index}
        for array in {a for n, a in self.array_of.items() if a not in live}:
            if array not in self.free:
                self.free.append(array)
        self.array_of = {n: a for n, a in self.array_of.items() if a in live}

    def declarations(self) -> list[str]:
        return [f"    float v{i}[{n}];" for i, n in enumerate(self.arrays)]

    def activation(self, node: onnx.NodeProto, name: str) -> tuple[str, int]:
        if name not in self.c_names:
            raise UnsupportedGraphError(
                f"node {node.name!r} ({node.op_type}) reads {name!r}, which is not an "
                f"activation (a constant where the C emitter expects data)"
            )
        return self.c_names[name], self.lengths[name]

    def constant(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        if name not in self.constants:
            raise UnsupportedGraphError(
                f"node {node.name!r} ({node.op_type}) needs {name!r} to be an initializer"
            )
        return self.constants[name]

    def emit(self, line: str) -> None:
        self.body.append(line)

    # -- operand of an elementwise op: an activation, a scalar or a per-column vector --
    def operand(self, node: onnx.NodeProto, name: str, length: int) -> Callable[[str], str]:
        if name in self.c_names:
            c_name, n = self.activation(node, name)
            if n != length:
                raise UnsupportedGraphError(f"node {node.name!r}: {name!r} has {n}, not {length}")
            return lambda i: f"{c_name}[{i}]"
        value = np.asarray(self.constant(node, name), np.float32)
        if value.size == 1:
            literal = _c_float(value.ravel()[0])
            return lambda i: literal
        if value.size != length or value.ndim > 2 or (value.ndim == 2 and value.shape[0] != 1):
            raise UnsupportedGraphError(
                f"node {node.name!r}: constant {name!r} of shape {value.shape} does not "
                f"broadcast to [1, {length}]"
            )
        c_name = self.weight(name, value)
        return lambda i: f"{c_name}[{i}]"

    def elementwise(self, node: onnx.NodeProto, expression: Callable[..., str]) -> None:
        lengths = [self.lengths[n] for n in node.input if n in self.c_names]
        if not lengths:
            raise UnsupportedGraphError(f"node {node.name!r} has no activation input")
        length = lengths[0]
        operands = [self.operand(node, n, length) for n in node.input]
        out = self.buffer(node.output[0], length)
        value = expression(*(o("i") for o in operands))
        self.emit(f"    for (int i = 0; i < {length}; ++i) {out}[i] = {value};")

    # -- the ops ----------------------------------------------------------------------
    def gemm(self, node: onnx.NodeProto) -> None:
        attrs = _attrs(node)
        if node.op_type == "Gemm" and (
            attrs.get("transA", 0) or attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0
        ):
            raise UnsupportedGraphError(f"Gemm {node.name!r} with {attrs}: only x @ W + c")
        if node.op_type == "Gemm" and attrs.get("beta", 1.0) != 1.0:
            raise UnsupportedGraphError(f"Gemm {node.name!r} with beta != 1")
        x, k_len = self.activation(node, node.input[0])
        w = np.asarray(self.constant(node, node.input[1]), np.float32)
        if w.ndim != 2 or w.shape[0] != k_len:
            raise UnsupportedGraphError(
                f"{node.op_type} {node.name!r}: weight {w.shape} does not take [1, {k_len}]"
            )
        j_len = w.shape[1]
        out = self.buffer(node.output[0], j_len)
        w_name = self.weight(node.input[1], w)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = self.operand(node, node.input[2], j_len)
        # Column blocks of up to BLOCK outputs held in registers, rows streamed through
        # them (axpy form: contiguous loads, each sum in the dot product's order, so it
        # vectorises without -ffast-math).
        for j0 in range(0, j_len, BLOCK):
            width = min(BLOCK, j_len - j0)
            # Narrow blocks run `parts` independent accumulator sets over k (summed at the
            # end), so a chain of dependent multiply-adds does not set the pace: at
            # n = 8 (16 outputs) one set took 2.4 µs a step, n = 16 1.1 µs.
            parts = max(1, min(4, BLOCK // (-(-width // 8) * 8), k_len))
            whole = k_len // parts * parts
            init = f"{bias(f'{j0} + j') if j0 else bias('j')}" if bias else "0.0f"
            self.emit("    {")
            self.emit(f"        float acc[{parts}][{width}];")
            self.emit(f"        for (int j = 0; j < {width}; ++j) acc[0][j] = {init};")
            for p in range(1, parts):
                self.emit(f"        for (int j = 0; j < {width}; ++j) acc[{p}][j] = 0.0f;")
            self.emit(f"        for (int k0 = 0; k0 < {whole}; k0 += {parts}) {{")
            self.emit(f"            for (int p = 0; p < {parts}; ++p) {{")
            self.emit(f"                const float xk = {x}[k0 + p];")
            self.emit(f"                const float *row = {w_name} + (k0 + p) * {j_len} + {j0};")
            if width <= 16:
                self.emit("                CM_KEEP_LOOP")
            self.emit(
                f"                for (int j = 0; j < {width}; ++j) acc[p][j] += xk * row[j];"
            )
            self.emit("            }")
            self.emit("        }")
            if whole < k_len:
                self.emit(f"        for (int k = {whole}; k < {k_len}; ++k) {{")
                self.emit(f"            const float *row = {w_name} + k * {j_len} + {j0};")
                self.emit(
                    f"            for (int j = 0; j < {width}; ++j) acc[0][j] += {x}[k] * row[j];"
                )
                self.emit("        }")
            total = " + ".join(f"acc[{p}][j]" for p in range(parts))
            self.emit(f"        for (int j = 0; j < {width}; ++j) {out}[{j0} + j] = {total};")
            self.emit("    }")

    def layer_norm(self, node: onnx.NodeProto) -> None:
        attrs = _attrs(node)
        if attrs.get("axis", -1) not in (-1, 1) or attrs.get("stash_type", 1) != 1:
            raise UnsupportedGraphError(f"LayerNormalization {node.name!r} with {attrs}")
        if len(node.output) > 1 and any(node.output[1:]):
            raise UnsupportedGraphError(f"LayerNormalization {node.name!r}: extra outputs")
        x, length = self.activation(node, node.input[0])
        scale = self.operand(node, node.input[1], length)
        bias = self.operand(node, node.input[2], length) if len(node.input) > 2 else None
        eps = _c_float(attrs.get("epsilon", 1e-5))
        out = self.buffer(node.output[0], length)
        shifted = f"({x}[i] - mean) * inv_std * {scale('i')}"
        value = f"{shifted} + {bias('i')}" if bias else shifted
        self.emit("    {")
        self.emit(f"        const float mean = {self.sum(f'{x}[i]', length)} / {length}.0f;")
        square = f"({x}[i] - mean) * ({x}[i] - mean)"
        self.emit(f"        const float var = {self.sum(square, length)} / {length}.0f;")
        self.emit(f"        const float inv_std = 1.0f / sqrtf(var + {eps});")
        self.emit(f"        for (int i = 0; i < {length}; ++i) {out}[i] = {value};")
        self.emit("    }")

    def sum(self, term: str, length: int) -> str:
        """Emit a sum of ``term`` (in ``i``) over ``length`` into 8 partial sums, added in a
        fixed order: a vector's lanes without -ffast-math (a plain loop is a chain of
        dependent adds, ~0.25 µs for the 4 sums of 64 of two LayerNorms); returns the C
        expression of the total."""
        self.sums += 1
        k = self.sums
        lanes = f"s{k}"
        self.emit(f"        float {lanes}[8] = {{0.0f}};")
        whole = length // 8 * 8
        if whole:
            self.emit(f"        for (int i8 = 0; i8 < {whole}; i8 += 8) {{")
            self.emit("            for (int lane = 0; lane < 8; ++lane) {")
            self.emit("                const int i = i8 + lane;")
            self.emit(f"                {lanes}[lane] += {term};")
            self.emit("            }")
            self.emit("        }")
        if length > whole:
            self.emit(
                f"        for (int i = {whole}; i < {length}; ++i) {lanes}[i - {whole}] += {term};"
            )
        return f"((({lanes}[0] + {lanes}[1]) + ({lanes}[2] + {lanes}[3])) + (({lanes}[4] + {lanes}[5]) + ({lanes}[6] + {lanes}[7])))"

    def clip(self, node: onnx.NodeProto) -> None:
        x, length = self.activation(node, node.input[0])
        lo = self.operand(node, node.input[1], length) if len(node.input) > 1 else None
        hi = self.operand(node, node.input[2], length) if len(node.input) > 2 else None
        out = self.buffer(node.output[0], length)
        value = f"{x}[i]"
        if lo:  # as ORT: max with the lower bound first, then min with the upper
            value = f"({value} < {lo('i')} ? {lo('i')} : {value})"
        if hi:
            value = f"({value} > {hi('i')} ? {hi('i')} : {value})"
        self.emit(f"    for (int i = 0; i < {length}; ++i) {out}[i] = {value};")

    def gather(self, node: onnx.NodeProto) -> None:
        attrs = _attrs(node)
        index = np.asarray(self.constant(node, node.input[1]))
        x, length = self.activation(node, node.input[0])
        if attrs.get("axis", 0) != 1 or index.ndim != 1:
            raise UnsupportedGraphError(f"Gather {node.name!r}: only axis 1 with a 1-D index")
        index = np.where(index < 0, index + length, index)
        if index.min() < 0 or index.max() >= length:
            raise UnsupportedGraphError(f"Gather {node.name!r}: index out of range")
        out = self.buffer(node.output[0], index.size)
        table = f"g{len(self.weights)}"
        values = ", ".join(str(int(i)) for i in index)
        self.weights.append(f"static const int32_t {table}[{index.size}] = {{{values}}};")
        self.emit(f"    for (int i = 0; i < {index.size}; ++i) {out}[i] = {x}[{table}[i]];")

    def split(self, node: onnx.NodeProto) -> None:
        attrs = _attrs(node)
        x, length = self.activation(node, node.input[0])
        if attrs.get("axis", 0) not in (1, -1) or len(node.input) < 2:
            raise UnsupportedGraphError(f"Split {node.name!r}: only axis 1 with sizes")
        sizes = [int(s) for s in self.constant(node, node.input[1])]
        if sum(sizes) != length or len(sizes) != len(node.output):
            raise UnsupportedGraphError(f"Split {node.name!r}: sizes {sizes} vs {length}")
        offset = 0
        for name, size in zip(node.output, sizes, strict=True):
            # A view into the input: no copy (the parts are only read).
            self.lengths[name] = size
            self.c_names[name] = f"({x} + {offset})" if offset else x
            if node.input[0] in self.array_of:  # keeps the parent's array alive
                self.array_of[name] = self.array_of[node.input[0]]
            offset += size

    def concat(self, node: onnx.NodeProto) -> None:
        attrs = _attrs(node)
        if attrs.get("axis") not in (1, -1):
            raise UnsupportedGraphError(f"Concat {node.name!r}: only axis 1")
        parts = [self.activation(node, n) for n in node.input]
        out = self.buffer(node.output[0], sum(n for _, n in parts))
        offset = 0
        for c_name, n in parts:
            self.emit(f"    memcpy({out} + {offset}, {c_name}, {n} * sizeof(float));")
            offset += n

    def node(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedGraphError(f"node {node.name!r} is in domain {node.domain!r}")
        binary = {
            "Add": lambda a, b: f"{a} + {b}",
            "Sub": lambda a, b: f"{a} - {b}",
            "Mul": lambda a, b: f"{a} * {b}",
            "Div": lambda a, b: f"{a} / {b}",
            "Min": lambda a, b: f"({a} < {b} ? {a} : {b})",
            "Max": lambda a, b: f"({a} > {b} ? {a} : {b})",
        }
        unary = {
            "Gelu": lambda a: f"cm_gelu({a})",
            "Tanh": lambda a: f"cm_tanh({a})",
            "Erf": lambda a: f"cm_erf({a})",
            "Relu": lambda a: f"({a} > 0.0f ? {a} : 0.0f)",
            "Identity": lambda a: a,
        }
        op = node.op_type
        if op in ("Gemm", "MatMul"):
            self.gemm(node)
        elif op == "LayerNormalization":
            self.layer_norm(node)
        elif op == "Clip":
            self.clip(node)
        elif op == "Gather":
            self.gather(node)
        elif op == "Split":
            self.split(node)
        elif op == "Concat":
            self.concat(node)
        elif op in binary and len(node.input) == 2:
            self.elementwise(node, binary[op])
        elif op == "HardSigmoid":
            attrs = _attrs(node)
            alpha, beta = _c_float(attrs.get("alpha", 0.2)), _c_float(attrs.get("beta", 0.5))

            def hard_sigmoid(a: str) -> str:
                t = f"({alpha} * {a} + {beta})"
                return f"({t} < 0.0f ? 0.0f : ({t} > 1.0f ? 1.0f : {t}))"

            self.elementwise(node, hard_sigmoid)
        elif op in unary:
            attrs = _attrs(node)
            if op == "Gelu" and attrs.get("approximate", b"none") not in (b"none", "none"):
                raise UnsupportedGraphError(f"Gelu {node.name!r}: only the exact (erf) form")
            self.elementwise(node, unary[op])
        else:
            raise UnsupportedGraphError(
                f"node {node.name!r}: op {op} is not supported by the C emitter (supported: "
                f"Gemm, MatMul, LayerNormalization, Clip, HardSigmoid, Gather, Split, Concat, "
                f"{', '.join(sorted(binary))}, {', '.join(sorted(unary))})"
            )


def _check_finite_constant(name: str, value: np.ndarray) -> None:
    """ValueError naming the initializer if it holds NaN or inf (as float32)."""
    if value.dtype.kind not in "fc":
        return
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf
        as32 = np.asarray(value).astype(np.complex64 if value.dtype.kind == "c" else np.float32)
    bad = ~np.isfinite(as32)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"weight tensor {name!r} {list(value.shape)} holds {int(bad.sum())} non-finite "
            f"value(s) as float32 (NaN or inf; the first, {as32[first]}, at index {list(first)}); "
            f"refusing to export: a policy with non-finite weights computes NaN. Check the "
            f"training run (diverged?) or its checkpoint"
        )


def _attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _dims(value: onnx.ValueInfoProto):
    return value.type.tensor_type.shape.dim


def generate(
    model: onnx.ModelProto, onnx_name: str = "policy.onnx", dir_name: str = "DIR"
) -> CSources:
    """``policy.c``, ``policy.h`` and ``README.md`` for a compressm-rl ONNX step graph.

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
    for key in ("obs_dim", "act_dim", "state_size"):
        if key not in meta:
            raise ValueError(
                f"the ONNX model lacks metadata {key!r}: not a compressm-rl policy export"
            )
    obs_dim, action_dim, state_dim = (int(meta[k]) for k in ("obs_dim", "act_dim", "state_size"))
    emitter = _Emitter(model)
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
    safe = safe_action(meta)
    safe_outputs = (
        "/* The safe outputs (policy.h): the safe action, 0 clipped into the bounds, and\n"
        " * zeros for the state. */\n"
        f"static const float cm_safe_action[{action_dim}] = {_c_array(safe)};\n\n"
        "static void cm_safe_outputs(float *action, float *state_out)\n{\n"
        + f"    memcpy(action, cm_safe_action, {action_dim} * sizeof(float));\n"
        + (
            f"    memset(state_out, 0, {state_dim} * sizeof(float));\n"
            if state_dim
            else "    (void)state_out;\n"
        )
        + "}\n"
    )

    env = comment_text(meta.get("env_id") or "unknown env")
    title = f"compressm-rl policy step ({env})"
    onnx_name = comment_text(onnx_name)
    unused = "" if state_dim else "    (void)state;\n    (void)state_out;\n"
    function = (
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
    info = dict(sorted(meta.items()))
    source = (
        f"/* {title}\n * Generated by compressm-rl from {onnx_name} (nodes: "
        f"{len(model.graph.node)}, weights: {emitter.weight_bytes} bytes). */\n"
        f"/* {METADATA_TAG} {comment_json(info)} */\n"
        + _PRELUDE
        + "\n"
        + "\n\n".join([*emitter.weights, safe_outputs])
        + "\n"
        + function
    )
    library = ", ".join(f"`{name}`" for name in C_LIBRARY_SYMBOLS)
    safe_text = ", ".join(f"{float(v):.9g}" for v in safe)
    header = _HEADER.format(
        title=title,
        onnx_name=onnx_name,
        obs_dim=obs_dim,
        action_dim=action_dim,
        state_dim=state_dim,
        safe_action=safe_text,
        library=library.replace("`", ""),
    )
    readme = _README.format(
        title=title,
        onnx_name=onnx_name,
        env_id=env,
        policy_type=comment_text(meta.get("policy_type", "")),
        layer_state_dims=comment_text(meta.get("layer_state_dims", "[]")),
        dir_name=comment_text(dir_name, limit=1000),
        safe_action=safe_text,
        host_flags=" ".join(HOST_FLAGS),
        aarch64_flags=" ".join(f for f in AARCH64_FLAGS if f != "-static"),
        cortex_m4_flags=" ".join(f for f in CORTEX_M4_FLAGS if not f.startswith("-fstack")),
        library=library,
    )
    return CSources(source, header, readme, obs_dim, action_dim, state_dim, meta)
