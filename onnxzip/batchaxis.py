"""Release a static batch: make a model exported with a fixed batch take any batch, where its
graph allows it.

The dynamo exporter (without dynamic shapes) writes the example batch into the input's shape and
into Reshape targets (``[8, 512]`` before a classifier). Zipped with a model whose batch axis is
dynamic (a TorchScript export), the zipped model would have to take that fixed batch. Where the
batch appears only as the leading entry of Reshape targets whose input has it on axis 0, a 0 there
("copy this dimension from the input", ONNX Reshape with ``allowzero=0``; the dynamo exporter sets
``allowzero=1``, which changes nothing when the target holds no 0) makes the graph batch free; where
the input holds the batch folded into other axes (a strided view of a flattened tensor), a -1
there lets the Reshape infer it. Anything else (the batch folded into the head axis, ``[batch * heads, L, d]``; a token already
expanded to the batch, ``[8, 1, D]``) keeps the batch: the check below fails and the model is left
as it is.

The result is checked, not trusted: on calibration rows the released model must give the original
model's outputs at its own batch, on one row and on two batches stacked (ONNX Runtime, tolerance
:data:`RTOL` of the outputs' scale).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxzip.graph.build import probe_shapes
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
    changed = 0
    for n in m.graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        target = numpy_helper.to_array(inits[n.input[1]])
        src = shapes.get(n.input[0])
        if target.ndim != 1 or not target.size or int(target[0]) != batch or not src:
            continue
        released = target.copy()
        if src[0] == batch:  # the batch stays on axis 0: copy it from the input
            if attr(n, "allowzero", 0):
                if (target == 0).any():  # a literal 0 (an empty axis) elsewhere: leave it
                    continue
                for a in n.attribute:  # no zero in the target: allowzero changes nothing but our 0
                    if a.name == "allowzero":
                        a.i = 0
            released[0] = 0
        elif (target == -1).any() or (target == 0).any() or int(np.prod(target)) != int(np.prod(src)):
            continue
        else:  # the batch flattened into the input's axes (a strided view of a flat buffer): inferred
            released[0] = -1
        name = n.input[1]
        if uses[name] > 1:  # shared with another node: a copy of its own
            name = f"{name}/any_batch"
            k = 0
            while name in inits:
                k += 1
                name = f"{n.input[1]}/any_batch_{k}"
            uses[n.input[1]] -= 1
            n.input[1] = name
            m.graph.initializer.append(numpy_helper.from_array(released, name))
            inits[name] = m.graph.initializer[-1]
            uses[name] = 1
        else:
            inits[name].CopyFrom(numpy_helper.from_array(released, name))
        changed += 1
    for v in list(m.graph.input) + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_value == batch:
            dims[0].Clear()
            dims[0].dim_param = BATCH_PARAM
    why = _differs(model, m, feeds)
    if why is not None:
        return None, f"graph depends on its static batch of {batch} ({why})"
    targets = (f"{changed} Reshape target{'s' if changed != 1 else ''} no longer fix{'es' if changed == 1 else ''} the batch"
               if changed else "no Reshape needed a change")
    return m, (f"static batch {batch} released: {targets}; checked against the original outputs at batch 1, "
               f"{batch} and {2 * batch}")


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
