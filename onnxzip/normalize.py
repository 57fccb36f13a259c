"""Passes that make different exporters' graphs alike before parsing.

Each pass takes a ``ModelProto`` and edits it in place; :func:`normalize` runs them in order on
a copy. After normalization a graph has: no local functions, no ``Constant`` nodes, no
``Identity``/``Dropout`` aliases, no node whose inputs are all constants, Transposes moved below
element-wise activations and consecutive Transposes composed (inverse pairs removed),
BatchNormalization folded into the Conv/Gemm before it where possible, Gemm with
``alpha = beta = 1``, a dense layer that reads a feature map through layout ops (Transpose to NHWC,
Reshape, Squeeze, ...) reading ``Flatten`` of it instead with its kernel rows permuted to match,
every float initializer used by exactly one node input, no unused opset domain, and nodes in
topological order.

:data:`PASSES` lists the passes in order, each by name; each edits the model in place and returns
what it changed, in words, so that ``onnxzip check`` can say which exporter spellings it treated as
equivalent.

:func:`align_input_layouts` puts a Transpose in front of a model whose image input is NHWC where
its partner's is NCHW (or the other way round), so that both take one layout.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.logger import G_LOGGER
import onnx.inliner
import onnx.reference
import onnx.version_converter
from onnx import helper, numpy_helper

from onnxzip.errors import ModelLoadError, OptionError
from onnxzip.fused import split_fused_projections
from onnxzip.onnx_nodes import attr, consumers, prune, toposort
from onnxzip.runtime import session

__all__ = [
    "normalize", "PASSES", "opset_of", "convert_opset", "guess_layout", "permute_input",
    "align_input_layouts",
]

# Constant folding never materializes tensors bigger than this (elements).
_FOLD_LIMIT = 1 << 26


def opset_of(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def convert_opset(model: onnx.ModelProto, opset: int, label: str = "model") -> onnx.ModelProto:
    """Convert a model to another opset of the default domain."""
    if opset_of(model) == opset:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    except Exception as e:  # the converter raises bare RuntimeErrors/ValueErrors
        raise ModelLoadError(
            f"{label}: cannot convert from opset {opset_of(model)} to {opset} ({str(e).splitlines()[0]}); "
            "re-export both models with the same opset"
        ) from e
    converted.ir_version = max(converted.ir_version, model.ir_version)
    del converted.graph.value_info[:]  # the converter's own shape guesses, not the exporter's
    return converted


def normalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A normalized copy of ``model`` and what the passes changed, in words (see the module
    docstring; ``onnxzip check`` reports the notes as the spellings it treated as equivalent)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    notes: list[str] = []
    for _, run in PASSES:
        notes += run(m)
    return m, _dense_spelling_notes(m) + _conv_spelling_notes(m) + notes


def _inline_functions(m: onnx.ModelProto) -> list[str]:
    if not len(m.functions):
        return []
    count = len(m.functions)
    m.CopyFrom(onnx.inliner.inline_local_functions(m))
    return [f"inlined {count} local function(s)"]


def _discard_value_info(m: onnx.ModelProto) -> list[str]:
    # some exporters (jax2onnx) write value_info that disagrees with the real shapes
    count = len(m.graph.value_info)
    del m.graph.value_info[:]
    return [f"discarded {count} value_info entries (shapes are probed with onnxruntime)"] if count else []


def _transposes(m: onnx.ModelProto) -> list[str]:
    sunk, cancelled = simplify_transposes(m)
    return ([f"moved {sunk} Transpose(s) below element-wise ops or into reductions"] if sunk else []) + (
        [f"composed or removed {cancelled} consecutive Transpose pair(s)"] if cancelled else [])


def _sum_to_mean(m: onnx.ModelProto) -> list[str]:
    fused = sum_to_mean(m)
    return [f"fused {fused} ReduceSum + Div (average pooling) into ReduceMean"] if fused else []


def _fold_batchnorm(m: onnx.ModelProto) -> list[str]:
    folded = fold_batchnorm(m)
    kinds = ", ".join(f"{n} into {op}" for op, n in sorted(folded.items()))
    return [f"folded BatchNormalization ({kinds})"] if folded else []


def _split_fused(m: onnx.ModelProto) -> list[str]:

    return split_fused_projections(m)


def _split_interleaved(m: onnx.ModelProto) -> list[str]:
    from onnxzip.fused_heads import split_interleaved_projections

    return split_interleaved_projections(m)


def _identity_gathers(m: onnx.ModelProto) -> list[str]:
    from onnxzip.strided import identity_gathers_to_reshapes

    return identity_gathers_to_reshapes(m)


def _unused_domains(m: onnx.ModelProto) -> list[str]:
    dropped = drop_unused_domains(m)
    return [f"dropped unused opset domain(s) {', '.join(dropped)}"] if dropped else []


def _silent(edit):
    """A pass whose change needs no note."""
    def run(m: onnx.ModelProto) -> list[str]:
        edit(m)
        return []
    return run


def _dense_spelling_notes(m: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in m.graph.initializer}
    kinds: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] in inits:
            key = "Gemm transB=1 (kernel [out, in])" if attr(n, "transB", 0) else "Gemm transB=0 (kernel [in, out])"
        elif n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            key = "MatMul (+ Add) (kernel [in, out])"
        else:
            continue
        kinds[key] = kinds.get(key, 0) + 1
    return [f"dense layers as {k}: {v}" for k, v in sorted(kinds.items())]


def _conv_spelling_notes(m: onnx.ModelProto) -> list[str]:
    pads: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type != "Conv":
            continue
        ap = str(attr(n, "auto_pad", "NOTSET"))
        if ap not in ("NOTSET", ""):
            pads[ap] = pads.get(ap, 0) + 1
    return [f"Conv padding as auto_pad={k}: {v}" for k, v in sorted(pads.items())]


def drop_initializer_inputs(m: onnx.ModelProto) -> None:
    """Old IR versions list initializers among the graph inputs; they are not real inputs."""
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)


_NOT_FOLDED = {"Identity", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}


def fold_constants(m: onnx.ModelProto) -> None:
    """Replace Constant nodes, and nodes whose inputs are all constants, by initializers
    (onnx-graphsurgeon's constant folding, evaluated by onnxruntime). Weights behind an Identity
    are kept as the alias they are: remove_aliases handles them."""
    graph = gs.import_onnx(m)
    # the folding session's optimizer warns about nodes it leaves alone: onnxruntime's own default
    # severity (warning) is restored afterwards
    ort.set_default_logger_severity(3)
    severity, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.ERROR
    try:
        graph.fold_constants(fold_shapes=False, error_ok=True, size_threshold=_FOLD_LIMIT * 4,
                             should_exclude_node=lambda node: node.op in _NOT_FOLDED or (node.domain or "") not in ("", "ai.onnx"))
    finally:
        ort.set_default_logger_severity(2)
        G_LOGGER.severity = severity
    graph.cleanup(remove_unused_graph_inputs=False)
    folded = gs.export_onnx(graph, do_type_check=False)
    m.graph.CopyFrom(folded.graph)


def _drop_unused_initializers(m: onnx.ModelProto) -> None:
    used = {i for n in m.graph.node for i in n.input}
    used |= {o.name for o in m.graph.output}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)


def _rename_uses(m: onnx.ModelProto, old: str, new: str) -> None:
    for n in m.graph.node:
        for k, name in enumerate(n.input):
            if name == old:
                n.input[k] = new


def remove_aliases(m: onnx.ModelProto) -> None:
    """Remove Identity nodes and inference-mode Dropout (their output is their input)."""
    g = m.graph
    graph_outputs = {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    keep = []
    for node in g.node:
        alias = node.op_type == "Identity" or (
            node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1])
        )
        if alias and node.input[0]:
            src, dst = node.input[0], node.output[0]
            if dst in graph_outputs:
                # keep the graph output's name: rename the producer's output instead
                producer = next((p for p in keep if src in p.output), None)
                if producer is None or src in graph_outputs:
                    if src in inits and src not in graph_inputs:
                        t = onnx.TensorProto()
                        t.CopyFrom(inits[src])
                        t.name = dst
                        g.initializer.append(t)
                        continue
                    keep.append(node)
                    continue
                producer.output[list(producer.output).index(src)] = dst
                _rename_uses(m, src, dst)
                continue
            _rename_uses(m, dst, src)
            continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    _drop_unused_initializers(m)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for k, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[k]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _init_map(m: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in m.graph.initializer}


def _replace_init(m: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype, copy=False), name))
            return
    m.graph.initializer.append(numpy_helper.from_array(value, name))


def normalize_gemm(m: onnx.ModelProto) -> None:
    """Fold Gemm's alpha and beta into its weight and bias."""
    inits = _init_map(m)
    for node in m.graph.node:
        if node.op_type != "Gemm":
            continue
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        if alpha != 1.0 and len(node.input) > 1 and node.input[1] in inits:
            _replace_init(m, node.input[1], numpy_helper.to_array(inits[node.input[1]]) * alpha)
            _set_attr(node, "alpha", 1.0)
        if beta != 1.0 and len(node.input) > 2 and node.input[2] in inits:
            _replace_init(m, node.input[2], numpy_helper.to_array(inits[node.input[2]]) * beta)
            _set_attr(node, "beta", 1.0)


def fold_batchnorm(m: onnx.ModelProto) -> dict[str, int]:
    """Fold BatchNormalization into the Conv or Gemm that alone feeds it; return counts per op type."""
    g = m.graph
    inits = _init_map(m)
    readers = consumers(m)
    producer = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}
    remove = set()
    folded: dict[str, int] = {}
    for bn in g.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        x = bn.input[0]
        layer = producer.get(x)
        if layer is None or len(readers.get(x, [])) != 1 or x in graph_outputs or not all(i in inits for i in bn.input[1:5]):
            continue
        w_axis = _bn_weight_axis(layer, inits)
        if w_axis is None or not _fold_into(m, layer, bn, inits, w_axis):
            continue
        inits = _init_map(m)
        layer.output[0] = bn.output[0]
        remove.add(id(bn))
        folded[layer.op_type] = folded.get(layer.op_type, 0) + 1
    keep = [n for n in g.node if id(n) not in remove]
    del g.node[:]
    g.node.extend(keep)
    _drop_unused_initializers(m)
    return folded


def _bn_weight_axis(layer: onnx.NodeProto, inits: dict) -> int | None:
    """The output-channel axis of a Conv's or Gemm's constant weight, else None."""
    if len(layer.input) < 2 or layer.input[1] not in inits:
        return None
    if layer.op_type == "Conv":
        return 0
    if layer.op_type == "Gemm" and not attr(layer, "transA", 0):
        return 0 if attr(layer, "transB", 0) else 1
    return None


def _fold_into(m: onnx.ModelProto, layer: onnx.NodeProto, bn: onnx.NodeProto, inits: dict, w_axis: int) -> bool:
    """Scale ``layer``'s weight and shift its bias (added if missing) by ``bn``; False if its bias
    is computed at run time."""
    scale, bias, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
    s = scale / np.sqrt(var + attr(bn, "epsilon", 1e-5))
    w = numpy_helper.to_array(inits[layer.input[1]])
    shape = [1] * w.ndim
    shape[w_axis] = -1
    if len(layer.input) > 2 and layer.input[2]:
        if layer.input[2] not in inits:
            return False
        b = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float64).reshape(-1)
        if b.size == 1:
            b = np.full(s.shape, b[0])
        b_name = layer.input[2]
    else:
        b = np.zeros_like(s)
        b_name = layer.input[1] + "_bias"
        while b_name in inits:
            b_name += "_"
        while len(layer.input) < 3:
            layer.input.append("")
        layer.input[2] = b_name
    _replace_init(m, layer.input[1], (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype))
    _replace_init(m, b_name, ((b - mean) * s + bias).astype(w.dtype))
    return True


def unshare_initializers(m: onnx.ModelProto) -> None:
    """Give every use of a shared float initializer its own copy, so weights can be edited per use."""
    g = m.graph
    inits = _init_map(m)
    seen: dict[str, int] = {}
    names = {t.name for t in g.initializer}
    for node in g.node:
        for k, name in enumerate(node.input):
            t = inits.get(name)
            if t is None or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
                continue
            count = seen.get(name, 0)
            seen[name] = count + 1
            if count == 0:
                continue
            new = f"{name}__use{count}"
            while new in names:
                new += "_"
            names.add(new)
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            copy.name = new
            g.initializer.append(copy)
            node.input[k] = new


# ------------------------------------------------------------------------------------------------
# Layout: Transposes, flatten order, NHWC/NCHW inputs
# ------------------------------------------------------------------------------------------------
# Element-wise ops a Transpose commutes with (one data input; other inputs scalar constants).
_SINKABLE = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "HardSwish", "HardSigmoid", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Mish", "Clip",
    "Identity", "Cast", "Add", "Sub", "Mul", "Div", "Max", "Min", "Pow",
}
# Ops that only move elements (no arithmetic): a dense layer reading through them reads a permutation.
_LAYOUT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}


def _scalar_const(name: str, inits: dict) -> bool:
    return name in inits and int(np.prod(inits[name].dims, dtype=np.int64)) == 1


def simplify_transposes(m: onnx.ModelProto) -> tuple[int, int]:
    """Move Transposes below element-wise ops and compose consecutive ones; return (moved, composed).

    jax2onnx and tf2onnx wrap NHWC computations in Transposes: ``Conv (NCHW) -> Transpose(to NHWC)
    -> Relu -> Transpose(to NCHW) -> Conv``. Moving each Transpose below the activation after it
    lets inverse pairs meet and vanish, leaving the plain NCHW graph a torch export would have.
    """
    g = m.graph
    outputs = {o.name for o in g.output}
    moved = composed = 0
    changed = True
    while changed:
        changed = False
        inits = {t.name: t for t in g.initializer}
        cons = consumers(m)
        for t in list(g.node):
            if t.op_type != "Transpose" or t.output[0] in outputs:
                continue
            users = cons.get(t.output[0], [])
            if len(users) != 1:
                continue
            u = users[0]
            if u.op_type == "Transpose" and u.input[0] == t.output[0]:
                p1 = list(attr(t, "perm", []))
                p2 = list(attr(u, "perm", []))
                if not p1 or not p2 or len(p1) != len(p2):
                    continue
                _set_attr(u, "perm", [p1[k] for k in p2])
                u.input[0] = t.input[0]
                g.node.remove(t)
                composed += 1
                changed = True
                break
            if u.op_type in _REDUCE and u.input[0] == t.output[0] and _absorb_into_reduce(m, t, u):
                moved += 1
                changed = True
                toposort(m)
                break
            if u.op_type not in _SINKABLE or u.domain not in ("", "ai.onnx") or len(u.output) != 1:
                continue
            if u.output[0] in outputs or u.input[0] != t.output[0]:
                continue
            # every other operand must be a scalar constant (broadcasts the same either way)
            if any(i == t.output[0] or not _scalar_const(i, inits) for i in u.input[1:] if i):
                continue
            # t: a -> x, u: x -> y   becomes   u: a -> x, t: x -> y
            a, x, y = t.input[0], t.output[0], u.output[0]
            u.input[0], u.output[0] = a, x
            t.input[0], t.output[0] = x, y
            moved += 1
            changed = True
            toposort(m)
            break
    # identity permutations become aliases (removed by remove_aliases)
    for t in g.node:
        if t.op_type == "Transpose":
            perm = list(attr(t, "perm", []))
            if perm and perm == sorted(perm):
                t.op_type = "Identity"
                del t.attribute[:]
    toposort(m)
    return moved, composed


_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare"}


def _reduce_axes(m: onnx.ModelProto, node: onnx.NodeProto) -> list[int] | None:
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        t = _init_map(m).get(node.input[1])
        if t is None:
            return None
        axes = numpy_helper.to_array(t).reshape(-1).tolist()
    return None if axes is None else [int(a) for a in axes]


def _set_reduce_axes(m: onnx.ModelProto, node: onnx.NodeProto, axes: list[int]) -> None:
    if attr(node, "axes", None) is not None:
        _set_attr(node, "axes", axes)
        return
    name = (node.name or node.output[0]) + "/axes"
    names = {t.name for t in m.graph.initializer}
    while name in names:
        name += "_"
    m.graph.initializer.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), name))
    node.input[1] = name


def _absorb_into_reduce(m: onnx.ModelProto, t: onnx.NodeProto, u: onnx.NodeProto) -> bool:
    """``Transpose(p) -> Reduce(axes)``: reduce the untransposed tensor over ``p[axes]`` instead.

    keepdims=0 with the kept axes still in order (NHWC -> mean over H, W -> [N, C]): the Transpose
    goes away. keepdims=1: the Transpose moves below the Reduce.
    """
    perm = list(attr(t, "perm", []))
    axes = _reduce_axes(m, u)
    if not perm or not axes:
        return False
    rank = len(perm)
    axes = sorted(a % rank for a in axes)
    mapped = sorted(perm[a] for a in axes)
    keep = attr(u, "keepdims", 1)
    if not keep:
        kept = [perm[a] for a in range(rank) if a not in axes]
        if kept != sorted(kept):
            return False
        _set_reduce_axes(m, u, mapped)
        u.input[0] = t.input[0]
        m.graph.node.remove(t)
        return True
    a, x, y = t.input[0], t.output[0], u.output[0]
    _set_reduce_axes(m, u, mapped)
    u.input[0], u.output[0] = a, x
    t.input[0], t.output[0] = x, y
    return True


def sum_to_mean(m: onnx.ModelProto) -> int:
    """``ReduceSum(axes) -> Div(n)`` (or ``Mul(1/n)``), n the number of summed elements: ReduceMean.

    jax2onnx writes average pooling (``x.mean(axis=(1, 2))``) this way. Returns how many were fused.
    """
    g = m.graph
    inits = _init_map(m)
    cons = consumers(m)
    outputs = {o.name for o in g.output}
    shapes = None
    fused = 0
    for r in list(g.node):
        if r.op_type != "ReduceSum" or r.output[0] in outputs:
            continue
        users = cons.get(r.output[0], [])
        if len(users) != 1 or users[0].op_type not in ("Div", "Mul") or users[0].input[0] != r.output[0]:
            continue
        d = users[0]
        if len(d.input) != 2 or not _scalar_const(d.input[1], inits):
            continue
        axes = _reduce_axes(m, r)
        if not axes:
            continue
        if shapes is None:
            shapes = _static_shapes(m)
        shape = shapes.get(r.input[0])
        if not shape or any(shape[a] is None for a in axes):
            continue
        n = float(np.prod([shape[a] for a in axes]))
        c = float(numpy_helper.to_array(inits[d.input[1]]).reshape(-1)[0])
        if not (np.isclose(c, n, rtol=1e-6) if d.op_type == "Div" else np.isclose(c * n, 1.0, rtol=1e-6)):
            continue
        keep = attr(r, "keepdims", 1)
        if opset_of(m) >= 18:
            mean = helper.make_node("ReduceMean", [r.input[0], r.input[1] if len(r.input) > 1 and r.input[1] else ""],
                                    [d.output[0]], keepdims=keep, name=r.name)
            if not mean.input[1]:
                ax = (r.name or r.output[0]) + "/axes"
                g.initializer.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), ax))
                mean.input[1] = ax
        else:
            mean = helper.make_node("ReduceMean", [r.input[0]], [d.output[0]], axes=axes, keepdims=keep, name=r.name)
        idx = list(g.node).index(r)
        g.node.remove(d)
        g.node.remove(r)
        g.node.insert(idx, mean)
        fused += 1
    if fused:
        _drop_unused_initializers(m)
    return fused


def drop_unused_domains(m: onnx.ModelProto) -> list[str]:
    """Remove opset imports of domains no node uses (tf2onnx always imports ai.onnx.ml)."""
    used = {n.domain for n in m.graph.node}
    keep, dropped = [], []
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx") or o.domain in used:
            keep.append(o)
        else:
            dropped.append(o.domain)
    if dropped:
        del m.opset_import[:]
        m.opset_import.extend(keep)
    return dropped


def _static_shapes(m: onnx.ModelProto) -> dict[str, list]:
    """Shapes from onnx shape inference (batch dims symbolic); {} when inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    except Exception:
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def _run_subgraph(m: onnx.ModelProto, nodes: list, source: str, value: np.ndarray, target: str) -> np.ndarray | None:
    """Evaluate ``target`` from ``source = value`` through ``nodes`` (onnxruntime, CPU)."""
    needed = {i for n in nodes for i in n.input if i}
    inits = [t for t in m.graph.initializer if t.name in needed]
    graph = helper.make_graph(
        list(nodes), "layout_probe",
        [helper.make_tensor_value_info(source, onnx.TensorProto.FLOAT, list(value.shape))],
        [helper.make_empty_tensor_value_info(target)], initializer=inits,
    )
    probe = helper.make_model(graph, opset_imports=[o for o in m.opset_import if o.domain in ("", "ai.onnx")],
                              ir_version=m.ir_version)
    try:
        return session(probe).run([target], {source: value})[0]
    except Exception:
        return None


def canonical_flatten(m: onnx.ModelProto) -> list[str]:
    """A dense layer reading a tensor through layout ops reads ``Flatten`` of it, kernel rows permuted.

    ``x [N, H, W, C] (or NCHW) -> Transpose / Reshape / Squeeze ... -> [N, F] -> dense``, where the
    layout ops only reorder x's elements, computes the same as ``Flatten(x) -> dense'`` with the
    kernel's input rows permuted. After this pass a Keras or JAX model that flattens a feature map
    in NHWC order (H, W, C) flattens it like torch (C, H, W), so their layer graphs match and their
    weights are merged on the same feature order. Returns one note per rewritten layer.
    """
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    cons = consumers(m)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    shapes = None
    notes = []
    for layer in list(g.node):
        in_axis = _dense_input_axis(layer, inits)
        if in_axis is None:
            continue
        chain, src = _layout_chain(layer.input[0], producer, cons, outputs)
        if not chain or (len(chain) == 1 and chain[0].op_type == "Flatten" and attr(chain[0], "axis", 1) == 1):
            continue
        shapes = shapes if shapes is not None else _static_shapes(m)
        order = _element_order(m, layer.input[0], src, shapes.get(src))
        if order is None:
            continue
        w = numpy_helper.to_array(inits[layer.input[1]])
        if w.shape[in_axis] != len(order):
            continue
        new_w = np.empty_like(w)
        sel = [slice(None)] * 2
        sel[in_axis] = order
        new_w[tuple(sel)] = w
        _replace_init(m, layer.input[1], new_w)
        flat = layer.input[0] + "__flatten"
        while flat in producer or flat in inits:
            flat += "_"
        g.node.insert(list(g.node).index(layer),
                      helper.make_node("Flatten", [src], [flat], axis=1, name=(layer.name or flat) + "/flatten"))
        layer.input[0] = flat
        ops = " -> ".join(n.op_type for n in reversed(chain))
        notes.append(f"dense layer '{layer.name}' read {list(shapes.get(src))} through {ops}: now Flatten with its "
                     f"kernel rows permuted (element order of the source tensor, row-major)")
        cons = consumers(m)
        producer = {o: n for n in g.node for o in n.output}
    if notes:
        m.CopyFrom(prune(m))
    return notes


def channel_permutations(m: onnx.ModelProto) -> list[str]:
    """A Reshape -> Transpose -> Reshape that only reorders channels becomes one ``Gather`` on axis 1.

    ShuffleNet's channel shuffle ``[N, C, H, W] -> [N, g, C/g, H, W] -> swap -> [N, C, H, W]``
    splits the channel axis in between, which no feature space can follow; as a Gather with
    constant indices it is a known permutation of channels (a ``SelectSpace``). The element order
    is measured by running the chain on an index-valued probe (whatever computes the Reshape
    targets comes along). Returns one note per rewritten chain.
    """
    g = m.graph
    cons = consumers(m)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    inits = {t.name for t in g.initializer}
    chains = []
    for last in g.node:
        if last.op_type != "Reshape":
            continue
        chain, t = [last], last.input[0]
        for want in ("Transpose", "Reshape"):
            n = producer.get(t)
            users = [u for u in cons.get(t, []) if u.op_type not in ("Shape", "Size")]
            if n is None or n.op_type != want or n.domain not in ("", "ai.onnx") or t in outputs or len(users) != 1:
                break
            chain.append(n)
            t = n.input[0]
        if len(chain) == 3 and t not in inits:
            chains.append((last, t))
    if not chains:
        return []
    shapes = _static_shapes(m)
    if any(not shapes.get(src) or None in shapes[src][1:] for _, src in chains):
        shapes.update(_run_shapes(m, [src for _, src in chains]))
    notes = []
    for last, src in chains:
        perm = _channel_order(m, last.output[0], src, shapes.get(src))
        if perm is None:
            continue
        idx = last.output[0] + "__channels"
        while idx in producer or idx in inits:
            idx += "_"
        g.initializer.append(numpy_helper.from_array(perm, idx))
        inits.add(idx)
        gather = helper.make_node("Gather", [src, idx], [last.output[0]], axis=1, name=(last.name or idx) + "/channels")
        g.node.insert(list(g.node).index(last), gather)
        g.node.remove(last)
        notes.append(f"Reshape -> Transpose -> Reshape of {list(shapes.get(src))} is a channel permutation: now a Gather on axis 1")
    if notes:
        m.CopyFrom(prune(m))
    return notes


def _run_shapes(m: onnx.ModelProto, names: list[str]) -> dict[str, list]:
    """Shapes of ``names`` from one onnxruntime run on zeros (symbolic dimensions 1); {} when
    the model does not run that way."""
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    have = {o.name for o in probe.graph.output}
    for n in dict.fromkeys(names):
        if n not in have:
            probe.graph.output.append(helper.make_empty_tensor_value_info(n))
    feeds = {}
    types = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
             onnx.TensorProto.INT32: np.int32, onnx.TensorProto.FLOAT16: np.float16}
    for i in m.graph.input:
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        feeds[i.name] = np.zeros(dims, dtype=types.get(t.elem_type, np.float32))
    try:
        sess = session(probe, optimization="disable")
        got = sess.run(list(dict.fromkeys(names)), feeds)
    except Exception:
        return {}
    return {n: list(np.shape(v)) for n, v in zip(dict.fromkeys(names), got)}


def _channel_order(m: onnx.ModelProto, x: str, src: str, shape) -> np.ndarray | None:
    """For ``x`` computed from ``src`` (same shape, rank >= 3) by layout ops: the channel (axis 1)
    of ``src`` that each channel of ``x`` is, when the ops only reorder channels; else None."""
    if not shape or len(shape) < 3 or any(d is None or d <= 0 for d in shape[1:]):
        return None
    batch = shape[0] if shape[0] else 2
    per = int(np.prod(shape[1:], dtype=np.int64))
    if batch * per >= 1 << 24:  # float32 indices stay exact below 2^24
        return None
    nodes = _ancestors(m, x, stop=src)
    if nodes is None:
        return None
    probe = np.arange(batch * per, dtype=np.float32).reshape([batch] + list(shape[1:]))
    got = _run_subgraph(m, nodes, src, probe, x)
    if got is None or got.shape != probe.shape:
        return None
    c = shape[1]
    rows = got.astype(np.int64).reshape(batch, c, per // c)
    perm = rows[0, :, 0] // (per // c)
    want = probe.astype(np.int64).reshape(batch, c, per // c)[:, perm]
    if not np.array_equal(rows, want) or not np.array_equal(np.sort(perm), np.arange(c)):
        return None
    if np.array_equal(perm, np.arange(c)):
        return None
    return perm.astype(np.int64)


def _dense_input_axis(layer: onnx.NodeProto, inits: dict) -> int | None:
    """The input axis of a dense layer's constant kernel (Gemm or 2-D MatMul), else None."""
    if layer.op_type == "Gemm":
        if attr(layer, "transA", 0) or len(layer.input) < 2 or layer.input[1] not in inits:
            return None
        return 1 if attr(layer, "transB", 0) else 0
    if layer.op_type == "MatMul":
        if len(layer.input) < 2 or layer.input[1] not in inits or len(inits[layer.input[1]].dims) != 2:
            return None
        return 0
    return None


def _layout_chain(x: str, producer: dict, cons: dict, outputs: set) -> tuple[list, str]:
    """The layout ops (each read by nothing else) that make ``x``, last first; and their source."""
    chain, t = [], x
    while t in producer and producer[t].op_type in _LAYOUT and producer[t].domain in ("", "ai.onnx"):
        n = producer[t]
        # Shape/Size readers (a Reshape target computed at run time) only need the shape
        users = [u for u in cons.get(t, []) if u.op_type not in ("Shape", "Size")]
        if t in outputs or len(users) != 1:
            break
        chain.append(n)
        t = n.input[0]
    return chain, t


def _element_order(m: onnx.ModelProto, x: str, src: str, shape) -> np.ndarray | None:
    """For ``x [N, F]`` computed from ``src`` by layout ops: which element of a row-major ``src``
    row each of x's F features is (None when the ops mix samples, are not a permutation, or
    already keep row-major order)."""
    if not shape or len(shape) < 3 or any(d is None or d <= 0 for d in shape[1:]):
        return None
    per = int(np.prod(shape[1:], dtype=np.int64))
    if per >= 1 << 24:  # float32 indices stay exact below 2^24
        return None
    # the chain's shape computations (Shape -> Gather -> Concat ...) come along
    nodes = _ancestors(m, x, stop=src)
    if nodes is None:
        return None
    rows = shape[0] if shape[0] and shape[0] > 1 else 2  # a static batch keeps its size (Reshapes spell it)
    if rows * per >= 1 << 24:
        return None
    probe = np.arange(rows * per, dtype=np.float32).reshape([rows] + list(shape[1:]))
    got = _run_subgraph(m, nodes, src, probe, x)
    if got is None or got.ndim != 2 or got.shape != (rows, per):
        return None
    idx = got.astype(np.int64)
    if not (idx - idx[:1] == np.arange(rows)[:, None] * per).all() or not np.array_equal(np.sort(idx[0]), np.arange(per)):
        return None  # mixes samples, or is not a permutation
    if np.array_equal(idx[0], np.arange(per)):
        return None  # already row-major order: nothing to permute
    return idx[0]


def _ancestors(m: onnx.ModelProto, target: str, stop: str) -> list | None:
    """Nodes computing ``target`` from ``stop`` and constants (None if other tensors are needed)."""
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name for t in m.graph.initializer}
    seen, order = set(), []

    def visit(t: str) -> bool:
        if not t or t == stop or t in inits:
            return True
        n = producer.get(t)
        if n is None:
            return False
        if id(n) in seen:
            return True
        seen.add(id(n))
        if not all(visit(i) for i in n.input):
            return False
        order.append(n)
        return True

    return order if visit(target) else None


def guess_layout(model: onnx.ModelProto, name: str) -> str | None:
    """"NCHW", "NHWC" or None for a rank-4 graph input, from the first Conv that reads it.

    Follows the input through layout ops to a Conv: the channel count the Conv expects tells
    which axis holds channels. Without a Conv (an MLP on images), a channel axis of size 1, 3 or
    4 that is not also the spatial size decides.
    """
    vi = next((i for i in model.graph.input if i.name == name), None)
    if vi is None:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if len(dims) != 4:
        return None
    inits = {t.name: t for t in model.graph.initializer}
    cons = consumers(model)
    frontier, seen, channels = [name], set(), None
    while frontier and channels is None:
        t = frontier.pop(0)
        for n in cons.get(t, []):
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type == "Conv" and n.input[0] == t and len(n.input) > 1 and n.input[1] in inits:
                w = inits[n.input[1]].dims
                channels = int(w[1]) * int(attr(n, "group", 1))
                break
            if n.op_type in _LAYOUT | {"Cast"} and n.input[0] == t:
                frontier.append(n.output[0])
    c1, c3 = dims[1], dims[3]
    if channels is not None:
        if c1 == channels and c3 != channels:
            return "NCHW"
        if c3 == channels and c1 != channels:
            return "NHWC"
    small = (1, 3, 4)
    if c1 in small and c3 not in small:
        return "NCHW"
    if c3 in small and c1 not in small:
        return "NHWC"
    return None


_TO_NHWC = [0, 2, 3, 1]  # NCHW tensor -> NHWC tensor
_TO_NCHW = [0, 3, 1, 2]  # NHWC tensor -> NCHW tensor


def permute_input(model: onnx.ModelProto, name: str, perm: list[int]) -> onnx.ModelProto:
    """A copy of ``model`` whose input ``name`` comes in another layout.

    The new input X' feeds ``Transpose(perm)``, which gives the tensor the model used to take
    (old input = X'.transpose(perm)); the input keeps its name. Normalizing afterwards cancels
    that Transpose against the model's own layout Transpose when it has one.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    vi = next(i for i in m.graph.input if i.name == name)
    dims = list(vi.type.tensor_type.shape.dim)
    inverse = list(np.argsort(perm))
    new_dims = [dims[k] for k in inverse]
    inner = name + "__layout"
    while any(inner in n.output or inner in n.input for n in m.graph.node):
        inner += "_"
    for n in m.graph.node:
        for k, i in enumerate(n.input):
            if i == name:
                n.input[k] = inner
    for o in m.graph.output:
        if o.name == name:
            raise ModelLoadError(f"input '{name}' is also a graph output; cannot change its layout")
    shape = vi.type.tensor_type.shape
    copies = []
    for d in new_dims:
        c = onnx.TensorShapeProto.Dimension()
        c.CopyFrom(d)
        copies.append(c)
    del shape.dim[:]
    shape.dim.extend(copies)
    m.graph.node.insert(0, helper.make_node("Transpose", [name], [inner], perm=list(perm), name=f"{name}/layout"))
    return m


def check_input_layout(layout: str | None) -> str | None:
    """The layout in upper case; OptionError unless it is None, NCHW or NHWC."""
    if layout is None:
        return None
    if layout.strip().upper() not in ("NCHW", "NHWC"):
        raise OptionError(f"--input-layout {layout!r}: use NCHW or NHWC")
    return layout.strip().upper()


def align_input_layouts(models: list[onnx.ModelProto], layout: str | None = None) -> tuple[list[onnx.ModelProto], list[str]]:
    """Give every model the same image-input layout; return the models and what was done, in words.

    ``layout`` "NCHW" or "NHWC" forces one; by default every model takes the first model's. Only
    rank-4 inputs whose shapes differ by exactly the NCHW <-> NHWC permutation are touched (or, with
    ``layout``, whose guessed layout differs from it).
    """
    layout = check_input_layout(layout)
    out, notes = [], []
    ref = models[0]
    ref_inputs = list(ref.graph.input)
    for k, model in enumerate(models):
        m = model
        for j, vi in enumerate(list(model.graph.input)):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            if len(dims) != 4:
                continue
            have = guess_layout(model, vi.name)
            if layout is not None:
                want = layout
                if have is None or have == want:
                    continue
            else:
                if k == 0 or j >= len(ref_inputs):
                    continue
                rdims = [d.dim_value if d.HasField("dim_value") else None for d in ref_inputs[j].type.tensor_type.shape.dim]
                if len(rdims) != 4 or _same(dims[1:], rdims[1:]):
                    continue
                if _same([dims[k2] for k2 in _TO_NHWC][1:], rdims[1:]):
                    have, want = "NCHW", "NHWC"
                elif _same([dims[k2] for k2 in _TO_NCHW][1:], rdims[1:]):
                    have, want = "NHWC", "NCHW"
                else:
                    continue
            perm = _TO_NHWC if want == "NCHW" else _TO_NCHW
            m = permute_input(m, vi.name, perm)
            notes.append(f"model {'AB'[k] if len(models) == 2 else k}: input '{vi.name}' {have} -> {want} "
                         f"(a Transpose in front of the model)")
        out.append(m)
    return out, notes


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


# The normalization, in order: (name, pass); each pass edits the model in place and returns notes.
PASSES = [
    ("inline local functions", _inline_functions),
    ("discard value_info", _discard_value_info),
    ("drop initializers listed as inputs", _silent(drop_initializer_inputs)),
    ("fold constants", _silent(fold_constants)),
    ("sink and compose Transposes", _transposes),
    ("remove Identity and Dropout aliases", _silent(remove_aliases)),
    ("channel shuffles as Gather", channel_permutations),
    ("ReduceSum + Div as ReduceMean", _sum_to_mean),
    ("Gemm with alpha = beta = 1", _silent(normalize_gemm)),
    ("fold BatchNormalization", _fold_batchnorm),
    ("split fused projections", _split_fused),
    ("split projections fused per head", _split_interleaved),
    ("identity as_strided as Reshape", _identity_gathers),
    ("topological order", _silent(toposort)),
    ("dense layers read Flatten", canonical_flatten),
    ("one use per initializer", _silent(unshare_initializers)),
    ("drop unused opset domains", _unused_domains),
    ("topological order, again", _silent(toposort)),
]
