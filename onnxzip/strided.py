"""Identity ``as_strided``: a Gather of every entry of a flattened tensor, in order.

torch's dynamo exporter writes some ``as_strided`` views (torchvision's Swin: average pooling,
then flatten) as a Reshape to one axis and a Gather whose indices a Range/Mul/Add subgraph computes
from the shapes. When those indices are ``0, 1, 2, ...`` in the Gather's output shape, the Gather is
a Reshape; :func:`identity_gathers_to_reshapes` writes it as one (``Reshape(data, Shape(indices))``),
so the channel axis can be followed through it. The indices are checked on batches of one and two
samples (the batch axis is usually the only dynamic one).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.runtime import session

__all__ = ["identity_gathers_to_reshapes"]


def _fetch(m: onnx.ModelProto, names: list[str], batch: int) -> dict[str, np.ndarray] | None:
    from onnxzip.graph.build import example_inputs

    p = onnx.ModelProto()
    p.CopyFrom(m)
    have = {o.name for o in p.graph.output}
    for n in names:
        if n not in have:
            p.graph.output.append(helper.make_empty_tensor_value_info(n))
    try:
        return dict(zip(names, session(p, optimization="disable").run(names, example_inputs(m, batch))))
    except Exception:  # noqa: BLE001 - a model the probe cannot run (a static batch, say) is left as it is
        return None


def identity_gathers_to_reshapes(m: onnx.ModelProto) -> list[str]:
    """Rewrite identity Gathers of flattened tensors into Reshapes (in place); returns notes.

    The indices are computed at run time (a dynamic batch) or stored as an initializer (a static
    batch, where the exporter or constant folding computed them).
    """
    inits = {t.name: t for t in m.graph.initializer}
    cands = [n for n in m.graph.node if n.op_type == "Gather" and not any(a.name == "axis" and a.i != 0 for a in n.attribute)
             and n.input[0] not in inits]
    if not cands:
        return []
    names = list(dict.fromkeys(t for n in cands for t in n.input[:2] if t not in inits))
    runs = [_fetch(m, names, b) for b in (1, 2)]
    if any(r is None for r in runs):
        return []
    for r in runs:
        r.update({n.input[1]: numpy_helper.to_array(inits[n.input[1]]) for n in cands if n.input[1] in inits})
    done = 0
    for n in cands:
        if not all(_is_identity(r[n.input[0]], r[n.input[1]]) for r in runs):
            continue
        idx = n.input[1]
        at = list(m.graph.node).index(n)
        if idx in inits:
            shape = f"{n.output[0]}/shape"
            while shape in inits:
                shape += "_"
            m.graph.initializer.append(numpy_helper.from_array(np.array(runs[0][idx].shape, dtype=np.int64), shape))
        else:
            shape = f"{n.output[0]}/shape"
            m.graph.node.insert(at, helper.make_node("Shape", [idx], [shape], name=f"{n.name}/shape"))
        n.op_type = "Reshape"
        del n.attribute[:]
        n.input[1] = shape
        done += 1
    return [f"wrote {done} Gather(s) of every entry in order (an identity as_strided) as Reshape"] if done else []


def _is_identity(data: np.ndarray, idx: np.ndarray) -> bool:
    """``Gather(data, idx)`` reads every entry of a 1-D ``data`` once, in order."""
    if data.ndim != 1 or idx.size != data.size or not np.issubdtype(idx.dtype, np.integer):
        return False
    return bool(np.array_equal(idx.reshape(-1), np.arange(data.size)))
