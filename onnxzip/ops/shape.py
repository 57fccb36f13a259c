"""Ops that move, pool, reshape or join tensors: where the channel axis goes."""

from __future__ import annotations

from onnxzip.graph.layergraph import Layer
from onnxzip.graph.spaces import (
    Blocked, ConcatSpace, ExpandSpace, GroupSpace, HeadPart, HeadsOnly, HeadSpace, InputSpace, NoFeatures, RepeatSpace,
    StackSpace,
)
from onnxzip.ops.axes import map_axis, slice_bounds
from onnxzip.ops.attention import (
    carry_head_axis, head_concat, map_heads, merge_heads, move_heads, repeat_heads, set_head_axis, split_heads,
    transpose_heads,
)
from onnxzip.ops.registry import register
from onnxzip.ops.rotary import join_within_heads, slice_within_heads, split_within_heads
from onnxzip.ops.stack import (
    gather_stack, reshape_stack, slice_stack, split_stack, squeeze_axis_map, stack_parts, transpose_stack, unit_axis_map,
)


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


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
@on_features
def reshape(ctx, node, x, space):
    in_shape, out_shape = ctx.shape(x), ctx.shape(node.output[0])
    axis = ctx.feature_axis(x)
    if isinstance(space, StackSpace):
        where = _axis_map(ctx, node, in_shape, out_shape)
        out = reshape_stack(ctx, node, space, where) if where is not None else None
        return [out] if out is not None else ctx.unsupported_op(node, "reshapes stacked q/k/v parts in an unknown way")
    if isinstance(space, HeadSpace) or (isinstance(space, (RepeatSpace, ConcatSpace)) and x in ctx.head_axis_of):
        merged = None if isinstance(space, ConcatSpace) else merge_heads(ctx, node, space, in_shape, out_shape)
        merged = merged or move_heads(ctx, node, space, in_shape, out_shape)
        if merged is None:
            merged = _move_heads(ctx, node, space, _axis_map(ctx, node, in_shape, out_shape))
        if merged is None and isinstance(space, HeadSpace):
            merged = repeat_heads(ctx, node, space, in_shape, out_shape)
        if merged is not None:
            return merged
        producer = ctx.producer.get(x)
        if producer is not None and producer.op_type in ("Expand", "Tile"):
            return ctx.unsupported_op(node, "repeats key/value heads (grouped-query attention) in an unknown way")
        return ctx.unsupported_op(node, "reshapes attention heads in an unknown way")
    if isinstance(space, HeadsOnly):
        found = map_heads(ctx, x, in_shape, out_shape, space.heads)
        if found is None:
            return ctx.unsupported_op(node, "reshapes attention scores across heads")
        set_head_axis(ctx, node.output[0], *found)
        return [_moved(ctx, node, space, found[0])]
    found = map_axis(in_shape, out_shape, axis) if in_shape and out_shape is not None else None
    if found is None and isinstance(space, ConcatSpace):
        stacked = stack_parts(ctx, node, space, in_shape, out_shape, axis)
        if stacked is not None:
            return [stacked]
    if found is None and isinstance(space, GroupSpace):
        heads = split_heads(ctx, node, space, in_shape, out_shape, axis)
        if heads is not None:
            return heads
    if found is None and isinstance(space, ExpandSpace):
        unflattened = _unflatten(ctx, node, space, in_shape, out_shape, axis)
        if unflattened is not None:
            return [unflattened]
    if found is None:
        return ctx.unsupported_op(node, f"{node.op_type} {list(in_shape)} -> {list(out_shape)} splits the channel axis")
    k, outer, inner = found
    if outer == 1 and inner == 1:
        return [_moved(ctx, node, space, k)]
    expanded = ExpandSpace(space, outer, inner, outer * space.size * inner)
    ctx.set_axis(node.output[0], k)
    return [expanded]


def _unflatten(ctx, node, space: ExpandSpace, in_shape, out_shape, axis):
    """A flattened axis (outer x C x inner entries) reshaped so that the channels get an axis of
    their own again, or stay whole inside another flattened axis; None if they are split."""
    virtual = list(in_shape[:axis]) + [space.outer, space.part.size, space.inner] + list(in_shape[axis + 1:])
    found = map_axis(virtual, out_shape, axis + 1)
    if found is None:
        return None
    k, outer, inner = found
    if outer == 1 and inner == 1:
        return _moved(ctx, node, space.part, k)
    ctx.set_axis(node.output[0], k)
    return ExpandSpace(space.part, outer, inner, outer * space.part.size * inner)


def _axis_map(ctx, node, in_shape, out_shape) -> list | None:
    """Each input axis's output axis for a Squeeze/Unsqueeze, or a Reshape that only adds or
    drops axes of size 1; None otherwise."""
    if node.op_type in ("Squeeze", "Unsqueeze"):
        axes = ctx.attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            if not ctx.is_const(node.input[1]):
                return None
            axes = ctx.const(node.input[1]).reshape(-1).tolist()
        if axes is None:
            if node.op_type == "Unsqueeze":
                return None
            axes = [k for k, d in enumerate(in_shape) if d == 1]
        return squeeze_axis_map(len(in_shape), list(axes), node.op_type == "Unsqueeze")
    return unit_axis_map(tuple(in_shape), tuple(out_shape))


def _move_heads(ctx, node, space: HeadSpace, where):
    """A head-structured tensor reshaped only by axes of size 1 (e.g. [B*H, L, d] <-> [B, H, L, d]
    at one sample): head and within-head axes move."""
    x, out = node.input[0], node.output[0]
    if where is None:
        return None
    head, dim = where[ctx.head_axis_of[x]], where[ctx.feature_axis(x)]
    if head is None or dim is None:
        return None
    ctx.set_axis(out, dim)
    carry_head_axis(ctx, x, out, head)
    return [space]


@register("Transpose")
@on_features
def transpose(ctx, node, x, space):
    rank = ctx.rank(x)
    perm = list(ctx.attr(node, "perm", list(range(rank))[::-1]))
    if isinstance(space, StackSpace):
        return [transpose_stack(ctx, node, space, perm)]
    if isinstance(space, (HeadSpace, HeadsOnly)) or (isinstance(space, (RepeatSpace, ConcatSpace)) and x in ctx.head_axis_of):
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
        halves = join_within_heads(ctx, node, names, spaces, axis)
        if halves is not None:
            return halves
        if len(feats) != len(names):
            return ctx.unsupported_op(node, "concatenates features with model inputs or constants along channels")
        parts = tuple(s for _, s in feats)
        if len(parts) == 1:  # a Concat of one tensor (torch.cat of a one-element list) is a copy
            return [_moved(ctx, node, parts[0], ch)]
        space = ConcatSpace(parts, sum(p.size for p in parts))
        ctx.set_axis(out, ch)
        if head_concat(parts):  # groups side by side in each head: the heads stay on their axis
            heads = {(ctx.head_axis_of.get(n), ctx.head_fold_of.get(n, 1)) for n, _ in feats}
            head, fold = heads.pop() if len(heads) == 1 else (None, 1)
            if head is None:
                return ctx.unsupported_op(node, "joins attention heads on different axes")
            set_head_axis(ctx, out, head, fold)
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
        if len(node.input) < 2 or ctx.is_feature(ctx.space(node.input[1])):
            return ctx.unsupported_op(node, "pads computed from features")
        if not ctx.is_const(node.input[1]):
            # pads computed from shapes (Swin pads to whole windows): the channels must keep their count
            axis = ctx.feature_axis(x)
            if ctx.shape(node.output[0])[axis] != ctx.shape(x)[axis]:
                return ctx.unsupported_op(node, "pads the channel axis")
            return [_moved(ctx, node, space, axis)]
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
    """Slice or Tile along other axes: the channels pass through when their count is unchanged."""
    if isinstance(space, StackSpace) and node.op_type == "Slice":
        out = slice_stack(ctx, node, space)
        return [out] if out is not None else ctx.unsupported_op(node, "slices stacked q/k/v parts in an unknown way")
    if isinstance(space, ConcatSpace) and node.op_type == "Slice":
        start = _slice_start(ctx, node, ctx.feature_axis(x))
        if start is not None:
            width = ctx.shape(node.output[0])[ctx.feature_axis(x)]
            outs = _cut_parts(ctx, node, space, [start, width], ["", node.output[0]])
            if outs is not None:
                return outs[1:]
    axis = ctx.feature_axis(x)
    if ctx.shape(node.output[0])[axis] != ctx.shape(x)[axis]:
        half = None
        if node.op_type == "Slice" and isinstance(space, (HeadSpace, HeadPart)):
            half = slice_within_heads(ctx, node, space, _sliced_channels(ctx, node, axis))
        if half is not None:
            return half
        # a Slice of the channel axis with constant bounds selects channels (see :func:`split`)
        index = _sliced_channels(ctx, node, axis) if node.op_type == "Slice" else None
        picked = ctx.select(space, index, node.output[0], axis) if index is not None else None
        if picked is None:
            return ctx.unsupported_op(node, f"{node.op_type} changes the channel axis")
        return [picked]
    return [_moved(ctx, node, space, axis)]


def _cut_parts(ctx, node, space: ConcatSpace, widths: list[int], outputs: list[str]):
    """Consecutive channel ranges of ``widths`` of a concatenation, each made of whole parts (a
    fused projection cut by Split or Slice on its channels): each range's parts, or None."""
    axis = ctx.feature_axis(node.input[0])
    parts, outs, k = list(space.parts), [], 0
    for width, out in zip(widths, outputs):
        taken, size = [], 0
        while size < width and k < len(parts):
            taken.append(parts[k])
            size += parts[k].size
            k += 1
        if size != width:
            return None
        if not taken:
            outs.append(NoFeatures())
        elif len(taken) == 1 and isinstance(taken[0], GroupSpace):
            outs.append(GroupSpace(taken[0].gid, taken[0].size, out, axis))
        else:
            ctx.set_axis(out, axis)
            outs.append(ConcatSpace(tuple(taken), size))
    return outs


def _slice_bounds(ctx, node, axis: int):
    """(start, end, step) of a Slice along ``axis`` with bounds known at build time (constants or
    computed from shapes); None when they are not, or the Slice leaves ``axis`` whole."""
    names = [node.input[k] if len(node.input) > k else "" for k in range(1, 5)]
    values = [ctx.int_value(n) if n else None for n in names]
    if values[0] is None or values[1] is None or any(n and v is None for n, v in zip(names[2:], values[2:])):
        return None
    return slice_bounds(values, ctx.rank(node.input[0]), axis)


def _slice_start(ctx, node, axis: int) -> int | None:
    """Where a Slice with bounds known at build time and step 1 starts on ``axis`` (None if it
    does not cut that axis that way); the width comes from the output's shape."""
    bounds = _slice_bounds(ctx, node, axis)
    if bounds is None or bounds[2] != 1:
        return None
    size = ctx.shape(node.input[0])[axis]
    start = bounds[0]
    return max(0, min(size, start + size if start < 0 else start))


def _sliced_channels(ctx, node, axis):
    """The channels a Slice keeps along ``axis`` (bounds known at build time), else None."""
    bounds = _slice_bounds(ctx, node, axis)
    return None if bounds is None else list(range(ctx.shape(node.input[0])[axis]))[slice(*bounds)]


@register("Split")
@on_features
def split(ctx, node, x, space):
    rank = ctx.rank(x)
    if isinstance(space, StackSpace):
        outs = split_stack(ctx, node, space)
        return outs if outs is not None else ctx.unsupported_op(node, "splits stacked q/k/v parts in an unknown way")
    if isinstance(space, ConcatSpace) and ctx.attr(node, "axis", 0) % ctx.rank(x) == ctx.feature_axis(x):
        outs = _cut_parts(ctx, node, space, [ctx.shape(o)[ctx.feature_axis(x)] for o in node.output], node.output)
        return outs if outs is not None else ctx.unsupported_op(node, "splits concatenated groups across a group")
    if isinstance(space, (HeadSpace, HeadPart)):
        parts = split_within_heads(ctx, node, space)
        if parts is not None:
            return parts
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
    if ctx.is_const(x) and not ctx.is_const(idx):
        embedded = embedding(ctx, node)
        if embedded is not None:
            return embedded
    if not ctx.is_feature(space):
        return _nonfeature(ctx, node)
    if isinstance(space, StackSpace):
        out = gather_stack(ctx, node, space)
        return [out] if out is not None else ctx.unsupported_op(node, "gathers stacked q/k/v parts in an unknown way")
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


def embedding(ctx, node):
    """A lookup table [rows, D] (an initializer) indexed by the model's inputs (token ids): a weight layer.

    Its output channels are the table's columns (axis 1), a new feature group; nothing is merged
    on its input (the indices are the same in every model). The residual stream of a language
    model starts where such groups are added. None when the Gather is not such a lookup (integer
    tables, other axes, indices carrying features, or indices that do not depend on the inputs'
    values: position and token-type lookups computed from shapes and constants are per-channel
    constants of the group they are added to, see :func:`constant_lookup`).
    """
    x, idx = node.input[0], node.input[1]
    if not _lookup_table(ctx, node) or not isinstance(ctx.space(idx), InputSpace):
        return None
    table = ctx.consts[x]
    out = node.output[0]
    rank = ctx.rank(out)
    out_space = ctx.new_group(int(table.dims[1]), out, rank - 1)
    ctx.add_layer(Layer(
        node=node.name, op_type="Gather", weight=x, bias=None, input=idx, output=out, in_space=InputSpace(),
        out_space=out_space, w_out_axis=1, w_in_axis=0, weight_shape=tuple(int(d) for d in table.dims),
    ))
    return [out_space]


_FLOAT_TYPES = (1, 10, 11, 16)  # float, float16, double, bfloat16


def _lookup_table(ctx, node) -> bool:
    """A Gather on axis 0 of a float [rows, D] initializer."""
    if node.op_type != "Gather" or not ctx.is_const(node.input[0]) or ctx.is_const(node.input[1]):
        return False
    table = ctx.consts[node.input[0]]
    return table.data_type in _FLOAT_TYPES and len(table.dims) == 2 and ctx.attr(node, "axis", 0) % 2 == 0


def constant_lookup(ctx, name: str, pos: int, space) -> bool:
    """``name`` (added to features at its axis ``pos``) is a lookup from a table whose indices do
    not depend on the inputs' values (position or token-type embeddings: a Gather indexed by
    positions computed from shapes and constants, maybe broadcast): record the table's columns as
    a per-channel parameter of ``space``, like an added initializer. The TorchScript exporter keeps
    such lookups where the dynamo exporter folds them into an initializer; both read the same."""
    if not isinstance(space, GroupSpace) or (ctx.shape(name) or ())[pos:pos + 1] != (space.size,):
        return False
    producer = ctx.producer.get(name)
    while producer is not None and producer.op_type in ("Expand", "Tile", "Cast", "Identity", "Unsqueeze"):
        producer = ctx.producer.get(producer.input[0])
    if producer is None or not _lookup_table(ctx, producer) or not isinstance(ctx.space(producer.input[1]), NoFeatures):
        return False
    if ctx.consts[producer.input[0]].dims[1] != space.size or (ctx.shape(producer.output[0]) or ())[-1:] != (space.size,):
        return False
    ctx.add_param(producer, 0, 1, space)
    return True
