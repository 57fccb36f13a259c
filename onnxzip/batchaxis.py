"""Release a static batch: make a model exported with a fixed batch take any batch, where its
graph allows it.

The dynamo exporter (without dynamic shapes) writes the example batch into the input's shape and
into Reshape targets (``[8, 512]`` before a classifier). Zipped with a model whose batch axis is
dynamic (a TorchScript export), the zipped model would have to take that fixed batch. Where the
batch appears only as the leading entry of Reshape targets whose input has it on axis 0, a 0 there
("copy this dimension from the input", ONNX Reshape with ``allowzero=0``; the dynamo exporter sets
``allowzero=1``, which changes nothing when the target holds no 0) makes the graph batch free; where
the input holds the batch folded into other axes (a strided view of a flattened tensor), a -1
there lets the Reshape infer it. A token that the exporter expanded to the batch before a Concat
(``[8, 1, D]``, every row the same) becomes its row, expanded to the features' batch at run time
(Shape, Concat, Expand: the TorchScript spelling). A Reshape whose output holds the samples folded
into another axis (attention's ``[batch * heads, L, d]``), found by following the samples through
the graph, infers that axis (-1). Anything else keeps the batch: the check below fails and the
model is left as it is.

The result is checked, not trusted: on calibration rows the released model must give the original
model's outputs at its own batch, on one row and on two batches stacked (ONNX Runtime, tolerance
:data:`RTOL` of the outputs' scale).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxzip.graph.build import probe_shapes
from onnxzip.graph.samples import sample_layouts
from onnxzip.onnx_nodes import attr
from onnxzip.runtime import session

__all__ = ["release_static_batch", "RTOL"]

# Largest difference from the original outputs, relative to their largest magnitude, that the
# check accepts (other batch sizes may take other kernels).
RTOL = 1e-4

BATCH_PARAM = "batch"


def release_static_batch(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[onnx.ModelProto | None, str]:
    """A copy of ``model`` that takes any batch, and a note saying what changed; or ``(None, why
    not)`` when its graph depends on the batch beyond what a Reshape copies from its input.

    Args:
        model: a normalized model whose inputs have a static batch (axis 0).
        feeds: calibration rows, exactly the model's batch of them (used to check the result).
    """
    batch = next(int(v.shape[0]) for v in feeds.values())
    shapes = probe_shapes(model, feeds)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    uses: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    edit = _Edit(m, inits, uses, shapes, batch)
    edit.layouts = sample_layouts(m, shapes, batch) if batch > 1 else {}
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Reshape":
            edit.reshape(n)
        elif n.op_type == "Concat":
            nodes.extend(edit.token(n))
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    changed, tokens = edit.reshapes, edit.tokens
    for v in list(m.graph.input) + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_value == batch:
            dims[0].Clear()
            dims[0].dim_param = BATCH_PARAM
    why = _differs(model, m, feeds)
    if why is not None:
        return None, f"graph depends on its static batch of {batch} ({why})"
    parts = []
    if changed:
        parts.append(f"{changed} Reshape target{'s' if changed != 1 else ''} no longer fix{'es' if changed == 1 else ''} the batch")
    if tokens:
        parts.append(f"{tokens} token{'s' if tokens != 1 else ''} repeated over the batch now Expand{'' if tokens != 1 else 's'} to it")
    targets = ", ".join(parts) or "nothing needed a change"
    return m, (f"static batch {batch} released: {targets}; checked against the original outputs at batch 1, "
               f"{batch} and {2 * batch}")


class _Edit:
    """The edits, node by node, that free a graph from its static batch."""

    def __init__(self, model, inits, uses, shapes, batch):
        self.m, self.inits, self.uses, self.shapes, self.batch = model, inits, uses, shapes, batch
        self.reshapes = self.tokens = 0
        self.layouts: dict = {}  # tensor -> where it holds the samples (onnxzip.graph.samples)

    def _init(self, base: str, value: np.ndarray) -> str:
        name, k = base, 0
        while name in self.inits or name in self.shapes:
            k += 1
            name = f"{base}_{k}"
        self.m.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.m.graph.initializer[-1]
        return name

    def reshape(self, n) -> None:
        """A Reshape target that starts with the batch: copy it from the input (0) or infer it (-1)."""
        if len(n.input) < 2 or n.input[1] not in self.inits:
            return
        target = numpy_helper.to_array(self.inits[n.input[1]])
        src = self.shapes.get(n.input[0])
        if target.ndim != 1 or not target.size or not src:
            return
        released = target.copy()
        if int(target[0]) != self.batch:
            # the samples folded into another axis (attention's [batch * heads, L, d] or
            # [L, batch * heads, d]): that axis, found by following the samples, is inferred
            layout = self.layouts.get(n.output[0])
            if layout is None or layout[0] >= target.size or (target == -1).any() or (target == 0).any():
                return
            if layout[1] * layout[2] == 1 and layout[0] == 0:
                return
            released[layout[0]] = -1
        elif src[0] == self.batch:  # the batch stays on axis 0: copy it from the input
            if attr(n, "allowzero", 0):
                if (target == 0).any():  # a literal 0 (an empty axis) elsewhere: leave it
                    return
                for a in n.attribute:  # no zero in the target: allowzero changes nothing but our 0
                    if a.name == "allowzero":
                        a.i = 0
            released[0] = 0
        elif (target == -1).any() or (target == 0).any() or int(np.prod(target)) != int(np.prod(src)):
            return
        else:  # the batch flattened into the input's axes (a strided view of a flat buffer): inferred
            released[0] = -1
        name = n.input[1]
        if self.uses[name] > 1:  # shared with another node: a copy of its own
            self.uses[name] -= 1
            n.input[1] = self._init(f"{name}/any_batch", released)
        else:
            self.inits[name].CopyFrom(numpy_helper.from_array(released, name))
        self.reshapes += 1

    def token(self, n) -> list:
        """A Concat joining features with a constant that repeats one row over the batch (a class
        token the dynamo exporter expanded at export time): the row, expanded to the features'
        batch at run time. Returns the nodes to put before the Concat."""
        opset = next((o.version for o in self.m.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 15:  # Shape's start/end
            return []
        axis = attr(n, "axis", 0)
        live = [i for i in n.input if i and i not in self.inits]
        if not live or axis % max(1, len(self.shapes.get(live[0], ()))) == 0:
            return []
        feats = live[0]
        if not self.shapes.get(feats) or self.shapes[feats][0] != self.batch:
            return []
        added = []
        for q, i in enumerate(n.input):
            if i not in self.inits or self.uses.get(i, 0) != 1:
                continue
            v = numpy_helper.to_array(self.inits[i])
            if v.ndim < 2 or v.shape[0] != self.batch or not np.array_equal(v, np.broadcast_to(v[:1], v.shape)):
                continue
            row = self._init(f"{i}/row", np.ascontiguousarray(v[:1]))
            ones = self._init(f"{i}/ones", np.ones(v.ndim - 1, dtype=np.int64))
            base = f"{n.name or i}/any_batch_{q}"
            added += [
                helper.make_node("Shape", [feats], [f"{base}/shape"], name=f"{base}/shape", start=0, end=1),
                helper.make_node("Concat", [f"{base}/shape", ones], [f"{base}/target"], name=f"{base}/target", axis=0),
                helper.make_node("Expand", [row, f"{base}/target"], [f"{base}/expanded"], name=f"{base}/expand"),
            ]
            n.input[q] = f"{base}/expanded"
            self.m.graph.initializer.remove(self.inits.pop(i))
            self.tokens += 1
        return added


def _differs(original: onnx.ModelProto, released: onnx.ModelProto, feeds: dict) -> str | None:
    """None when the released model reproduces the original on these rows, on one row and on the
    rows twice over; else what went wrong, in words."""
    ref = session(original, optimization="basic").run(None, feeds)
    try:
        sess = session(released, optimization="basic")
        runs = [
            (feeds, ref),
            ({k: v[:1] for k, v in feeds.items()}, [r[:1] for r in ref]),
            ({k: np.concatenate([v, v]) for k, v in feeds.items()}, [np.concatenate([r, r]) for r in ref]),
        ]
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a failure is an answer here, not an error to log
        for f, want in runs:
            got = sess.run(None, f, quiet)
            rows = len(next(iter(f.values())))
            for g, w in zip(got, want):
                if g.shape != w.shape:
                    return f"at batch {rows} an output has shape {list(g.shape)}, expected {list(w.shape)}"
                scale = float(np.max(np.abs(w))) if w.size else 0.0
                if np.issubdtype(w.dtype, np.floating):
                    if not np.allclose(g, w, rtol=0.0, atol=RTOL * (scale or 1.0)):
                        return f"at batch {rows} the outputs differ"
                elif not np.array_equal(g, w):
                    return f"at batch {rows} the outputs differ"
    except Exception as e:  # noqa: BLE001 - onnxruntime refuses the graph at another batch: keep it static
        text = str(e).splitlines()[0]
        node = text.split("Name:'")[1].split("'")[0] if "Name:'" in text else None
        return f"node '{node}' fails at another batch" if node else f"onnxruntime: {text[:120]}"
    return None
