"""Export a trained ``ActorCritic``'s actor to one ONNX step graph.

Graph (``B`` = dynamic batch, all float32)::

    inputs   obs    [B, obs_dim]   raw observations (normalisation is inside the graph)
             state  [B, S]         recurrent state; zeros = episode start   (SSM only)
    outputs  action [B, act_dim]   deterministic action, clamped to the action bounds
             state_out [B, S]      state to feed to the next step            (SSM only)

``S = Σ_l 2 n_l`` with the layout of ``LRUStack``: per layer ``[Re h_l (n_l), Im h_l (n_l)]``
concatenated over layers. An MLP policy has no recurrent state (``S = 0``); its graph has no
``state`` input and no ``state_out`` output, and ``state_size`` in the metadata is 0
(``export.runtime.OnnxPolicy`` hides the difference).

The graph is written node by node with ``onnx.helper`` rather than exported with
``torch.onnx.export(dynamo=True)`` (docs/design.md §8): tracing the torch step of a 2-layer
n=128 policy gives 131 nodes (complex ops decomposed into Gather/Slice/Concat/Unsqueeze),
this builder 23 (18 once the state is small, e.g. after compression), and every constant
and node is under our control. ONNX Runtime costs ~0.3-0.5 µs per node at batch 1
(docs/design.md §8, §10), so the graph avoids small nodes. Per LRU layer the complex recurrence is
written in the real form of ``policies.lti`` (rows, ``x = [Re h, Im h]``, the layer's slice
of ``state``)::

    A x = x ⊙ [a, a] + swap(x) ⊙ [-b, b],  λ = a + i b, swap exchanges Re and Im halves
    h' = Gemm(z, B_xᵀ, A x)                 z = LayerNorm(u)
    y  = Gemm(h', C_xᵀ, D ⊙ z)
    u' = u + GELU(y)

The layer is read once as ``LRU.system()``: the float32 numbers torch computes with
(λ's rounding is the error that compounds over time: with |λ| = 0.9999 over 600
HalfCheetah steps a float64-rounded λ left 6e-6 state drift against torch, torch's own λ
8e-7); products are formed in float64 and cast once to float32. ``A x`` is computed for
all layers at once (elementwise), or, when the whole state is small, merged with each
layer's output map into one block-diagonal MatMul (``_lru_stack``), then split per layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from policies.actor_critic import ActorCritic
from policies.lti import DiagonalSystem, merged_step_matrices, real_form

FORMAT_VERSION = "1"
PRODUCER = "compressm-rl"
DEFAULT_OPSET = 20  # native Gelu (ORT >= 1.17); 17-19 emit the erf form that ORT re-fuses
MIN_OPSET = 17  # LayerNormalization
# The merged path (see ``_lru_stack``) is 5 nodes shorter for 2 layers but multiplies the
# whole state by a dense [S, S + L·H] matrix and uses [H, 2n + H] per-layer Gemms: extra
# multiply-adds ≈ S (S + L·H) + L·H². It wins up to about this many (ORT 1.32, one Xeon
# core, batch 1, H = 64, 2 layers, p50 medians of 5 interleaved runs: S=90 13.2 vs
# 14.4 µs, S=192 14.7 vs 16.3, S=256 16.9 vs 16.7, S=512 34 vs 19.5 for merged vs
# elementwise). 70k is S ≈ 190 at H = 64, L = 2.
MERGED_PATH_MAX_EXTRA_MACS = 70_000


def uses_merged_path(state_dims: list[int], width: int) -> bool:
    """Whether ``build_model`` writes an LRU stack with these sizes on the merged path."""
    state, layers = 2 * sum(state_dims), len(state_dims)
    return state * (state + layers * width) + layers * width**2 <= MERGED_PATH_MAX_EXTRA_MACS


class _GraphBuilder:
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


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def _obs_normalisation(g: _GraphBuilder, policy: ActorCritic, obs: str) -> str:
    """``clip((obs - mean) / sqrt(var + eps), ±clip)`` as Gemm(diag(1/std), -mean/std) + Clip."""
    norm = policy.obs_norm
    std = np.sqrt(_f64(norm.var) + norm.eps)
    # One Gemm with a diagonal matrix instead of Sub + Div: one node less, same numbers
    # up to float32 rounding (the off-diagonal zeros add exactly nothing).
    x = g.gemm(obs, np.diag(1.0 / std), -_f64(norm.mean) / std, "obs_norm")
    clip = float(norm.clip)
    return g.op(
        "Clip", [x, g.const("obs_clip_lo", -clip), g.const("obs_clip_hi", clip)], "obs_clip"
    )


def _state_transition(g: _GraphBuilder, state: str, systems: list[DiagonalSystem]) -> str:
    """``A x`` for every layer at once: ``[B, S] -> [B, S]`` (block-diagonal A, layout kept).

    Elementwise complex multiply in real form: O(S), for states too large for the dense
    merged path of ``_lru_stack``.
    """
    swap, coef_self, coef_swap = [], [], []
    offset = 0
    for system in systems:
        a, b, n = system.lam.real, system.lam.imag, system.state_dim
        idx = np.arange(offset, offset + 2 * n)
        swap.append(np.concatenate([idx[n:], idx[:n]]))
        coef_self.append(np.concatenate([a, a]))
        coef_swap.append(np.concatenate([-b, b]))
        offset += 2 * n
    swapped = g.op(
        "Gather", [state, g.const("swap_index", np.concatenate(swap), np.int64)], "swap", axis=1
    )
    t1 = g.op("Mul", [state, g.const("lambda_re", np.concatenate(coef_self))], "ax_self")
    t2 = g.op("Mul", [swapped, g.const("lambda_im", np.concatenate(coef_swap))], "ax_swap")
    return g.op("Add", [t1, t2], "state_transition")


def _split(g: _GraphBuilder, x: str, sizes: list[int], name: str) -> list[str]:
    if len(sizes) == 1:
        return [x]
    splits = g.const(f"{name}_sizes", sizes, np.int64)
    return g.op("Split", [x, splits], name, n_out=len(sizes), axis=1)


def _lru_stack(g: _GraphBuilder, stack, x: str, state: str, opset: int, merged: bool) -> str:
    """Encoder + residual LRU blocks; returns features ``[B, H]`` and writes ``state_out``.

    Small states (``uses_merged_path``) take the merged path: per layer, one Gemm gives the
    new state and the output together, because both are linear in ``(x, z)``::

        [h' | y] = z @ [W_in | W_in W_out + diag D]  +  x @ [Aᵀ | Aᵀ W_out]

    and the ``x`` term of every layer comes from one block-diagonal MatMul on ``state``
    before the first layer. Per layer that is LayerNorm, Gemm, Split, Gelu, Add (5 nodes);
    the large-state path keeps ``A x`` elementwise and needs a Mul and a second Gemm.
    """
    u = g.gemm(x, _f64(stack.encoder.weight).T, _f64(stack.encoder.bias), "encoder")
    systems = [block.lru.system() for block in stack.blocks]
    width = int(stack.width)
    sizes = [2 * system.state_dim for system in systems]
    if merged:
        steps = [merged_step_matrices(*system) for system in systems]
        # x @ from_state per layer, block-diagonal over layers: [B, S] -> [B, Σ(2n+H)].
        carry_t = np.zeros((sum(sizes), sum(sizes) + width * len(systems)))
        row = col = 0
        for (from_state, _), n2 in zip(steps, sizes, strict=True):
            carry_t[row : row + n2, col : col + n2 + width] = from_state
            row, col = row + n2, col + n2 + width
        carried = g.op("MatMul", [state, g.const("carry_T", carry_t)], "state_carry")
        carried = _split(g, carried, [n2 + width for n2 in sizes], "carry_split")
    else:
        carried = _split(g, _state_transition(g, state, systems), sizes, "ax_split")
    single = len(systems) == 1  # then the layer's new state is the graph's state_out
    new_states = []
    for i, (block, system, carry_l) in enumerate(zip(stack.blocks, systems, carried, strict=True)):
        z = g.op(
            "LayerNormalization",
            [
                u,
                g.const(f"ln{i}.w", _f64(block.norm.weight)),
                g.const(f"ln{i}.b", _f64(block.norm.bias)),
            ],
            f"ln{i}",
            axis=-1,
            epsilon=float(block.norm.eps),
        )
        h_name = "state_out" if single else f"lru{i}_state"
        if merged:
            hy = g.gemm(z, steps[i][1], carry_l, f"lru{i}")
            h, y = g.op(
                "Split",
                [hy, g.const(f"lru{i}_sizes", [sizes[i], width], np.int64)],
                f"lru{i}_split",
                n_out=2,
                axis=1,
                names=[h_name, f"lru{i}_out"],
            )
        else:
            _, b_x, c_x, _ = real_form(*system)
            h = g.gemm(z, b_x.T, carry_l, h_name)
            dz = g.op("Mul", [z, g.const(f"lru{i}.D", system.D)], f"lru{i}_skip")
            y = g.gemm(h, c_x.T, dz, f"lru{i}_out")
        u = g.op("Add", [u, g.gelu(y, opset, f"gelu{i}")], f"residual{i}")
        new_states.append(h)
    if not single:
        g.op("Concat", new_states, "state_out", axis=1)
    return u


def _mlp_body(g: _GraphBuilder, body, x: str) -> str:
    for i, layer in enumerate(body.net):
        if isinstance(layer, torch.nn.Linear):
            x = g.gemm(x, _f64(layer.weight).T, _f64(layer.bias), f"mlp{i}")
        elif isinstance(layer, torch.nn.Tanh):
            x = g.op("Tanh", [x], f"mlp{i}_tanh")
        else:
            raise NotImplementedError(f"MLP layer {type(layer).__name__} has no ONNX mapping")
    return x


def _action_head(g: _GraphBuilder, policy: ActorCritic, features: str) -> str:
    head = policy.actor_head
    mean = g.gemm(features, _f64(head.weight).T, _f64(head.bias), "actor_head")
    low, high = _f64(policy.action_low), _f64(policy.action_high)
    if np.all(low == low[0]) and np.all(high == high[0]):
        # Same bound on every dimension: one Clip with scalar bounds.
        return g.op(
            "Clip", [mean, g.const("action_lo", low[0]), g.const("action_hi", high[0])], "action"
        )
    # Per-dimension bounds, in torch's order: max(min(mean, high), low).
    upper = g.op("Min", [mean, g.const("action_high", high)], "action_min")
    return g.op("Max", [upper, g.const("action_low", low)], "action")


def build_model(
    policy: ActorCritic,
    env_id: str = "",
    training_steps: int = 0,
    opset: int = DEFAULT_OPSET,
    merged: bool | None = None,
) -> onnx.ModelProto:
    """The actor's step graph as an ``onnx.ModelProto`` (see the module docstring).

    ``merged`` forces the LRU stack's merged (True) or elementwise (False) path; None
    picks by size (``uses_merged_path``). Both compute the same function.
    """
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(
            f"opset must be in [{MIN_OPSET}, {onnx.defs.onnx_opset_version()}], got {opset}"
        )
    g = _GraphBuilder()
    obs_dim, act_dim = policy.obs_dim, policy.act_dim
    state_size = int(policy.actor.state_size)
    recurrent = policy.policy_type == "ssm"
    if recurrent != (state_size > 0):
        raise ValueError(f"policy type {policy.policy_type!r} with state size {state_size}")

    x = _obs_normalisation(g, policy, "obs")
    if recurrent:
        if merged is None:
            merged = uses_merged_path(policy.actor.state_dims, policy.actor.width)
        features = _lru_stack(g, policy.actor, x, "state", opset, merged)
    else:
        features = _mlp_body(g, policy.actor, x)
    action = _action_head(g, policy, features)
    assert action == "action" and (not recurrent or "state_out" in g._names)

    inputs = [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", obs_dim])]
    outputs = [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", act_dim])]
    if recurrent:
        inputs.append(
            helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", state_size])
        )
        outputs.append(
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["batch", state_size])
        )
    graph = helper.make_graph(
        g.nodes, "compressm_rl_actor_step", inputs, outputs, initializer=g.initializers
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name=PRODUCER,
        producer_version=_package_version(),
        doc_string=__doc__.split("\n\n")[1],
    )
    # The oldest IR version that can hold this opset: loadable by the oldest ORT that can run it.
    model.ir_version = helper.find_min_ir_version_for(opsets)
    meta = _metadata(policy, env_id, training_steps, opset, num_nodes=len(g.nodes))
    helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    onnx.checker.check_model(model, full_check=True)
    return model


def _metadata(
    policy: ActorCritic, env_id: str, training_steps: int, opset: int, num_nodes: int
) -> dict:
    """The model's metadata props, read back by ``export.runtime.OnnxPolicy``."""
    return {
        "producer": PRODUCER,
        "format_version": FORMAT_VERSION,
        "env_id": env_id,
        "policy_type": policy.policy_type,
        "obs_dim": policy.obs_dim,
        "act_dim": policy.act_dim,
        "state_size": int(policy.actor.state_size),
        "layer_state_dims": json.dumps([int(n) for n in policy.actor.state_dims]),
        "width": int(policy.actor.width),
        "training_steps": int(training_steps),
        "num_nodes": num_nodes,
        "opset": opset,
        "action_low": json.dumps(_f64(policy.action_low).tolist()),
        "action_high": json.dumps(_f64(policy.action_high).tolist()),
    }


def to_onnx(
    policy: ActorCritic,
    path: str | Path,
    env_id: str = "",
    training_steps: int = 0,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write the actor's step graph to ``path`` (a ``.onnx`` file) and return the path.

    Args:
        policy: the trained policy (``"ssm"`` with any per-layer state sizes, or ``"mlp"``).
        path: output file; parent directories are created.
        env_id: recorded in the metadata (``OnnxPolicy.metadata["env_id"]``).
        training_steps: env steps the policy was trained for, recorded in the metadata.
        opset: ONNX opset, 17 or newer (20 by default: native ``Gelu``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(policy, env_id=env_id, training_steps=training_steps, opset=opset)
    onnx.save_model(model, str(path))
    return path


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressm-rl")
    except Exception:  # not installed (running from a checkout)
        return "0"
