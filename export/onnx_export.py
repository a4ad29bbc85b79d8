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
this builder 21 (16 once the state is small, e.g. after compression), and every constant
and node is under our control. ONNX Runtime's ``ORT_ENABLE_ALL`` fuses nothing in these
graphs (only Gemm + Tanh in the MLP's), and at batch 1 a node costs ~0.5-1 µs beside
~0.1 µs per 1,000 multiply-adds (one AMD EPYC core, ORT 1.32), so the graph trades
multiply-adds for nodes where that measured faster. Per LRU layer the complex recurrence
is written in the real form of ``policies.lti`` (rows, ``x = [Re h, Im h]``, the layer's
slice of ``state``)::

    A x = x ⊙ [a, a] + swap(x) ⊙ [-b, b],  λ = a + i b, swap exchanges Re and Im halves
    h' = Gemm(z, B_xᵀ, A x)                 z = LayerNorm(u)
    y  = Gemm(h', C_xᵀ, D ⊙ z)
    u' = u + GELU(y)

(the elementwise path), or with ``[h' | y]`` from one Gemm on ``z`` plus a product of the
state with ``[Aᵀ | Aᵀ C_xᵀ]`` (the merged path, ``_lru_merged``). Rewrites (``FOLDS``), each
the same function up to float32 rounding:

- ``skip_d``: the LayerNorm's affine times D gives ``D ⊙ z`` itself, the bias of ``y``;
  ``h'`` reads it through ``diag(1/D) B_xᵀ`` (no Mul).
- ``dense_a``: ``A x`` as one MatMul with the block-diagonal ``Aᵀ`` (for Gather, Mul,
  Mul, Add; S² multiply-adds).
- ``chain``: the whole state runs through the layers' Gemm biases with zero weights
  outside each layer's columns, the last one writing ``state_out`` (no Split, no Concat).
- ``ln_affine`` (merged path): the LayerNorm's scale and bias folded into the Gemm.

``build_model``'s default is ONNX Runtime's graph: the elementwise path with ``skip_d``,
plus ``dense_a`` and ``chain`` while the state is small enough for them to pay
(``ort_folds``): 16 nodes for n = [25, 25] (18 before these rewrites, on the merged path),
21 for [128, 128] (23). ``merged=False`` is the elementwise path with ``skip_d`` only, the
fewest multiply-adds (the C export's graph); ``merged=True`` the merged path, which at the
same node count always has L·(L+1)/2·H² more multiply-adds than the automatic graph.
Measured (``python benchmarks/onnx_graph.py --rounds 40``, one AMD EPYC core, ORT 1.32,
batch 1, two runs): the n = [25, 25] step p50 is 0.84-0.86× the graph before and 1.9× the
MLP 64-64's (2.2× before); n = [128, 128] 0.90-0.97× the graph before.

The layer is read once as ``LRU.system()``: the float32 numbers torch computes with
(λ's rounding is the error that compounds over time: with |λ| = 0.9999 over 600
HalfCheetah steps a float64-rounded λ left 6e-6 state drift against torch, torch's own λ
8e-7); products are formed in float64 and cast once to float32.

The graph's primitives (``GraphBuilder``: unique names, Gemm, GELU; Split, LayerNorm) are
in ``export.onnx_builder``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from export.onnx_builder import GraphBuilder, f64, layer_norm, split
from policies.actor_critic import ActorCritic
from policies.lti import DiagonalSystem, merged_step_matrices, real_form

FORMAT_VERSION = "1"
PRODUCER = "compressm-rl"
DEFAULT_OPSET = 20  # native Gelu (ORT >= 1.17); 17-19 emit the erf form that ORT re-fuses
MIN_OPSET = 17  # LayerNormalization
# The graph rewrites (docs/design.md §8), each exact up to float32 rounding:
#   "skip_d"    elementwise path: the LayerNorm's affine scaled by D yields D ⊙ z itself
#               (no Mul node; where every |D| is in [1e-12, 1e12]).
#   "ln_affine" merged path: the LayerNorm's scale and bias folded into the Gemm after it.
#   "dense_a"   elementwise path: A x as one MatMul with the block-diagonal Aᵀ (1 node
#               for Gather, Mul, Mul, Add; S² multiply-adds instead of O(S)).
#   "chain"     the whole state runs through the layers' Gemm biases, zero weights outside
#               each layer's columns (no Split of it, no Concat of the new states).
FOLDS = ("chain", "ln_affine", "skip_d", "dense_a")
# On an explicitly chosen path (``merged`` True or False) the folds that add no work:
# merged=False is the C export's graph (fewest multiply-adds, export.c_codegen).
DEFAULT_FOLDS = ("ln_affine", "skip_d")
# The automatic graph (``merged=None``) is ORT's: each fold where the nodes it removes cost
# more than the multiply-adds it adds. p50 with the fold ÷ without (ORT 1.32, one AMD
# EPYC core, batch 1, H = 64, 2 layers, medians over 25-30 interleaved rounds,
# docs/design.md §8): dense_a 0.91 at S = 128, 1.00 at 160, 1.03 at 256; chain 0.92 at
# S = 128, 0.90 at 192, 0.99 at 224, 1.01 at 256.
DENSE_A_MAX_MACS = 25_000  # S² up to this: S ≤ 158
CHAIN_MAX_EXTRA_MACS = 25_000  # 2·H·S·(L - 1) up to this: S ≤ 195 at H = 64, L = 2


def ort_folds(state_dims: list[int], width: int) -> tuple[str, ...]:
    """The folds of the automatic (ONNX Runtime) graph of an LRU stack with these sizes.

    Always on the elementwise path (the merged path has the same node count as the
    elementwise path with "dense_a" and "chain", and L·(L+1)/2 · H² more multiply-adds).
    """
    state, layers = 2 * sum(state_dims), len(state_dims)
    folds = ["skip_d"]
    if state * state <= DENSE_A_MAX_MACS:
        folds.append("dense_a")
    if layers > 1 and 2 * width * state * (layers - 1) <= CHAIN_MAX_EXTRA_MACS:
        folds.append("chain")
    return tuple(f for f in FOLDS if f in folds)


def _obs_normalisation(g: GraphBuilder, policy: ActorCritic, obs: str) -> str:
    """``clip((obs - mean) / sqrt(var + eps), ±clip)`` as Gemm(diag(1/std), -mean/std) + Clip.

    (Folding it into the first layer needs per-dimension raw bounds, Max + Min: measured
    slower, docs/design.md §8.)
    """
    norm = policy.obs_norm
    std = np.sqrt(f64(norm.var) + norm.eps)
    # One Gemm with a diagonal matrix instead of Sub + Div: one node less, same numbers
    # up to float32 rounding (the off-diagonal zeros add exactly nothing).
    x = g.gemm(obs, np.diag(1.0 / std), -f64(norm.mean) / std, "obs_norm")
    clip = float(norm.clip)
    return g.op(
        "Clip", [x, g.const("obs_clip_lo", -clip), g.const("obs_clip_hi", clip)], "obs_clip"
    )


def _state_transition(g: GraphBuilder, state: str, systems: list[DiagonalSystem]) -> str:
    """``A x`` for every layer at once: ``[B, S] -> [B, S]`` (block-diagonal A, layout kept).

    Elementwise complex multiply in real form: O(S), for states too large for ``dense_a``.
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


def _merged_layout(sizes: list[int], width: int, chain: bool) -> tuple[list[int], list[int], int]:
    """Column of each layer's new state and output in the merged path's carried vector,
    and its width ``S + L·H``.

    ``chain``: ``[y_0 | ... | y_{L-2} | h_0 | ... | h_{L-1} | y_{L-1}]``, so that layer l
    reads the columns from ``l·H`` on and splits its ``y_l`` off the front; otherwise one
    ``[h_l | y_l]`` block per layer.
    """
    layers, total = len(sizes), sum(sizes) + len(sizes) * width
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    if chain:
        state_col = [(layers - 1) * width + o for o in offsets]
        out_col = [i * width for i in range(layers - 1)] + [total - width]
    else:
        block = np.concatenate([[0], np.cumsum([n2 + width for n2 in sizes])[:-1]])
        state_col = block.astype(int).tolist()
        out_col = [c + n2 for c, n2 in zip(state_col, sizes, strict=True)]
    return state_col, out_col, total


def _lru_merged(
    g: GraphBuilder, stack, u: str, state: str, chain: bool, ln_affine: bool, opset: int
) -> str:
    """The LRU blocks on the merged path; returns the features ``[B, H]``.

    Per layer one Gemm gives the new state and the output together, as both are linear
    in ``(x, z)``::

        [h' | y] = z @ [W_in | W_in W_out + diag D]  +  x @ [Aᵀ | Aᵀ W_out]

    The ``x`` terms of every layer come from one product with the whole state before the
    first layer (its "carried" vector, ``_merged_layout``). ``chain``: layer l's Gemm adds
    its ``z`` term to everything still carried (zero weights elsewhere) and splits its
    output ``y_l`` off the front; the rest, the finished states included, is the next
    layer's Gemm bias, and the last layer's split yields ``state_out`` whole (no Split of
    the carried vector, no Concat). ``ln_affine``: the LayerNorm's scale and bias folded
    into the Gemm (``z W = n (diag(w) W) + b W``, the constant ``b W`` into the carry's
    bias); the LayerNorm is written with scale 1 and no bias.
    """
    systems = [block.lru.system() for block in stack.blocks]
    width, layers = int(stack.width), len(systems)
    sizes = [2 * system.state_dim for system in systems]
    carry_t, carry_bias, weights = _merged_weights(systems, stack.blocks, width, chain, ln_affine)
    total = carry_t.shape[1]
    carry_inputs = [state, g.const("carry_T", carry_t)]
    if ln_affine:
        carried = g.op("Gemm", [*carry_inputs, g.const("carry_b", carry_bias)], "state_carry")
    else:
        carried = g.op("MatMul", carry_inputs, "state_carry")
    if not chain:
        carried = split(g, carried, [n2 + width for n2 in sizes], "carry_split")
    new_states = []
    for i, block in enumerate(stack.blocks):
        last = i == layers - 1
        if ln_affine:
            z = layer_norm(g, u, block.norm, i, scale=np.ones(width), bias=False)
        else:
            z = layer_norm(g, u, block.norm, i)
        bias = carried if chain else carried[i]
        hy = g.gemm(z, weights[i], bias, f"lru{i}")
        if chain and not last:
            y, carried = split(
                g,
                hy,
                [width, total - (i + 1) * width],
                f"lru{i}_split",
                [f"lru{i}_out", f"lru{i}_carry"],
            )
        else:
            h_name = "state_out" if chain or layers == 1 else f"lru{i}_state"
            h, y = split(
                g,
                hy,
                [sizes[i] if not chain else sum(sizes), width],
                f"lru{i}_split",
                [h_name, f"lru{i}_out"],
            )
            new_states.append(h)
        u = g.op("Add", [u, g.gelu(y, opset, f"gelu{i}")], f"residual{i}")
    if len(new_states) > 1:
        g.op("Concat", new_states, "state_out", axis=1)
    return u


def _merged_weights(
    systems: list[DiagonalSystem], blocks, width: int, chain: bool, ln_affine: bool
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The merged path's constants (float64): the carry's weight ``[S, S + L·H]``
    (transposed) and bias, and each layer's input weight over the columns it reads
    (``_lru_merged``)."""
    sizes = [2 * system.state_dim for system in systems]
    state_col, out_col, total = _merged_layout(sizes, width, chain)
    carry_t = np.zeros((sum(sizes), total))
    carry_bias = np.zeros(total)
    weights = []
    row = 0
    for i, (system, block, n2) in enumerate(zip(systems, blocks, sizes, strict=True)):
        from_state, from_input = merged_step_matrices(*system)
        carry_t[row : row + n2, state_col[i] : state_col[i] + n2] = from_state[:, :n2]
        carry_t[row : row + n2, out_col[i] : out_col[i] + width] = from_state[:, n2:]
        row += n2
        # Layer i's input weight over the columns it reads: from ``i·H`` on when chained,
        # its own block otherwise.
        first = i * width if chain else state_col[i]
        span = total - first if chain else n2 + width
        w = np.zeros((width, span))
        w[:, state_col[i] - first : state_col[i] - first + n2] = from_input[:, :n2]
        w[:, out_col[i] - first : out_col[i] - first + width] = from_input[:, n2:]
        if ln_affine:
            carry_bias[first : first + span] += f64(block.norm.bias) @ w
            w = f64(block.norm.weight)[:, None] * w
        weights.append(w)
    return carry_t, carry_bias, weights


def _skip_d_foldable(d: np.ndarray) -> bool:
    """Whether ``D`` can move into the LayerNorm's affine: every |D| large enough that
    ``1/D`` and ``w·D`` stay normal float32 numbers with room to spare."""
    return bool(np.all(np.abs(d) >= 1e-12) and np.all(np.abs(d) <= 1e12))


def _lru_elementwise(
    g: GraphBuilder,
    stack,
    u: str,
    state: str,
    skip_d: bool,
    dense_a: bool,
    chain: bool,
    opset: int,
) -> str:
    """The LRU blocks on the elementwise path; returns the features ``[B, H]``.

    ``A x`` for all layers by ``_state_transition`` (or ``dense_a``), then per layer ``h' = Gemm(z, B_xᵀ, A x)``, ``y = Gemm(h', C_xᵀ, D ⊙ z)``. ``skip_d`` (where
    ``_skip_d_foldable``): the LayerNorm's affine is scaled by D, so it yields ``D ⊙ z``
    itself, the Gemm bias of ``y``; ``h'`` reads it with ``diag(1/D) B_xᵀ`` (no Mul node;
    each term ``(D z) (B/D)`` rounds like ``z B``). ``dense_a``: ``A x`` as one MatMul
    with the block-diagonal ``Aᵀ`` (S² multiply-adds, one node instead of four).
    ``chain``: the whole state vector runs through the layers' ``h'`` Gemms as their bias
    (zero weights outside the layer's columns), ``y`` reads its layer's rows of it, and the
    last ``h'`` Gemm writes ``state_out`` (no Split, no Concat; 2·H·S·(L-1) more
    multiply-adds).
    """
    systems = [block.lru.system() for block in stack.blocks]
    layers = len(systems)
    sizes = [2 * system.state_dim for system in systems]
    total = sum(sizes)
    if dense_a:
        a_t = np.zeros((total, total))
        row = 0
        for system, n2 in zip(systems, sizes, strict=True):
            a_t[row : row + n2, row : row + n2] = real_form(*system)[0].T
            row += n2
        ax = g.op("MatMul", [state, g.const("A_T", a_t)], "state_transition")
    else:
        ax = _state_transition(g, state, systems)
    chain = chain and layers > 1
    carried = ax if chain else split(g, ax, sizes, "ax_split")
    new_states = []
    offset = 0
    for i, (block, system) in enumerate(zip(stack.blocks, systems, strict=True)):
        _, b_x, c_x, _ = real_form(*system)
        n2 = sizes[i]
        if chain:  # the layer's matrices placed at its columns (B) and rows (C) of the state
            b_full, c_full = np.zeros((total, b_x.shape[1])), np.zeros((c_x.shape[0], total))
            b_full[offset : offset + n2], c_full[:, offset : offset + n2] = b_x, c_x
            b_x, c_x = b_full, c_full
        offset += n2
        last = i == layers - 1
        h_name = "state_out" if layers == 1 or (chain and last) else f"lru{i}_state"
        bias = carried if chain else carried[i]
        d = system.D
        if skip_d:
            w, b = f64(block.norm.weight), f64(block.norm.bias)
            dz = layer_norm(g, u, block.norm, i, scale=w * d, bias=b * d)
            h = g.gemm(dz, b_x.T / d[:, None], bias, h_name)
        else:
            z = layer_norm(g, u, block.norm, i)
            h = g.gemm(z, b_x.T, bias, h_name)
            dz = g.op("Mul", [z, g.const(f"lru{i}.D", d)], f"lru{i}_skip")
        y = g.gemm(h, c_x.T, dz, f"lru{i}_out")
        u = g.op("Add", [u, g.gelu(y, opset, f"gelu{i}")], f"residual{i}")
        new_states.append(h)
        carried = h if chain else carried
    if layers > 1 and not chain:
        g.op("Concat", new_states, "state_out", axis=1)
    return u


def _mlp_body(g: GraphBuilder, body, x: str) -> str:
    for i, layer in enumerate(body.net):
        if isinstance(layer, torch.nn.Linear):
            x = g.gemm(x, f64(layer.weight).T, f64(layer.bias), f"mlp{i}")
        elif isinstance(layer, torch.nn.Tanh):
            x = g.op("Tanh", [x], f"mlp{i}_tanh")
        else:
            raise NotImplementedError(f"MLP layer {type(layer).__name__} has no ONNX mapping")
    return x


def _action_head(g: GraphBuilder, policy: ActorCritic, features: str) -> str:
    head = policy.actor_head
    mean = g.gemm(features, f64(head.weight).T, f64(head.bias), "actor_head")
    low, high = f64(policy.action_low), f64(policy.action_high)
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
    folds: tuple[str, ...] | list[str] | None = None,
) -> onnx.ModelProto:
    """The actor's step graph as an ``onnx.ModelProto`` (see the module docstring).

    ``merged``: None (the default) writes ONNX Runtime's fastest graph for the sizes, the
    elementwise path with ``ort_folds``; True the merged path, False the elementwise path
    (the C export's graph), each with ``DEFAULT_FOLDS`` (the rewrites that add no work).
    ``folds`` overrides the rewrites: a subset of ``FOLDS`` (``()``: the plain graph); a
    fold that does not apply to the path is skipped. Every choice computes the same
    function up to float32 rounding. The metadata records the path (``graph_variant``:
    "merged", "elementwise" or "mlp") and the folds applied (``graph_folds``).
    """
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(
            f"opset must be in [{MIN_OPSET}, {onnx.defs.onnx_opset_version()}], got {opset}"
        )
    g = GraphBuilder()
    state_size = int(policy.actor.state_size)
    recurrent = policy.policy_type == "ssm"
    if recurrent != (state_size > 0):
        raise ValueError(f"policy type {policy.policy_type!r} with state size {state_size}")

    x = _obs_normalisation(g, policy, "obs")
    if recurrent:
        features, variant, applied = _lru_body(g, policy.actor, x, merged, folds, opset)
    else:
        _check_folds(() if folds is None else folds)
        variant, applied = "mlp", {}
        features = _mlp_body(g, policy.actor, x)
    action = _action_head(g, policy, features)
    assert action == "action" and (not recurrent or "state_out" in g._names)

    model = _model_proto(g, policy, opset)
    meta = _metadata(policy, env_id, training_steps, opset, num_nodes=len(g.nodes))
    meta["graph_variant"] = variant
    meta["graph_folds"] = ",".join(f for f in FOLDS if applied.get(f))
    helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    onnx.checker.check_model(model, full_check=True)
    return model


def _lru_body(
    g: GraphBuilder, stack, x: str, merged: bool | None, folds, opset: int
) -> tuple[str, str, dict[str, bool]]:
    """The encoder and the LRU blocks on the path ``build_model`` picks; returns the
    features, the path's name and the folds it applied."""
    if folds is None:
        folds = DEFAULT_FOLDS if merged is not None else ort_folds(stack.state_dims, stack.width)
    folds = _check_folds(folds)
    u = g.gemm(x, f64(stack.encoder.weight).T, f64(stack.encoder.bias), "encoder")
    layers = len(stack.blocks)
    if merged:
        chain, ln_affine = "chain" in folds and layers > 1, "ln_affine" in folds
        applied = {"chain": chain, "ln_affine": ln_affine}
        return _lru_merged(g, stack, u, "state", chain, ln_affine, opset), "merged", applied
    skip_d = "skip_d" in folds and all(_skip_d_foldable(f64(block.lru.D)) for block in stack.blocks)
    dense_a, chain = "dense_a" in folds, "chain" in folds and layers > 1
    applied = {"chain": chain, "skip_d": skip_d, "dense_a": dense_a}
    features = _lru_elementwise(g, stack, u, "state", skip_d, dense_a, chain, opset)
    return features, "elementwise", applied


def _model_proto(g: GraphBuilder, policy: ActorCritic, opset: int) -> onnx.ModelProto:
    """The graph's nodes and initialisers as a model: inputs, outputs, opset, IR version
    and producer (no metadata yet)."""
    obs_dim, act_dim = policy.obs_dim, policy.act_dim
    state_size = int(policy.actor.state_size)
    inputs = [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", obs_dim])]
    outputs = [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", act_dim])]
    if policy.policy_type == "ssm":
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
    return model


def _check_folds(folds) -> set[str]:
    folds = {folds} if isinstance(folds, str) else set(folds)
    if not folds <= set(FOLDS):
        raise ValueError(f"unknown folds {sorted(folds - set(FOLDS))}; known: {list(FOLDS)}")
    return folds


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
        "action_low": json.dumps(f64(policy.action_low).tolist()),
        "action_high": json.dumps(f64(policy.action_high).tolist()),
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
