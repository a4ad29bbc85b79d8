"""The C emitter proper: an ONNX step graph's nodes as C statements at batch 1.

``Emitter`` walks the graph once, in its order; each supported op (``Emitter.node``)
appends the loops that compute it to ``Emitter.body``, constants become ``static const``
arrays (``Emitter.weights``, exact hex-float literals, ``c_float``) and activations
``float v<i>[n]`` stack arrays, reused once their values are dead. Why the loops take the
forms they do (axpy products in ``BLOCK``-wide register blocks, partial sums in a fixed
order): ``export.c_codegen``. An op, attribute or shape it does not handle raises
``UnsupportedGraphError`` naming the node.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

BLOCK = 64  # outputs of a matrix-vector product held in registers at once


class UnsupportedGraphError(ValueError):
    """The ONNX graph holds an op, attribute or shape the C emitter does not handle."""


def c_float(value: float) -> str:
    """A float32 value as an exact C hex-float literal (ValueError if not finite: C has no
    literal for NaN or inf, and a policy's constants are finite)."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, refused below
        value = float(np.float32(value))
    if not np.isfinite(value):
        raise ValueError(f"non-finite constant {value} (float32) in the graph")
    if value == 0.0:
        return "-0.0f" if np.signbit(value) else "0.0f"
    return f"{value.hex()}f"


def c_array(values: np.ndarray) -> str:
    flat = np.asarray(values, np.float32).ravel()
    items = [c_float(v) for v in flat]
    lines = [", ".join(items[i : i + 8]) for i in range(0, len(items), 8)]
    return "{\n    " + ",\n    ".join(lines) + "\n}"


class Emitter:
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
        self.weights.append(f"static const float {c_name}[{values.size}] = {c_array(values)};")
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
            literal = c_float(value.ravel()[0])
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
        eps = c_float(attrs.get("epsilon", 1e-5))
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
            alpha, beta = c_float(attrs.get("alpha", 0.2)), c_float(attrs.get("beta", 0.5))

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
