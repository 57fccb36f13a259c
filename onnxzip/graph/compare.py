"""Do two layer graphs describe the same architecture? If not, where do they first differ?

Two models match when their weight layers, feature groups and per-channel parameters line up
(:func:`layer_signature`), their convolutions have the same geometry once exporter spellings are
resolved (``auto_pad=SAME_UPPER`` vs explicit pads, :func:`conv_geometry`), and the same
activations and pools follow each layer (:func:`layer_ops`). Differences in spelling only (a dense
kernel stored [in, out] or [out, in], padding by ``auto_pad`` or by ``pads``) are equivalent:
:func:`equivalences` lists them in words for ``onnxzip check``.
"""

from __future__ import annotations

import numpy as np

from onnxzip.onnx_nodes import attr, conv_pads
from onnxzip.graph.layergraph import Layer, LayerGraph
from onnxzip.graph.spaces import Blocked, ConcatSpace, ExpandSpace, GroupSpace, InputSpace, RepeatSpace, SelectSpace, Space

__all__ = [
    "space_signature", "layer_signature", "first_difference", "canonical_weight_shape", "conv_geometry",
    "layer_ops", "dense_spelling", "equivalences", "input_layout",
]


def space_signature(space: Space):
    if isinstance(space, GroupSpace):
        return ("group", space.gid, space.size)
    if isinstance(space, ConcatSpace):
        return ("concat",) + tuple(space_signature(p) for p in space.parts)
    if isinstance(space, ExpandSpace):
        return ("expand", space.outer, space.inner, space_signature(space.part))
    if isinstance(space, SelectSpace):
        return ("select", space.index, space_signature(space.part))
    if isinstance(space, RepeatSpace):
        return ("repeat", space.heads, space.repeats, space_signature(space.part))
    if isinstance(space, InputSpace):
        return ("input",)
    if isinstance(space, Blocked):
        return ("blocked",)
    return ("none",)


def canonical_weight_shape(layer: Layer) -> tuple:
    """(out, in, *kernel) whatever the weight's stored orientation."""
    s = list(layer.weight_shape)
    rest = [d for k, d in enumerate(s) if k not in (layer.w_out_axis, layer.w_in_axis)]
    return (s[layer.w_out_axis], s[layer.w_in_axis], *rest)


def layer_signature(layer: Layer) -> tuple:
    return (
        layer.number, layer.kind, canonical_weight_shape(layer), layer.bias is not None or bool(layer.bias_chain),
        space_signature(layer.in_space), space_signature(layer.out_space),
    )


def _structure(layer: Layer) -> tuple:
    """:func:`layer_signature` without the bias: a missing bias is a zero bias (exporters drop
    all-zero biases, e.g. the dynamo exporter's optimizer after folding a freshly initialized
    BatchNormalization), so a bias in one model only is no difference in architecture."""
    sig = layer_signature(layer)
    return sig[:3] + sig[4:]


def _signature_difference(la: Layer, lb: Layer) -> str:
    """What differs between two layers' signatures, in words."""
    sa, sb = _structure(la), _structure(lb)
    what = []
    if sa[1] != sb[1]:
        what.append(f"kind {sa[1]} vs {sb[1]}")
    if sa[2] != sb[2]:
        what.append(f"weight (out, in, kernel) {list(sa[2])} vs {list(sb[2])}")
    for k, side in ((3, "input"), (4, "output")):
        if sa[k] != sb[k]:
            ta, tb = _fmt(sa[k]), _fmt(sb[k])
            if ta == tb:  # the same groups, of other sizes
                ta, tb = f"{ta} of {_width(sa[k])}", f"{tb} of {_width(sb[k])}"
            what.append(f"{side} {ta} vs {tb}")
    if sa[0] != sb[0]:
        what.append(f"layer number {sa[0]} vs {sb[0]}")
    return "different " + "; ".join(what) if what else "different signature"


def _width(sig) -> str:
    """The channels of a space signature, in words (each part's for a concatenation)."""
    if sig[0] == "group":
        return f"{sig[2]} channels"
    if sig[0] == "concat":
        return "(" + ", ".join(_width(p) for p in sig[1:]) + ")"
    if sig[0] in ("expand", "select"):
        return _width(sig[-1])
    return "-"


def _describe(layer: Layer) -> str:
    ins = space_signature(layer.in_space)
    outs = space_signature(layer.out_space)
    return f"{layer.node} ({layer.describe()}, reads {_fmt(ins)}, writes {_fmt(outs)})"


def format_signature(sig, group: str = "group ") -> str:
    """A space signature in words: ``group 3``, ``concat(group 1, group 2)``, ``flatten(group 4 x16)``."""
    if sig[0] == "group":
        return f"{group}{sig[1]}"
    if sig[0] == "concat":
        return "concat(" + ", ".join(format_signature(s, group) for s in sig[1:]) + ")"
    if sig[0] == "expand":
        return f"flatten({format_signature(sig[3], group)} x{sig[1] * sig[2]})"
    if sig[0] == "select":
        index = list(sig[1])
        what = f"{index[0]}:{index[-1] + 1}" if index == list(range(index[0], index[-1] + 1)) else f"{len(index)} reordered"
        return f"channels({format_signature(sig[2], group)}, {what})"
    if sig[0] == "repeat":
        return f"repeat({format_signature(sig[3], group)}, {sig[1]} heads x{sig[2]})"
    return sig[0]


_fmt = format_signature


# ------------------------------------------------------------------------------------------------
# Geometry and the ops after each layer, with exporter spellings resolved
# ------------------------------------------------------------------------------------------------
def _node(graph: LayerGraph, name: str):
    return graph.nodes_by_name.get(name)


def _geometry(node, in_shape, kernel) -> dict:
    nd = len(kernel)
    strides = [int(s) for s in (attr(node, "strides", None) or [1] * nd)]
    dilations = [int(d) for d in (attr(node, "dilations", None) or [1] * nd)]
    return {
        "kernel": [int(k) for k in kernel], "strides": strides, "dilations": dilations,
        "pads": conv_pads(node, in_shape, kernel, strides, dilations),
        "auto_pad": attr(node, "auto_pad", "NOTSET") or "NOTSET",
    }


def conv_geometry(graph: LayerGraph, layer: Layer) -> dict | None:
    """Kernel, strides, dilations and explicit pads of a Conv layer (``auto_pad`` resolved)."""
    if layer.op_type != "Conv":
        return None
    node = _node(graph, layer.node)
    if node is None:
        return None
    return _geometry(node, graph.shapes.get(layer.input), list(layer.weight_shape[2:]))


def _geom_text(g: dict) -> str:
    k = "x".join(map(str, g["kernel"]))
    parts = [k]
    if any(s != 1 for s in g["strides"]):
        parts.append("stride " + "x".join(map(str, g["strides"])))
    if any(d != 1 for d in g["dilations"]):
        parts.append("dilation " + "x".join(map(str, g["dilations"])))
    pad = f"pads {g['pads']}"
    if g["auto_pad"] not in ("NOTSET", ""):
        pad = f"auto_pad={g['auto_pad']} (= pads {g['pads']})"
    parts.append(pad)
    return " ".join(parts)


_ACTIVATIONS = {
    "Relu": "relu", "LeakyRelu": "leaky_relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Gelu": "gelu", "Erf": "gelu",
    "HardSwish": "hard_swish", "HardSigmoid": "hard_sigmoid", "Elu": "elu", "Selu": "selu", "Celu": "celu",
    "Softplus": "softplus", "Mish": "mish", "PRelu": "prelu", "ThresholdedRelu": "thresholded_relu",
}


def _canonical_op(graph: LayerGraph, node) -> str | None:
    """A framework-independent name for an activation or pool; None for anything else."""
    op = node.op_type
    consts = {t.name: t for t in graph.model.graph.initializer}
    if op in _ACTIVATIONS:
        name = _ACTIVATIONS[op]
        if op == "LeakyRelu":
            name += f"({attr(node, 'alpha', 0.01):.4g})"
        return name
    if op == "Clip":
        from onnx import numpy_helper

        lo = attr(node, "min", None)
        hi = attr(node, "max", None)
        if len(node.input) > 1 and node.input[1] in consts:
            lo = float(numpy_helper.to_array(consts[node.input[1]]).reshape(-1)[0])
        if len(node.input) > 2 and node.input[2] in consts:
            hi = float(numpy_helper.to_array(consts[node.input[2]]).reshape(-1)[0])
        if lo == 0 and (hi is None or np.isinf(hi)):
            return "relu"
        if lo == 0 and hi == 6:
            return "relu6"
        return f"clip({lo:g},{hi:g})" if lo is not None and hi is not None else "clip"
    if op in ("MaxPool", "AveragePool", "LpPool"):
        in_shape = graph.shapes.get(node.input[0])
        kernel = list(attr(node, "kernel_shape", []))
        g = _geometry(node, in_shape, kernel)
        text = {"MaxPool": "maxpool", "AveragePool": "avgpool", "LpPool": "lppool"}[op]
        text += " " + "x".join(map(str, g["kernel"]))
        text += "/" + "x".join(map(str, g["strides"]))
        if any(g["pads"]):
            text += f" pads {g['pads']}"
        if attr(node, "ceil_mode", 0):
            text += " ceil"
        if op == "AveragePool" and any(g["pads"]) and attr(node, "count_include_pad", 0):
            text += " count_include_pad"
        return text
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return "mean(spatial)" if op == "GlobalAveragePool" else "max(spatial)"
    if op in ("ReduceMean", "ReduceMax"):
        x = node.input[0]
        shape = graph.shapes.get(x)
        axis = graph.channel_axis(x)
        axes = attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1] in consts:
            from onnx import numpy_helper

            axes = numpy_helper.to_array(consts[node.input[1]]).reshape(-1).tolist()
        if shape is None or axis is None or axes is None:
            return op.lower()
        rank = len(shape)
        axes = sorted(int(a) % rank for a in axes)
        spatial = [k for k in range(1, rank) if k != axis]
        kind = "mean" if op == "ReduceMean" else "max"
        return f"{kind}(spatial)" if axes == spatial else f"{kind}(axes {axes})"
    return None


def _is_feature_space(space) -> bool:
    return isinstance(space, (GroupSpace, ConcatSpace, ExpandSpace, SelectSpace, RepeatSpace))


def layer_ops(graph: LayerGraph, layer: Layer) -> tuple[str, ...]:
    """The activations and pools between a layer and the next weight layers (or the outputs).

    Followed along feature tensors only; layout ops (Transpose, Reshape, Flatten, ...), shape
    computations and per-channel parameters are spelling and do not count. Returned as a sorted
    tuple of distinct names, so the exporters' node order does not matter.
    """
    layer_nodes = {l.node for l in graph.layers}
    consumers = graph.consumers
    start = layer.preact or layer.output
    seen, found = set(), set()
    frontier = [start]
    while frontier:
        t = frontier.pop()
        for n in consumers.get(t, []):
            if n.name in layer_nodes or id(n) in seen:
                continue
            seen.add(id(n))
            name = _canonical_op(graph, n)
            if name is not None:
                found.add(name)
            for o in n.output:
                if o and _is_feature_space(graph.spaces.get(o)):
                    frontier.append(o)
    return tuple(sorted(found))


def dense_spelling(layer: Layer) -> str:
    """How a dense layer's kernel is stored: the exporters' spellings, in words."""
    bias = " + Add" if layer.bias is not None and layer.op_type == "MatMul" else ""
    if layer.op_type == "Gemm":
        return "Gemm, kernel [out, in]" if layer.w_out_axis == 0 else "Gemm transB=0, kernel [in, out]"
    if layer.op_type == "MatMul":
        return f"MatMul{bias}, kernel [in, out]"
    return layer.op_type


def input_layout(shape) -> str | None:
    """NCHW / NHWC guess for a rank-4 image input shape (channels 1, 3 or 4)."""
    if shape is None or len(shape) != 4:
        return None
    small = (1, 3, 4)
    if shape[1] in small and shape[3] not in small:
        return "NCHW"
    if shape[3] in small and shape[1] not in small:
        return "NHWC"
    return None


def _input_difference(na, sa, nb, sb) -> str:
    la, lb = input_layout(sa), input_layout(sb)
    if la and lb and la != lb and sorted(sa[1:]) == sorted(sb[1:]):
        return (f"input layouts differ: A '{na}' {list(sa)} ({la}), B '{nb}' {list(sb)} ({lb}): the same images in "
                f"another layout; zip with the layouts aligned (onnxzip.normalize.align_input_layouts puts a Transpose "
                f"in front of B)")
    return f"input shapes differ: A '{na}' {list(sa)}, B '{nb}' {list(sb)}"


def first_difference(a: LayerGraph, b: LayerGraph) -> str | None:
    """None when the graphs match; else one line naming the first differing layer, both sides."""
    if len(a.inputs) != len(b.inputs):
        return f"A has {len(a.inputs)} inputs, B has {len(b.inputs)}"
    for na, nb in zip(a.inputs, b.inputs):
        sa, sb = a.shapes.get(na), b.shapes.get(nb)
        if sa is not None and sb is not None and tuple(sa[1:]) != tuple(sb[1:]):
            return _input_difference(na, sa, nb, sb)
    for k, (la, lb) in enumerate(zip(a.layers, b.layers)):
        if _structure(la) != _structure(lb) and not head_sizes_differ(a, la, b, lb):
            return f"layer {la.number} (#{k + 1}): {_signature_difference(la, lb)}: A {_describe(la)} vs B {_describe(lb)}"
        if lb.bias is not None and la.bias is None and la.op_type not in ("Conv", "Gemm"):
            return (f"layer {la.number} (#{k + 1}): B's {lb.describe()} ('{lb.node}') has a bias, A's {la.op_type} "
                    f"('{la.node}') has none and no place for one; give the model with the bias first")
        ga, gb = conv_geometry(a, la), conv_geometry(b, lb)
        if ga is not None and gb is not None:
            for key, what in (("kernel", "kernel"), ("strides", "strides"), ("dilations", "dilations"), ("pads", "padding")):
                if ga[key] != gb[key]:
                    return (f"layer {la.number} (#{k + 1}): A {la.describe()} {_geom_text(ga)} ('{la.node}') vs "
                            f"B {lb.describe()} {_geom_text(gb)} ('{lb.node}'): different {what}")
        if not _reaches_output(a, la):
            oa, ob = layer_ops(a, la), layer_ops(b, lb)
            if oa != ob:
                return (f"layer {la.number} (#{k + 1}) {la.describe()}: after it A applies {_ops_text(oa)}, "
                        f"B applies {_ops_text(ob)}: different activations or pooling")
    if len(a.layers) != len(b.layers):
        longer, name = (a, "A") if len(a.layers) > len(b.layers) else (b, "B")
        extra = longer.layers[min(len(a.layers), len(b.layers))]
        return f"{name} has {len(longer.layers) - min(len(a.layers), len(b.layers))} more weight layers, from {_describe(extra)}"
    pa, pb = a.params, b.params
    if len(pa) != len(pb):
        return f"A has {len(pa)} per-channel parameters, B has {len(pb)} (e.g. BatchNormalization kept in one model only)"
    # a constant subtracted, or looked up by positions (see ops.shape.constant_lookup), is added; a
    # learned token broadcast by Expand or Tile (TorchScript) is the token joined by Concat (dynamo
    # folds the Expand to its static batch)
    added = {"Sub": "Add", "Gather": "Add", "Expand": "Concat", "Tile": "Concat"}
    for x, y in zip(pa, pb):
        if (x.gid, added.get(x.op_type, x.op_type)) != (y.gid, added.get(y.op_type, y.op_type)):
            return f"per-channel parameter differs: A {x.op_type} '{x.node}' on group {x.gid} vs B {y.op_type} '{y.node}' on group {y.gid}"
        sx, sy = a.shapes.get(x.initializer, ()), b.shapes.get(y.initializer, ())
        if int(np.prod(sx, dtype=np.int64)) != int(np.prod(sy, dtype=np.int64)) and not _broadcastable(sx, x.axis, sy, y.axis):
            return (f"per-channel parameter differs: A {x.op_type} '{x.node}' {list(sx)} vs B {y.op_type} '{y.node}' "
                    f"{list(sy)} on group {x.gid} (e.g. a position table looked up in one model, folded to the "
                    "positions used in the other: export both with the same exporter)")
    if len(a.outputs) != len(b.outputs):
        return f"A has {len(a.outputs)} outputs, B has {len(b.outputs)}"
    return None


def _broadcastable(sx, ax: int, sy, ay: int) -> bool:
    """Two per-channel parameters of the same rank and channels that differ only where one has a
    unit axis (a token repeated over a static batch in one model, broadcast in the other)."""
    if len(sx) != len(sy) or ax != ay or sx[ax] != sy[ay]:
        return False
    return all(p == q or 1 in (p, q) for p, q in zip(sx, sy))


def model_labels(n: int) -> list[str]:
    """How messages name the source models: "A", "B" for two; "1" .. "N" for more."""
    return ["A", "B"] if n == 2 else [str(k + 1) for k in range(n)]


def head_sizes_differ(a: LayerGraph, la: Layer, b: LayerGraph, lb: Layer) -> bool:
    """Two output layers (heads) that differ in their number of outputs only (tasks with different
    numbers of classes): each stays in its own task's branch."""
    if not (_reaches_output(a, la) and _reaches_output(b, lb)):
        return False
    if not (isinstance(la.out_space, GroupSpace) and isinstance(lb.out_space, GroupSpace)):
        return False
    sa, sb = list(layer_signature(la)), list(layer_signature(lb))
    sa[2], sb[2] = canonical_weight_shape(la)[1:], canonical_weight_shape(lb)[1:]
    sa[5], sb[5] = sa[5][:2], sb[5][:2]  # the output group without its size
    return sa == sb


def _reaches_output(graph: LayerGraph, layer: Layer) -> bool:
    """Output layers: what follows them stays in each task's own head."""
    from onnxzip.graph.spaces import leaves

    return any(graph.groups.get(leaf.gid) is not None and graph.groups[leaf.gid].output for leaf in leaves(layer.out_space))


def _ops_text(ops: tuple) -> str:
    return "{" + ", ".join(ops) + "}" if ops else "nothing"


def equivalences(a: LayerGraph, b: LayerGraph) -> list[str]:
    """Spelling differences between two matching models that onnxzip treats as equivalent, in words.

    Dense kernels stored [out, in] vs [in, out], padding by ``auto_pad`` vs explicit pads, and what
    normalization did to each model (BatchNormalization folded, Transposes removed, value_info
    discarded, ...), grouped over layers.
    """
    lines: list[str] = []
    grouped: dict[tuple, list] = {}
    for la, lb in zip(a.layers, b.layers):
        if la.kind == "dense" and lb.kind == "dense":
            sa, sb = dense_spelling(la), dense_spelling(lb)
            if sa != sb:
                grouped.setdefault(("dense", sa, sb), []).append(la.number)
        ga, gb = conv_geometry(a, la), conv_geometry(b, lb)
        if ga is not None and gb is not None and ga["auto_pad"] != gb["auto_pad"]:
            key = ("conv", f"{la.op_type} {_geom_text(ga)}", f"{lb.op_type} {_geom_text(gb)}")
            grouped.setdefault(key, []).append(la.number)
    for (kind, sa, sb), numbers in grouped.items():
        nums = ", ".join(str(n) for n in dict.fromkeys(numbers))
        what = "dense kernel" if kind == "dense" else "padding"
        lines.append(f"layer{'s' if len(set(numbers)) > 1 else ''} {nums}: A {sa}, B {sb}: same {what}, equivalent")
    for label, g in (("A", a), ("B", b)):
        for note in g.notes:
            if note.startswith(("dense layers as", "Conv padding as")):
                continue
            lines.append(f"{label}: {note}")
    return lines
