"""Fused projections interleaved per head: one dense layer to ``[heads, k * d]``, cut per head.

GPT-NeoX (Pythia) computes q, k and v with one Linear whose output is read as
``[..., heads, 3 * d]`` (a Reshape), moved by Transposes that keep that last axis last, and cut
along it into the three parts (a Split, or three Slices). Every head holds its own q, k and v side
by side, so no contiguous range of the Linear's outputs is one part and
:func:`onnxzip.fused.split_fused_projections` does not apply. :func:`split_interleaved_projections`
rewrites such a layer into one layer per part (the columns ``h * k * d + j * d + c`` of part j,
head-major) whose outputs are reshaped to ``[..., heads, d]`` and moved by the same Transposes:
the tensors the cut produced, computed without the fused tensor. The rewritten model is run
against the original on example inputs; if any output differs, nothing is rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.fused import SHAPE_OPS, fused_candidates, split_columns
from onnxzip.onnx_nodes import attr, consumers, toposort
from onnxzip.ops.axes import slice_bounds
from onnxzip.runtime import session

__all__ = ["split_interleaved_projections"]

def _int_value(m: onnx.ModelProto, name: str, probed: dict) -> np.ndarray | None:
    """An integer initializer, or a small integer tensor as the shape probe computed it."""
    for t in m.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return probed.get(name)


def _cut(m: onnx.ModelProto, y: str, shapes: dict, probed: dict, readers: dict, width: int):
    """The chain ``y -> Reshape [..., H, K] -> Transpose* -> Split or Slices on the last axis``:
    (heads, parts, Transpose perms, the cut's outputs in part order, the chain's nodes); None for
    any other use of ``y``."""
    users = readers.get(y, [])
    if len(users) != 1 or users[0].op_type != "Reshape" or users[0].input[0] != y:
        return None
    reshape = users[0]
    shape = shapes.get(reshape.output[0])
    y_shape = shapes.get(y)
    if shape is None or y_shape is None or len(shape) != len(y_shape) + 1 or tuple(shape[:-2]) != tuple(y_shape[:-1]):
        return None
    heads, per_head = shape[-2], shape[-1]
    if heads < 2 or heads * per_head != width:
        return None
    chain, perms, t = [reshape], [], reshape.output[0]
    rank = len(shape)
    while True:
        users = [u for u in readers.get(t, []) if u.op_type not in SHAPE_OPS]
        if len(users) == 1 and users[0].op_type == "Transpose":
            perm = list(attr(users[0], "perm", list(range(rank))[::-1]))
            if perm[-1] != rank - 1:
                return None
            chain.append(users[0])
            perms.append(perm)
            t = users[0].output[0]
            continue
        break
    if len(users) == 1 and users[0].op_type == "Split" and attr(users[0], "axis", 0) % rank == rank - 1:
        ends = list(users[0].output)
    elif users and all(u.op_type == "Slice" and u.input[0] == t for u in users):
        ends = [u.output[0] for u in users]
    else:
        return None
    chain += users
    k = len(ends)
    if k < 2 or per_head % k or any((shapes.get(e) or [0])[-1] != per_head // k for e in ends):
        return None
    starts = [_slice_start(m, u, rank, probed) for u in users] if users[0].op_type == "Slice" else list(range(0, per_head, per_head // k))
    if any(s is None for s in starts) or sorted(starts) != list(range(0, per_head, per_head // k)):
        return None
    order = [ends[starts.index(j * (per_head // k))] for j in range(k)]
    return heads, k, perms, order, chain


def _slice_start(m: onnx.ModelProto, node, rank: int, probed: dict) -> int | None:
    """The start of a Slice along the last axis (bounds constant or computed from shapes); None
    otherwise."""
    names = [node.input[k] if len(node.input) > k else "" for k in range(1, 5)]
    values = [_int_value(m, n, probed) if n else None for n in names]
    if values[0] is None or any(n and v is None for n, v in zip(names[2:], values[2:])):
        return None
    bounds = slice_bounds([values[0], None, values[2], values[3]], rank, rank - 1)
    return None if bounds is None or bounds[2] != 1 else bounds[0]


def _rewrite(m: onnx.ModelProto, node, bias, heads: int, k: int, perms: list, ends: list, chain: list,
             width: int, rank: int) -> None:
    """Replace the layer and its cut by one layer per part, each reshaped to ``[..., heads, d]``
    (leading dimensions copied) and moved by the cut's Transposes into the cut's output."""
    d = width // (heads * k)
    columns = [np.array([h * k * d + j * d + c for h in range(heads) for c in range(d)]) for j in range(k)]
    drop = {tuple(n.output) for n in chain}  # by outputs: earlier rewrites rebuilt the node list
    kept = [n for n in m.graph.node if tuple(n.output) not in drop]
    del m.graph.node[:]
    m.graph.node.extend(kept)
    parts = split_columns(m, node, bias, columns)
    for j, (part, end) in enumerate(zip(parts, ends)):
        shape = f"{part}/heads_shape"
        m.graph.initializer.append(numpy_helper.from_array(np.array([0] * (rank - 1) + [heads, d], np.int64), shape))
        t = end if not perms else f"{part}/heads"
        m.graph.node.append(helper.make_node("Reshape", [part, shape], [t], name=f"{node.name}/part{j}/heads"))
        for n, perm in enumerate(perms):
            out = end if n == len(perms) - 1 else f"{part}/heads_t{n}"
            m.graph.node.append(helper.make_node("Transpose", [t], [out], perm=perm, name=f"{node.name}/part{j}/t{n}"))
            t = out


def _drop_dead(m: onnx.ModelProto, dead_before: set) -> bool:
    """Remove the nodes the rewrite left without readers; False if a node still reads a tensor
    nothing computes any more."""
    outputs = {o.name for o in m.graph.output}
    while True:
        read = {i for n in m.graph.node for i in n.input}
        dead = [n for n in m.graph.node if n.name not in dead_before and not any(o in read or o in outputs for o in n.output if o)]
        if not dead:
            break
        gone = {id(n) for n in dead}
        kept = [n for n in m.graph.node if id(n) not in gone]
        del m.graph.node[:]
        m.graph.node.extend(kept)
    known = {t.name for t in m.graph.initializer} | {i.name for i in m.graph.input} | {o for n in m.graph.node for o in n.output}
    return all(i in known for n in m.graph.node for i in n.input if i)


def split_interleaved_projections(m: onnx.ModelProto, feeds: dict | None = None) -> list[str]:
    """Rewrite every dense layer fused per head (see the module docstring) into one layer per
    part (in place); returns notes."""
    from onnxzip.graph.build import example_inputs, probe_shapes

    cands = fused_candidates(m)
    if not cands:
        return []
    feeds = feeds if feeds is not None else example_inputs(m)
    probed: dict = {}
    try:
        shapes = probe_shapes(m, feeds, probed)
    except Exception:  # noqa: BLE001 - a model the probe cannot run is left as it is
        return []
    readers = consumers(m)
    found = []
    for node, bias, y, width in cands:
        cut = _cut(m, y, shapes, probed, readers, width)
        if cut is not None:
            found.append((node, bias, y, width, cut))
    if not found:
        return []
    before = onnx.ModelProto()
    before.CopyFrom(m)
    read = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    dead_before = {n.name for n in m.graph.node if not any(o in read for o in n.output if o)}
    for node, bias, y, width, (heads, k, perms, ends, chain) in found:
        _rewrite(m, node, bias, heads, k, perms, ends, chain, width, len(shapes[y]))
    if not _drop_dead(m, dead_before):
        m.CopyFrom(before)
        return []
    toposort(m)
    if not _same_outputs(before, m, feeds):
        m.CopyFrom(before)
        return []
    return [f"split {len(found)} projection(s) fused per head (q/k/v side by side in each head) into one layer per part"]


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> bool:
    try:
        want = session(a, optimization="disable").run(None, feeds)
        got = session(b, optimization="disable").run(None, feeds)
    except Exception:  # noqa: BLE001 - a rewrite onnxruntime rejects is undone
        return False
    return all(w.shape == g.shape and np.allclose(w, g, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(w).max())))
               for w, g in zip(want, got))
