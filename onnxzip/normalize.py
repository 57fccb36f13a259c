"""Passes that make different exporters' graphs alike before parsing.

Each pass takes a ``ModelProto`` and edits it in place; :func:`normalize` runs them in order on
a copy. After normalization a graph has: no local functions, no ``Constant`` nodes, no
``Identity``/``Dropout`` aliases, no node whose inputs are all constants, BatchNormalization
folded into the Conv/Gemm before it where possible, Gemm with ``alpha = beta = 1``, every float
initializer used by exactly one node input, and nodes in topological order.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import onnx.reference
import onnx.version_converter
from onnx import helper, numpy_helper

from onnxzip.errors import ModelLoadError

__all__ = ["normalize", "opset_of", "convert_opset"]

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
    return converted


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a normalized copy of ``model`` (see the module docstring)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if len(m.functions):
        m = onnx.inliner.inline_local_functions(m)
    del m.graph.value_info[:]  # some exporters write value_info that disagrees with the real shapes
    drop_initializer_inputs(m)
    fold_constants(m)
    remove_aliases(m)
    normalize_gemm(m)
    fold_batchnorm(m)
    unshare_initializers(m)
    toposort(m)
    return m


def drop_initializer_inputs(m: onnx.ModelProto) -> None:
    """Old IR versions list initializers among the graph inputs; they are not real inputs."""
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)


def _run_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], opsets) -> list[np.ndarray]:
    graph_inputs, feeds = [], {}
    names = []
    for i, (name, value) in enumerate(zip(node.input, inputs)):
        if not name:
            names.append("")
            continue
        alias = f"in{i}"
        names.append(alias)
        graph_inputs.append(helper.make_tensor_value_info(alias, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
        feeds[alias] = value
    n = onnx.NodeProto()
    n.CopyFrom(node)
    del n.input[:]
    n.input.extend(names)
    outs = [f"out{i}" for i in range(len(node.output))]
    del n.output[:]
    n.output.extend(outs)
    g = helper.make_graph([n], "fold", graph_inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outs])
    model = helper.make_model(g, opset_imports=list(opsets))
    return onnx.reference.ReferenceEvaluator(model).run(None, feeds)


def fold_constants(m: onnx.ModelProto) -> None:
    """Replace Constant nodes, and nodes whose inputs are all constants, by initializers."""
    g = m.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    keep = []
    new_inits: list[onnx.TensorProto] = []
    for node in g.node:
        foldable = node.domain in ("", "ai.onnx") and all((not i) or i in consts for i in node.input)
        # weights behind an Identity are kept as the alias they are: remove_aliases handles them
        if foldable and node.op_type == "Identity":
            foldable = False
        if foldable and node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"):
            try:
                values = _run_node(node, [consts.get(i) if i else None for i in node.input], m.opset_import)
            except Exception:
                values = None
            if values is not None and all(isinstance(v, np.ndarray) and v.size <= _FOLD_LIMIT for v in values):
                for name, v in zip(node.output, values):
                    if not name:
                        continue
                    consts[name] = v
                    if name in graph_outputs:
                        continue
                    new_inits.append(numpy_helper.from_array(np.asarray(v), name))
                if not any(o in graph_outputs for o in node.output):
                    continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    _drop_unused_initializers(m)


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


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


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
        alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
        if alpha != 1.0 and len(node.input) > 1 and node.input[1] in inits:
            _replace_init(m, node.input[1], numpy_helper.to_array(inits[node.input[1]]) * alpha)
            _set_attr(node, "alpha", 1.0)
        if beta != 1.0 and len(node.input) > 2 and node.input[2] in inits:
            _replace_init(m, node.input[2], numpy_helper.to_array(inits[node.input[2]]) * beta)
            _set_attr(node, "beta", 1.0)


def fold_batchnorm(m: onnx.ModelProto) -> None:
    """Fold BatchNormalization into the Conv or Gemm that alone feeds it."""
    g = m.graph
    inits = _init_map(m)
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    producer = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}
    remove = set()
    for bn in g.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        x = bn.input[0]
        layer = producer.get(x)
        if layer is None or consumers.get(x, 0) != 1 or x in graph_outputs:
            continue
        if not all(i in inits for i in bn.input[1:5]):
            continue
        if layer.op_type == "Conv":
            w_axis = 0
        elif layer.op_type == "Gemm" and not _attr(layer, "transA", 0):
            w_axis = 0 if _attr(layer, "transB", 0) else 1
        else:
            continue
        if len(layer.input) < 2 or layer.input[1] not in inits:
            continue
        scale, bias, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        eps = _attr(bn, "epsilon", 1e-5)
        s = scale / np.sqrt(var + eps)
        w = numpy_helper.to_array(inits[layer.input[1]])
        shape = [1] * w.ndim
        shape[w_axis] = -1
        new_w = (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype)
        if len(layer.input) > 2 and layer.input[2]:
            if layer.input[2] not in inits:
                continue
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
        new_b = ((b - mean) * s + bias).astype(w.dtype)
        _replace_init(m, layer.input[1], new_w)
        _replace_init(m, b_name, new_b)
        inits = _init_map(m)
        layer.output[0] = bn.output[0]
        remove.add(id(bn))
    keep = [n for n in g.node if id(n) not in remove]
    del g.node[:]
    g.node.extend(keep)
    _drop_unused_initializers(m)


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


def toposort(m: onnx.ModelProto) -> None:
    """Order nodes so that every tensor is produced before it is used (stable)."""
    g = m.graph
    available = {t.name for t in g.initializer} | {i.name for i in g.input} | {""}
    nodes = list(g.node)
    done = [False] * len(nodes)
    order = []
    progress = True
    while progress and len(order) < len(nodes):
        progress = False
        for k, n in enumerate(nodes):
            if done[k]:
                continue
            if all(i in available for i in n.input):
                done[k] = True
                order.append(n)
                available.update(n.output)
                progress = True
    if len(order) < len(nodes):
        missing = next(i for k, n in enumerate(nodes) if not done[k] for i in n.input if i not in available)
        raise ModelLoadError(f"the graph uses tensor '{missing}' that nothing produces; the model is malformed, re-export it")
    del g.node[:]
    g.node.extend(order)
