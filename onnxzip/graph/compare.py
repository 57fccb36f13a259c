"""Do two layer graphs describe the same architecture? If not, where do they first differ?"""

from __future__ import annotations

from onnxzip.graph.layergraph import Layer, LayerGraph
from onnxzip.graph.spaces import Blocked, ConcatSpace, ExpandSpace, GroupSpace, InputSpace, Space

__all__ = ["space_signature", "layer_signature", "first_difference", "canonical_weight_shape"]


def space_signature(space: Space):
    if isinstance(space, GroupSpace):
        return ("group", space.gid, space.size)
    if isinstance(space, ConcatSpace):
        return ("concat",) + tuple(space_signature(p) for p in space.parts)
    if isinstance(space, ExpandSpace):
        return ("expand", space.outer, space.inner, space_signature(space.part))
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


def _describe(layer: Layer) -> str:
    ins = space_signature(layer.in_space)
    outs = space_signature(layer.out_space)
    return f"{layer.node} ({layer.describe()}, reads {_fmt(ins)}, writes {_fmt(outs)})"


def _fmt(sig) -> str:
    if sig[0] == "group":
        return f"group {sig[1]}"
    if sig[0] == "concat":
        return "concat(" + ", ".join(_fmt(s) for s in sig[1:]) + ")"
    if sig[0] == "expand":
        return f"flatten({_fmt(sig[3])} x{sig[1] * sig[2]})"
    return sig[0]


def first_difference(a: LayerGraph, b: LayerGraph) -> str | None:
    """None when the graphs match; else one line naming the first differing layer, both sides."""
    if len(a.inputs) != len(b.inputs):
        return f"A has {len(a.inputs)} inputs, B has {len(b.inputs)}"
    for na, nb in zip(a.inputs, b.inputs):
        sa, sb = a.shapes.get(na), b.shapes.get(nb)
        if sa is not None and sb is not None and tuple(sa[1:]) != tuple(sb[1:]):
            return f"input shapes differ: A '{na}' {list(sa)}, B '{nb}' {list(sb)}"
    for k, (la, lb) in enumerate(zip(a.layers, b.layers)):
        if layer_signature(la) != layer_signature(lb):
            return f"layer {la.number} (#{k + 1}): A {_describe(la)} vs B {_describe(lb)}"
    if len(a.layers) != len(b.layers):
        longer, name = (a, "A") if len(a.layers) > len(b.layers) else (b, "B")
        extra = longer.layers[min(len(a.layers), len(b.layers))]
        return f"{name} has {len(longer.layers) - min(len(a.layers), len(b.layers))} more weight layers, from {_describe(extra)}"
    pa, pb = a.params, b.params
    if len(pa) != len(pb):
        return f"A has {len(pa)} per-channel parameters, B has {len(pb)} (e.g. BatchNormalization kept in one model only)"
    for x, y in zip(pa, pb):
        if (x.gid, x.op_type if x.op_type != "Sub" else "Add") != (y.gid, y.op_type if y.op_type != "Sub" else "Add"):
            return f"per-channel parameter differs: A {x.op_type} '{x.node}' on group {x.gid} vs B {y.op_type} '{y.node}' on group {y.gid}"
    if len(a.outputs) != len(b.outputs):
        return f"A has {len(a.outputs)} outputs, B has {len(b.outputs)}"
    return None
