"""Ops that move, pool, reshape or join tensors: where the channel axis goes."""

from __future__ import annotations

import numpy as np

from onnxzip.graph.spaces import Blocked, ConcatSpace, ExpandSpace, GroupSpace, HeadsOnly, HeadSpace, InputSpace, NoFeatures
from onnxzip.ops.attention import merge_heads, split_heads, transpose_heads
from onnxzip.ops.registry import register


def _nonfeature(ctx, node):
    """Outputs of a node with no feature inputs: input-derived, blocked or shape-only."""
    spaces = [ctx.space(i) for i in node.input if i]
    for s in spaces:
        if isinstance(s, Blocked):
            return [s for _ in node.output]
    kind = InputSpace() if any(isinstance(s, InputSpace) for s in spaces) else NoFeatures()
    return [kind for _ in node.output]


def on_features(fn):
    """Handler decorator: a node whose first input carries no features passes its kind through;
    otherwise ``fn(ctx, node, x, space)`` with ``x`` the first input and ``space`` its features."""

    def handler(ctx, node):
        x = node.input[0]
        space = ctx.space(x)
        if not ctx.is_feature(space):
            return _nonfeature(ctx, node)
        return fn(ctx, node, x, space)

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


def _moved(ctx, node, space, axis):
    out = node.output[0]
    if isinstance(space, GroupSpace):
        return ctx.follow(space, out, axis)
    ctx.set_axis(out, axis)
    return space


@register("Shape", "Size", "NonZero", "ConstantOfShape", "EyeLike", "RandomNormalLike", "RandomUniformLike")
def shape_only(ctx, node):
    return [NoFeatures() for _ in node.output]


def map_axis(in_shape, out_shape, axis):
    """Where channel axis ``axis`` of ``in_shape`` lands after a row-major reshape.

    Returns (out_axis, outer, inner): the output axis holds ``outer x C x inner`` entries per
    channel block, or None when the channels are split across output axes.
    """
    c = in_shape[axis]
    inner_in = int(np.prod(in_shape[axis + 1:], dtype=np.int64))
    for k in range(len(out_shape)):
        inner_out = int(np.prod(out_shape[k + 1:], dtype=np.int64))
        span = inner_out * out_shape[k]
        if inner_out <= inner_in and inner_in % inner_out == 0 and span >= inner_in * c and span % (inner_in * c) == 0:
            return k, span // (inner_in * c), inner_in // inner_out
    return None


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
@on_features
def reshape(ctx, node, x, space):
    in_shape, out_shape = ctx.shape(x), ctx.shape(node.output[0])
    axis = ctx.feature_axis(x)
    if isinstance(space, HeadSpace):
        merged = merge_heads(ctx, node, space, in_shape, out_shape)
        return merged if merged is not None else ctx.unsupported_op(node, "reshapes attention heads in an unknown way")
    if isinstance(space, HeadsOnly):
        found = map_axis(in_shape, out_shape, axis)
        if found is None or found[1:] != (1, 1):
            return ctx.unsupported_op(node, "reshapes attention scores across heads")
        ctx.head_axis_of[node.output[0]] = found[0]
        return [_moved(ctx, node, space, found[0])]
    found = map_axis(in_shape, out_shape, axis) if in_shape and out_shape is not None else None
    if found is None and isinstance(space, GroupSpace):
        heads = split_heads(ctx, node, space, in_shape, out_shape, axis)
        if heads is not None:
            return heads
    if found is None:
        return ctx.unsupported_op(node, f"{node.op_type} {list(in_shape)} -> {list(out_shape)} splits the channel axis")
    k, outer, inner = found
    if outer == 1 and inner == 1:
        return [_moved(ctx, node, space, k)]
    expanded = ExpandSpace(space, outer, inner, outer * space.size * inner)
    ctx.set_axis(node.output[0], k)
    return [expanded]


@register("Transpose")
@on_features
def transpose(ctx, node, x, space):
    rank = ctx.rank(x)
    perm = list(ctx.attr(node, "perm", list(range(rank))[::-1]))
    if isinstance(space, (HeadSpace, HeadsOnly)):
        return transpose_heads(ctx, node, space, perm)
    return [_moved(ctx, node, space, perm.index(ctx.feature_axis(x)))]


@register("Concat")
def concat(ctx, node):
    names = [i for i in node.input if i]
    spaces = [ctx.space(i) for i in names]
    feats = [(i, s) for i, s in zip(names, spaces) if ctx.is_feature(s)]
    if any(isinstance(s, Blocked) for s in spaces):
        return [next(s for s in spaces if isinstance(s, Blocked))]
    if not feats:
        return _nonfeature(ctx, node)
    out = node.output[0]
    rank = ctx.rank(out)
    axis = ctx.attr(node, "axis", 0) % rank
    ch = {ctx.feature_axis(i) for i, _ in feats}
    if len(ch) != 1:
        return ctx.unsupported_op(node, "inputs' channel axes differ")
    ch = ch.pop()
    if axis == ch:
        if len(feats) != len(names):
            return ctx.unsupported_op(node, "concatenates features with model inputs or constants along channels")
        parts = tuple(s for _, s in feats)
        if len(parts) == 1:  # a Concat of one tensor (torch.cat of a one-element list) is a copy
            return [_moved(ctx, node, parts[0], ch)]
        space = ConcatSpace(parts, sum(p.size for p in parts))
        ctx.set_axis(out, ch)
        return [space]
    # joined along another axis (tokens, say): the channels stay one group
    groups = [s for _, s in feats]
    if not all(isinstance(s, GroupSpace) for s in groups) or len({s.size for s in groups}) != 1:
        return ctx.unsupported_op(node, "joins different feature spaces along a non-channel axis")
    result = ctx.union(groups, out, ch)
    for k, i in enumerate(node.input):
        if i and ctx.is_const(i):
            shape = ctx.shape(i)
            if shape[ch] != 1:
                ctx.add_param(node, k, ch, result)
        elif i and not ctx.is_feature(ctx.space(i)):
            if not isinstance(ctx.space(i), NoFeatures) or not _broadcast_param(ctx, i, ch, rank, result):
                return ctx.unsupported_op(node, "joins features with model inputs")
    return [result]


def _broadcast_param(ctx, name, axis, rank, space) -> bool:
    """A learned token (e.g. a class token) broadcast to the batch by Expand or Tile: its
    initializer's channel axis follows the group."""
    producer = ctx.producer.get(name)
    while producer is not None and producer.op_type in ("Expand", "Tile", "Cast", "Identity"):
        src = producer.input[0]
        if ctx.is_const(src):
            shape = ctx.shape(src) or ()
            pos = axis - (rank - len(shape))
            if pos < 0 or len(shape) == 0:
                return False
            if shape[pos] == space.size:
                ctx.add_param(producer, 0, pos, space)
            return shape[pos] in (1, space.size)
        producer = ctx.producer.get(src)
    return False


def _passthrough(ctx, node, need_axis=None):
    return on_features(lambda c, n, x, space: _pass_on(c, n, x, space, need_axis))(ctx, node)


def _pass_on(ctx, node, x, space, need_axis):
    axis = ctx.feature_axis(x)
    if need_axis is not None and axis != need_axis:
        return ctx.unsupported_op(node, f"{node.op_type} expects channels on axis {need_axis}")
    out_rank, in_rank = ctx.rank(node.output[0]), ctx.rank(x)
    outs = [_moved(ctx, node, space, axis + out_rank - in_rank)]
    return outs + [NoFeatures() for _ in node.output[1:]]


@register("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "MaxRoiPool")
def pool(ctx, node):
    return _passthrough(ctx, node, need_axis=1)


@register("Resize", "Upsample", "Expand")
def resize(ctx, node):
    return _passthrough(ctx, node)


def _axes(ctx, node, rank, input_index=1):
    axes = ctx.attr(node, "axes", None)
    if axes is None and len(node.input) > input_index and node.input[input_index]:
        if not ctx.is_const(node.input[input_index]):
            return None
        axes = ctx.const(node.input[input_index]).tolist()
    return None if axes is None else [int(a) % rank for a in axes]


_SYMMETRIC = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare", "ReduceL1")


@register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare")
@on_features
def reduce(ctx, node, x, space):
    rank = ctx.rank(x)
    axes = _axes(ctx, node, rank)
    if axes is None or len(axes) == 0:
        if len(node.input) > 1 and node.input[1] and axes is None:
            return ctx.unsupported_op(node, "reduction axes computed at run time")
        if ctx.attr(node, "noop_with_empty_axes", 0):
            return _passthrough(ctx, node)
        axes = list(range(rank))
    axis = ctx.feature_axis(x)
    if axis in axes:
        if node.op_type in _SYMMETRIC and isinstance(space, GroupSpace) and ctx.attr(node, "keepdims", 1):
            # a statistic over all channels (a decomposed LayerNorm's mean and variance): the same
            # whatever the channel order; under a zip it is approximated like LayerNorm itself
            return [NoFeatures()]
        ctx.cross_channel(node, space)
        return [NoFeatures()]
    keep = ctx.attr(node, "keepdims", 1)
    new_axis = axis if keep else axis - sum(1 for a in axes if a < axis)
    return [_moved(ctx, node, space, new_axis)]


@register("Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "ArgMax", "ArgMin", "TopK", "CumSum")
@on_features
def channel_mixing(ctx, node, x, space):
    rank = ctx.rank(x)
    axis = ctx.attr(node, "axis", -1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization") else 0)
    if node.op_type == "CumSum":
        axis = int(ctx.const(node.input[1])) if ctx.is_const(node.input[1]) else ctx.feature_axis(x)
    axis %= rank
    ch = ctx.feature_axis(x)
    if axis == ch:
        ctx.cross_channel(node, space)
    if node.op_type in ("ArgMax", "ArgMin"):
        return [NoFeatures()]
    if node.op_type == "TopK":
        return [_moved(ctx, node, space, ch), NoFeatures()] if axis != ch else [space, NoFeatures()]
    return [_moved(ctx, node, space, ch)]


@register("Pad")
@on_features
def pad(ctx, node, x, space):
    rank = ctx.rank(x)
    pads = ctx.attr(node, "pads", None)
    if pads is None:
        if len(node.input) < 2 or not ctx.is_const(node.input[1]):
            return ctx.unsupported_op(node, "pads computed at run time")
        pads = ctx.const(node.input[1]).tolist()
    axes = _axes(ctx, node, rank, input_index=3) or list(range(rank))
    axis = ctx.feature_axis(x)
    n = len(axes)
    for k, a in enumerate(axes):
        if a == axis and (pads[k] != 0 or pads[k + n] != 0):
            return ctx.unsupported_op(node, "pads the channel axis")
    return [_moved(ctx, node, space, axis)]


@register("Slice", "Tile")
@on_features
def keep_channels(ctx, node, x, space):
    """Slice or Tile along other axes: the channels pass through when their count is unchanged.
    A Slice of the channel axis with constant bounds selects channels (see :func:`split`)."""
    axis = ctx.feature_axis(x)
    if ctx.shape(node.output[0])[axis] != ctx.shape(x)[axis]:
        index = _sliced_channels(ctx, node, axis) if node.op_type == "Slice" else None
        picked = ctx.select(space, index, node.output[0], axis) if index is not None else None
        if picked is None:
            return ctx.unsupported_op(node, f"{node.op_type} changes the channel axis")
        return [picked]
    return [_moved(ctx, node, space, axis)]


def _sliced_channels(ctx, node, axis):
    """The channels a Slice keeps along ``axis`` (constant starts/ends/axes/steps), else None."""
    rank = ctx.rank(node.input[0])
    size = ctx.shape(node.input[0])[axis]
    names = list(node.input[1:]) + [""] * (4 - len(node.input[1:]))
    values = [ctx.int_value(n) if n else None for n in names]
    if values[0] is None or values[1] is None or any(n and v is None for n, v in zip(names[2:], values[2:])):
        return None
    starts, ends = values[0].reshape(-1).tolist(), values[1].reshape(-1).tolist()
    axes = values[2].reshape(-1).tolist() if names[2] else list(range(len(starts)))
    steps = values[3].reshape(-1).tolist() if names[3] else [1] * len(starts)
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        if int(ax) % rank == axis:
            return list(range(size))[slice(int(st), int(en), int(sp))]
    return None


@register("Split")
@on_features
def split(ctx, node, x, space):
    rank = ctx.rank(x)
    axis = ctx.attr(node, "axis", 0) % rank
    ch = ctx.feature_axis(x)
    if axis == ch:
        # a channel split (ShuffleNet's chunk): each output selects a range of channels, and the
        # groups it cuts are matched within each range
        outs, start = [], 0
        for o in node.output:
            n = ctx.shape(o)[ch]
            picked = ctx.select(space, range(start, start + n), o, ch)
            if picked is None:
                return ctx.unsupported_op(node, "splits the channel axis of flattened or head-split features")
            outs.append(picked)
            start += n
        return outs
    outs = []
    for o in node.output:
        if isinstance(space, GroupSpace):
            outs.append(ctx.follow(space, o))
        else:
            ctx.set_axis(o, ch)
            outs.append(space)
    return outs


@register("Gather")
def gather(ctx, node):
    x, idx = node.input[0], node.input[1]
    space = ctx.space(x)
    if not ctx.is_feature(space):
        return _nonfeature(ctx, node)
    rank = ctx.rank(x)
    axis = ctx.attr(node, "axis", 0) % rank
    ch = ctx.feature_axis(x)
    if axis == ch:
        # constant indices select or reorder channels (a channel shuffle after normalization)
        picked = None
        if ctx.is_const(idx) and ctx.const(idx).ndim == 1:
            size = ctx.shape(x)[ch]
            picked = ctx.select(space, [int(i) % size for i in ctx.const(idx)], node.output[0], ch)
        if picked is None:
            return ctx.unsupported_op(node, "gathers along the channel axis")
        return [picked]
    idx_rank = ctx.rank(idx) or 0
    new = ch if axis > ch else ch - 1 + idx_rank
    return [_moved(ctx, node, space, new)]
