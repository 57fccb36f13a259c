"""Fused projections: one dense layer whose output channels are several layers' outputs side by side.

Attention often computes q, k and v with one Linear to 3*D (timm's ``qkv``, torch's
``nn.MultiheadAttention`` ``in_proj``) and then cuts its output into the three parts by a chain of
Reshape/Transpose/Squeeze/Unsqueeze ending in Gather, Split or Slice ("unbind"). Each part is its
own feature group (q and k meet in the score product, v goes on to the output projection), so
:func:`split_fused_projections` rewrites such a layer into one layer per part, joined by a Concat
on the channel axis: the same function, and the layer graph then sees a concatenation of groups
(:class:`onnxzip.graph.spaces.ConcatSpace`) whose parts the chain's ops pick apart.

Which layers are fused is found by running the model once with each candidate's output replaced
by its part index (0, 1, 2 ... along the channels): a layer is fused into ``k`` parts when every
tensor the chain hands to other ops holds exactly one part, whole.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.onnx_nodes import attr, consumers, toposort
from onnxzip.runtime import session

__all__ = ["split_fused_projections", "split_columns", "fused_candidates", "SHAPE_OPS"]

# ops that only move or pick entries of their first input
_MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Split", "Slice", "Identity"}
SHAPE_OPS = {"Shape", "Size"}  # read a tensor's shape, not its entries
_PARTS = (2, 3, 4)
_PROBE = "::onnxzip_parts"


def fused_candidates(m: onnx.ModelProto) -> list[tuple]:
    """(layer node, bias Add node or None, output tensor, out features) of dense layers whose
    output only feeds ops that move entries."""
    inits = {t.name: t for t in m.graph.initializer}
    readers = consumers(m)
    outputs = {o.name for o in m.graph.output}
    found = []
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 and n.input[0] not in inits:
            width = inits[n.input[1]].dims[1]
        elif n.op_type == "Gemm" and n.input[1] in inits and not attr(n, "transA", 0):
            width = inits[n.input[1]].dims[0 if attr(n, "transB", 0) else 1]
        else:
            continue
        y, bias = n.output[0], None
        users = [u for u in readers.get(y, []) if u.op_type not in SHAPE_OPS]
        if n.op_type == "MatMul" and len(users) == 1 and users[0].op_type == "Add" and y not in outputs:
            add = users[0]
            other = add.input[1] if add.input[0] == y else add.input[0]
            if other in inits and list(inits[other].dims) == [width]:
                bias, y = add, add.output[0]
                users = [u for u in readers.get(y, []) if u.op_type not in SHAPE_OPS]
        if y in outputs or not users or any(u.op_type not in _MOVES or u.input[0] != y for u in users):
            continue
        if not any(width % k == 0 for k in _PARTS):
            continue
        found.append((n, bias, y, int(width)))
    return found


def _closure(m: onnx.ModelProto, y: str) -> tuple[list[str], list[str]]:
    """Tensors the moving ops compute from ``y``, and those of them other ops (or outputs) read."""
    readers = consumers(m)
    outputs = {o.name for o in m.graph.output}
    inside, stack, ends = [], [y], []
    seen = {y}
    while stack:
        t = stack.pop()
        leaves = t in outputs
        for c in readers.get(t, []):
            if c.op_type in SHAPE_OPS:
                continue
            if c.op_type in _MOVES and c.input[0] == t:
                for o in c.output:
                    if o and o not in seen:
                        seen.add(o)
                        inside.append(o)
                        stack.append(o)
            else:
                leaves = True
        if leaves and t != y:
            ends.append(t)
    return inside, ends


def _probe(m: onnx.ModelProto, cands: list, feeds: dict) -> dict[str, np.ndarray]:
    """Run ``m`` with each candidate's output replaced by its channel index (as float)."""
    p = onnx.ModelProto()
    p.CopyFrom(m)
    fetch = []
    for node, _, y, width in cands:
        idx = f"{y}{_PROBE}/index"
        p.graph.initializer.append(numpy_helper.from_array(np.arange(width, dtype=np.float32), idx))
        zero, coded = f"{y}{_PROBE}/zero", f"{y}{_PROBE}"
        for n in p.graph.node:
            for k, i in enumerate(n.input):
                if i == y:
                    n.input[k] = coded
        p.graph.node.append(helper.make_node("Mul", [y, f"{y}{_PROBE}/0"], [zero]))
        p.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), f"{y}{_PROBE}/0"))
        p.graph.node.append(helper.make_node("Add", [zero, idx], [coded]))
        fetch += _closure(m, y)[1]

    toposort(p)
    have = {o.name for o in p.graph.output}
    for t in dict.fromkeys(fetch):
        if t not in have:
            p.graph.output.append(helper.make_empty_tensor_value_info(t))
    names = list(dict.fromkeys(fetch))
    values = session(p, optimization="disable").run(names, feeds)
    return dict(zip(names, values))


def _parts_of(values: list[np.ndarray], width: int) -> int | None:
    """The number of parts k when every value holds exactly one whole part (of width // k channels)."""
    for k in _PARTS:
        if width % k:
            continue
        d = width // k
        seen = set()
        ok = True
        for v in values:
            part = np.floor(v / d)
            if v.size == 0 or part.min() != part.max():
                ok = False
                break
            within = np.sort(np.unique(v - part.min() * d))
            if len(within) != d or not np.array_equal(within, np.arange(d)):
                ok = False
                break
            seen.add(int(part.min()))
        if ok and seen == set(range(k)) and values:
            return k
    return None


def split_fused_projections(m: onnx.ModelProto, feeds: dict | None = None) -> list[str]:
    """Rewrite every fused dense layer into one layer per part plus a channel Concat (in place)."""
    cands = fused_candidates(m)
    if not cands:
        return []
    if feeds is None:
        from onnxzip.graph.build import example_inputs

        feeds = example_inputs(m)
    try:
        values = _probe(m, cands, feeds)
    except Exception:  # noqa: BLE001 - a model the probe cannot run is left as it is
        return []
    split = 0
    for node, bias, y, width in cands:
        _, ends = _closure(m, y)
        k = _parts_of([values[t] for t in ends], width)
        if k is None:
            continue
        _split(m, node, bias, y, width, k)
        split += 1
    if not split:
        return []

    toposort(m)
    return [f"split {split} fused projection(s) (one Linear to several layers' outputs, e.g. q/k/v) into one layer per part"]


def _split(m: onnx.ModelProto, node, bias, y: str, width: int, k: int) -> None:
    d = width // k
    parts = split_columns(m, node, bias, [np.arange(c * d, (c + 1) * d) for c in range(k)])
    m.graph.node.append(helper.make_node("Concat", parts, [y], name=f"{node.name}/parts", axis=-1))


def split_columns(m: onnx.ModelProto, node, bias, columns: list) -> list[str]:
    """Replace dense layer ``node`` (and its bias Add) by one layer per entry of ``columns`` (the
    output channels it keeps, in order); returns the parts' output tensors. The layer's output is
    no longer computed: the caller rebuilds what read it."""
    inits = {t.name: t for t in m.graph.initializer}
    w = numpy_helper.to_array(inits[node.input[1]])
    out_axis = 1 if node.op_type == "MatMul" or not attr(node, "transB", 0) else 0
    gemm_bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    b = numpy_helper.to_array(inits[gemm_bias]) if gemm_bias else None
    add_bias = None
    if bias is not None:
        add_bias = bias.input[1] if bias.input[0] == node.output[0] else bias.input[0]
        b = numpy_helper.to_array(inits[add_bias])
    new_nodes, parts = [], []
    for c, cols in enumerate(columns):
        cols = np.asarray(cols, dtype=np.int64)
        wname = f"{node.input[1]}/part{c}"
        m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.take(w, cols, axis=out_axis)), wname))
        out = f"{node.output[0]}/part{c}"
        layer = onnx.NodeProto()
        layer.CopyFrom(node)
        layer.name = f"{node.name}/part{c}"
        layer.input[1] = wname
        layer.output[0] = out
        if gemm_bias:
            bname = f"{gemm_bias}/part{c}"
            m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b.reshape(-1)[cols]), bname))
            layer.input[2] = bname
        new_nodes.append(layer)
        if bias is not None:
            bname = f"{add_bias}/part{c}"
            m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b[cols]), bname))
            added = f"{bias.output[0]}/part{c}"
            new_nodes.append(helper.make_node("Add", [out, bname], [added], name=f"{bias.name}/part{c}"))
            out = added
        parts.append(out)
    drop = {node.output[0]} | ({bias.output[0]} if bias is not None else set())
    # the parts take the layer's place: layers of one depth keep their order (the layer graph
    # lists them in node order, and two exports of one network must list them alike)
    at = next(k for k, n in enumerate(m.graph.node) if n.output and n.output[0] == node.output[0])
    before = [n for n in m.graph.node[:at] if not (n.output and n.output[0] in drop)]
    after = [n for n in m.graph.node[at:] if not (n.output and n.output[0] in drop)]
    del m.graph.node[:]
    m.graph.node.extend(before + new_nodes + after)
    used = {i for n in m.graph.node for i in n.input}
    keep_inits = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep_inits)
    return parts
