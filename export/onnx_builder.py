"""The primitives ``export.onnx_export`` writes a step graph with: a builder of nodes and
float32 initialisers with unique names (``GraphBuilder``), and the small patterns several
parts of the graph share (a Split, a LayerNorm)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper


class GraphBuilder:
    """Collects nodes and float32 initialisers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = {"obs", "state"}  # graph inputs

    def _unique(self, name: str) -> str:
        base, k = name, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def const(self, name: str, value: np.ndarray | float, dtype=np.float32) -> str:
        """Add an initialiser (cast once to ``dtype``) and return its name."""
        name = self._unique(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        n_out: int = 1,
        names: list[str] | None = None,
        **attrs,
    ) -> str | list[str]:
        """Add a node; returns its output name (or names when ``n_out > 1``).

        A single output is named ``name`` when that name is free (graph outputs rely on it);
        ``names`` names several outputs.
        """
        names = names or [name if n_out == 1 else f"{name}_{i}" for i in range(n_out)]
        outputs = [self._unique(n) for n in names]
        self.nodes.append(
            helper.make_node(op_type, inputs, outputs, name=self._unique(f"{name}_node"), **attrs)
        )
        return outputs[0] if n_out == 1 else outputs

    def gemm(self, x: str, weight: np.ndarray, bias: np.ndarray | str | None, name: str) -> str:
        """``x @ weight + bias``; ``weight`` ``[in, out]``; ``bias`` a constant or a tensor name."""
        inputs = [x, self.const(f"{name}.W", weight)]
        if bias is not None:
            inputs.append(bias if isinstance(bias, str) else self.const(f"{name}.b", bias))
        return self.op("Gemm", inputs, name)

    def gelu(self, x: str, opset: int, name: str) -> str:
        """Exact (erf) GELU, as ``torch.nn.functional.gelu``'s default."""
        if opset >= 20:
            return self.op("Gelu", [x], name)
        # 0.5 x (1 + erf(x / √2)): the pattern ORT's GeluFusion turns back into one node.
        t = self.op("Div", [x, self.const(f"{name}.sqrt2", math.sqrt(2.0))], f"{name}_div")
        t = self.op("Erf", [t], f"{name}_erf")
        t = self.op("Add", [t, self.const(f"{name}.one", 1.0)], f"{name}_add")
        t = self.op("Mul", [x, t], f"{name}_mul")
        return self.op("Mul", [t, self.const(f"{name}.half", 0.5)], name)


def f64(t: torch.Tensor) -> np.ndarray:
    """A tensor's values in float64 (constants are formed in float64, cast once to float32)."""
    return t.detach().cpu().to(torch.float64).numpy()


def split(
    g: GraphBuilder, x: str, sizes: list[int], name: str, names: list[str] | None = None
) -> list[str]:
    """``x`` split along the features into parts of ``sizes`` (no node for one part)."""
    if len(sizes) == 1:
        return [x]
    splits = g.const(f"{name}_sizes", sizes, np.int64)
    return g.op("Split", [x, splits], name, n_out=len(sizes), axis=1, names=names)


def layer_norm(
    g: GraphBuilder, u: str, norm: torch.nn.LayerNorm, i: int, scale=None, bias=None
) -> str:
    """LayerNorm over the features; ``scale``/``bias`` replace the module's affine (a
    ``bias`` of False writes none)."""
    scale = f64(norm.weight) if scale is None else scale
    bias = f64(norm.bias) if bias is None else bias
    inputs = [u, g.const(f"ln{i}.w", scale)]
    if bias is not False:
        inputs.append(g.const(f"ln{i}.b", bias))
    return g.op("LayerNormalization", inputs, f"ln{i}", axis=-1, epsilon=float(norm.eps))
