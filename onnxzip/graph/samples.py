"""Where the samples of a batch lie in each activation tensor.

The statistics treat every position of every sample as a row, and weight rows per sample (the
model each sample's targets inform, held-out samples, padding). Most tensors keep the samples
on axis 0, but attention as torch's ``nn.MultiheadAttention`` computes it runs sequence-first
([tokens, batch, channels]) and flattens tokens with samples ([tokens * batch, channels]) before
its output projection. :func:`sample_layouts` follows the batch axis of the graph inputs through
every node; :func:`samples_first` brings a tensor's samples to axis 0 for the accumulators.

A layout ``(axis, outer, inner)``: the tensor's axis ``axis`` holds ``outer x batch x inner``
entries (row-major): ``(0, 1, 1)`` is the usual samples-on-axis-0.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxzip.onnx_nodes import attr

__all__ = ["sample_layouts", "samples_first", "samples_first_axis", "STANDARD"]

STANDARD = (0, 1, 1)

# ops whose outputs describe shapes, not samples
_NO_SAMPLES = {"Shape", "Size", "ConstantOfShape", "Range", "EyeLike", "NonZero"}
# ops that keep the flat (row-major) order of their data input
_FLAT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64)) if len(dims) else 1


def _locate(shape: tuple, stride: int, batch: int) -> tuple[int, int] | None:
    """The axis holding the samples and its ``inner`` factor, from the sample stride (entries
    between consecutive samples in flat order)."""
    for k in range(len(shape)):
        after = _prod(shape[k + 1:])
        if after <= stride and stride % after == 0 and _prod(shape[k:]) % (stride * batch) == 0:
            return k, stride // after
    return None


def sample_layouts(model: onnx.ModelProto, shapes: dict, batch: int, consts: dict | None = None) -> dict[str, tuple]:
    """Tensor -> (axis, outer, inner) for every tensor computed from the samples of the graph inputs.

    ``shapes`` must come from a run on a batch of ``batch`` samples (``batch`` > 1 makes the
    layouts unambiguous; with 1 every layout is trivially right). A tensor whose layout the rules
    below cannot follow (a Slice or Gather along the samples, say) is left out. ``consts``: the
    small integer initializers by name (read from the model when None).
    """
    if consts is None:  # the small integer initializers (Gather indices, reduction axes)
        consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                  if t.data_type == onnx.TensorProto.INT64 and len(t.dims) <= 1}
    inits = {t.name for t in model.graph.initializer}
    stride: dict[str, int] = {}
    for i in model.graph.input:
        if i.name in inits or i.name not in shapes or not shapes[i.name]:
            continue
        stride[i.name] = _prod(shapes[i.name][1:])
    for node in model.graph.node:
        if node.op_type in _NO_SAMPLES:
            continue
        src = next((i for i in node.input if i in stride and shapes.get(i) is not None), None)
        if src is None:
            continue
        in_shape = tuple(shapes[src])
        found = _locate(in_shape, stride[src], batch)
        if found is None:
            continue
        axis, inner = found
        for out in node.output:
            out_shape = shapes.get(out)
            if not out or out_shape is None:
                continue
            out_shape = tuple(out_shape)
            s = _follow(node, src, in_shape, axis, inner, stride[src], out_shape, consts)
            if s is not None and _locate(out_shape, s, batch) is not None:
                stride[out] = s
    layouts = {}
    for name, s in stride.items():
        shape = shapes.get(name)
        if shape is not None:
            found = _locate(tuple(shape), s, batch)
            if found is not None:
                axis, inner = found
                layouts[name] = (axis, shape[axis] // (batch * inner), inner)
    return layouts


def _follow(node, src, in_shape, axis, inner, stride, out_shape, consts) -> int | None:
    """The sample stride of one output of ``node`` (None: unknown)."""
    op = node.op_type
    if op in _FLAT and node.input[0] == src:
        return stride
    if op == "Transpose":
        perm = list(attr(node, "perm", list(range(len(in_shape)))[::-1]))
        k = perm.index(axis)
        return inner * _prod(out_shape[k + 1:])
    if op == "Gather" and len(node.input) > 1 and node.input[1] == src and node.input[0] != src:
        # a lookup (token embedding): the indices' axes take the gathered axis's place
        g = attr(node, "axis", 0) % max(1, len(out_shape) - len(in_shape) + 1)
        k = g + axis
    elif op == "Gather" and node.input[0] == src:
        g = attr(node, "axis", 0) % len(in_shape)
        if g == axis:
            return None
        idx = consts.get(node.input[1])
        idx_rank = np.ndim(idx) if idx is not None else len(out_shape) - len(in_shape) + 1
        k = axis if g > axis else axis + idx_rank - 1
    elif op.startswith("Reduce") or op in ("ArgMax", "ArgMin"):
        keep = attr(node, "keepdims", 1)
        axes = attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = consts.get(node.input[1])
            axes = None if value is None else np.asarray(value).reshape(-1).tolist()
        if axes is not None and not isinstance(axes, int):
            axes = [int(a) % len(in_shape) for a in axes]
        else:
            axes = [attr(node, "axis", 0) % len(in_shape)] if op in ("ArgMax", "ArgMin") else None
        if axes is None or axis in axes:
            return None
        k = axis if keep else axis - sum(1 for a in axes if a < axis)
    else:
        # element-wise, MatMul batch dims, Concat/Slice/Split along other axes, normalizations:
        # the samples stay on their axis (right-aligned broadcasting)
        k = axis + len(out_shape) - len(in_shape)
    if k < 0 or k >= len(out_shape) or out_shape[k] != in_shape[axis]:
        return None
    return inner * _prod(out_shape[k + 1:])


def samples_first(x: np.ndarray, layout: tuple | None, batch: int) -> np.ndarray:
    """``x`` with its ``batch`` samples on axis 0 (a view; ``x`` itself for a standard layout).

    The other axes keep their order; :func:`samples_first_axis` says where an axis went.
    """
    if layout is None or tuple(layout) == STANDARD:
        return x
    s, outer, inner = layout
    v = x.reshape(x.shape[:s] + (outer, batch, inner) + x.shape[s + 1:])
    return np.moveaxis(v, s + 1, 0)


def samples_first_axis(layout: tuple | None, axis: int) -> int:
    """Where axis ``axis`` (not the samples' axis) lies after :func:`samples_first`."""
    if layout is None or tuple(layout) == STANDARD:
        return axis
    s = layout[0]
    if axis == s:
        raise ValueError(f"axis {axis} holds the samples")
    return axis + 1 if axis < s else axis + 2
