"""Multi-head attention: the head split, the score and context MatMuls between activations.

A projection's output group (q, k or v) is split by a Reshape into a head axis and a within-head
axis (:class:`HeadSpace`). The head axis may hold the samples (or other positions) folded in
front of the heads, as the dynamo exporter and ``nn.MultiheadAttention`` spell batched attention
(``[batch * heads, tokens, d]``): the builder records that outer factor as the tensor's head
fold (``head_fold_of``, 1 when absent); the head index is the axis index modulo the heads.

The score MatMul ``q @ k^T`` contracts q's and k's within-head axes, so q and k share one group;
its output keeps only a head axis (:class:`HeadsOnly`). The context MatMul ``weights @ v`` ties
v's heads to the scores' heads: q, k and v share one assignment of heads, and v's group
continues, through the head merge, into the output projection.
"""

from __future__ import annotations

import numpy as np

from onnxzip.graph.spaces import ConcatSpace, GroupSpace, HeadsOnly, HeadSpace, RepeatSpace
from onnxzip.ops.axes import map_axis

__all__ = [
    "split_heads", "merge_heads", "move_heads", "map_heads", "attention_matmul", "transpose_heads", "set_head_axis",
    "carry_head_axis", "repeat_heads", "head_count", "head_concat",
]


def head_count(space) -> int:
    """The heads on a head-structured tensor's head axis (a repeat's, all of them; a per-head
    concatenation's, those of its parts)."""
    if isinstance(space, RepeatSpace):
        return space.heads * space.repeats
    if isinstance(space, ConcatSpace):
        return space.parts[0].heads
    return space.heads


def head_concat(spaces) -> bool:
    """Parts of several head-structured groups side by side in each head (a partial rotary whose
    rotated and passed channels are separate layers): a :class:`ConcatSpace` of HeadSpaces with
    one number of heads."""
    parts = list(spaces)
    return bool(parts) and all(isinstance(p, HeadSpace) for p in parts) and len({p.heads for p in parts}) == 1


def set_head_axis(ctx, out: str, axis: int, fold: int = 1) -> None:
    """Record ``out``'s head axis and the outer factor folded into it."""
    ctx.head_axis_of[out] = axis
    if fold != 1:
        ctx.head_fold_of[out] = fold
    else:
        ctx.head_fold_of.pop(out, None)


def carry_head_axis(ctx, src: str, out: str, axis: int) -> None:
    """``out``'s head axis is ``axis`` and holds what ``src``'s head axis held."""
    set_head_axis(ctx, out, axis, ctx.head_fold_of.get(src, 1))


def split_heads(ctx, node, space: GroupSpace, in_shape, out_shape, axis: int):
    """Reshape [..., D, ...] -> [..., H, D/H, ...], or [..., F*H, D/H, ...] with F outer positions
    (samples) folded in front of the heads; None if the channels are not split that way."""
    d = in_shape[axis]
    inner = int(np.prod(in_shape[axis + 1:], dtype=np.int64))
    known = ctx.group_heads.get(ctx.find(space.gid))
    candidates = []
    for k in range(len(out_shape) - 1):
        size = out_shape[k + 1]
        if size <= 1 or d % size or int(np.prod(out_shape[k + 2:], dtype=np.int64)) != inner:
            continue
        heads = d // size
        if heads > 1 and out_shape[k] % heads == 0 and known in (None, heads):
            candidates.append((out_shape[k] // heads, k, heads))
    if not candidates:
        return None
    fold, k, heads = min(candidates)  # heads alone on their axis when the reshape allows it
    if not ctx.set_heads(space.gid, heads):
        return None
    out = node.output[0]
    ctx.set_axis(out, k + 1)
    set_head_axis(ctx, out, k, fold)
    return [HeadSpace(space.gid, d, heads)]


def merge_heads(ctx, node, space, in_shape, out_shape):
    """Reshape [..., H, D/H, ...] -> [..., D, ...] (head axis right before the within-head axis);
    the heads of a :class:`RepeatSpace` join into a repeat of its group."""
    x = node.input[0]
    head, dim = ctx.head_axis_of.get(x), ctx.feature_axis(x)
    if head is None or dim != head + 1:
        return None
    inner = int(np.prod(in_shape[dim + 1:], dtype=np.int64))
    for k in range(len(out_shape)):
        if out_shape[k] == space.size and int(np.prod(out_shape[k + 1:], dtype=np.int64)) == inner:
            if isinstance(space, RepeatSpace):
                ctx.set_axis(node.output[0], k)
                part = GroupSpace(space.part.gid, space.part.size, node.output[0], k)
                return [RepeatSpace(part, space.heads, space.repeats, space.size)]
            return [GroupSpace(space.gid, space.size, node.output[0], k)]
    return None


def map_heads(ctx, x: str, in_shape, out_shape, heads: int):
    """Where ``x``'s head axis goes through a row-major reshape: (output axis, its fold), or None
    when the heads are split or mixed with what follows them. The head axis is seen as two axes,
    its fold and the heads, so folds come and go ([B, H, L, d] <-> [B*H, L, d])."""
    found = _map_head_axes(in_shape, out_shape, ctx.head_axis_of[x], None, ctx.head_fold_of.get(x, 1), heads)
    return None if found is None else found[0]


def _map_head_axes(in_shape, out_shape, head: int, dim: int | None, fold: int, heads: int):
    """((head axis, fold), within-head axis) after a row-major reshape of a tensor whose axis
    ``head`` holds ``fold`` x ``heads`` entries; None when the heads or a head's channels are cut
    or the two end up on one axis."""
    if in_shape[head] != fold * heads:
        return None
    virtual = list(in_shape[:head]) + [fold, heads] + list(in_shape[head + 1:])
    found_head = map_axis(virtual, out_shape, head + 1)
    if found_head is None or found_head[2] != 1:
        return None
    if dim is None:
        return (found_head[0], found_head[1]), None
    found_dim = map_axis(virtual, out_shape, dim + 1 if dim > head else dim)
    if found_dim is None or found_dim[1:] != (1, 1) or found_dim[0] == found_head[0]:
        return None
    return (found_head[0], found_head[1]), found_dim[0]


def move_heads(ctx, node, space, in_shape, out_shape):
    """A Reshape that keeps the within-head axis whole and the head axis whole (a no-op reshape, or
    batch and heads folded into one axis as the dynamo exporter spells attention); None otherwise."""

    x, out = node.input[0], node.output[0]
    head, dim = ctx.head_axis_of.get(x), ctx.feature_axis(x)
    if head is None or dim is None:
        return None
    found = _map_head_axes(in_shape, out_shape, head, dim, ctx.head_fold_of.get(x, 1), head_count(space))
    if found is None:
        return None
    ctx.set_axis(out, found[1])
    set_head_axis(ctx, out, *found[0])
    return [space]


def repeat_heads(ctx, node, space: HeadSpace, in_shape, out_shape):
    """Grouped-query attention's repeat of key/value heads ("repeat_kv"): ``[.., H_kv, r, L, d]``,
    an Expand of a unit axis right after the heads, reshaped into ``[.., H_kv * r, L, d]``; a
    :class:`RepeatSpace` of the heads, or None for any other reshape."""
    x, out = node.input[0], node.output[0]
    head, dim = ctx.head_axis_of.get(x), ctx.feature_axis(x)
    if head is None or dim is None or ctx.head_fold_of.get(x, 1) != 1 or head + 1 in (dim, len(in_shape)):
        return None
    repeats = in_shape[head + 1]
    producer = ctx.producer.get(x)
    if repeats <= 1 or producer is None or producer.op_type not in ("Expand", "Tile"):
        return None
    before = ctx.shape(producer.input[0])
    if before is None or len(before) != len(in_shape) or before[head + 1] != 1:
        return None
    joined = list(in_shape[:head]) + [space.heads * repeats] + list(in_shape[head + 2:])
    found = _map_head_axes(joined, out_shape, head, dim - 1 if dim > head else dim, 1, space.heads * repeats)
    if found is None:
        return None
    ctx.set_axis(out, found[1])
    set_head_axis(ctx, out, *found[0])
    return [RepeatSpace(space, space.heads, repeats, space.size * repeats)]


def transpose_heads(ctx, node, space, perm):
    x, out = node.input[0], node.output[0]
    ctx.set_axis(out, perm.index(ctx.feature_axis(x)))
    carry_head_axis(ctx, x, out, perm.index(ctx.head_axis_of[x]))
    return [space]


def attention_matmul(ctx, node):
    """Score (q @ k^T) and context (weights @ v) MatMuls; None for any other MatMul of activations."""
    a, b = node.input[0], node.input[1]
    sa, sb = ctx.space(a), ctx.space(b)
    ra, rb, out = ctx.rank(a), ctx.rank(b), node.output[0]
    if ra is None or ra != rb or ra < 3:
        return None
    ha, hb = ctx.head_axis_of.get(a), ctx.head_axis_of.get(b)
    if isinstance(sb, GroupSpace) and ha is not None and ha < ra - 2:
        return _single_kv_head(ctx, node, sa, sb, ha)
    if ha is None or ha != hb or ha >= ra - 2 or ctx.head_fold_of.get(a, 1) != ctx.head_fold_of.get(b, 1):
        return None
    if isinstance(sa, HeadSpace) and isinstance(sb, HeadSpace):
        if ctx.feature_axis(a) != ra - 1 or ctx.feature_axis(b) != rb - 2 or (sa.size, sa.heads) != (sb.size, sb.heads):
            return None
        g = ctx.union([GroupSpace(sa.gid, sa.size, a, ra - 1), GroupSpace(sb.gid, sb.size, b, rb - 2)], out, ha)
        ctx.set_axis(out, ha)
        carry_head_axis(ctx, a, out, ha)
        return [HeadsOnly(g.gid, sa.heads)]
    if isinstance(sa, ConcatSpace) and isinstance(sb, ConcatSpace) and head_concat(sa.parts) and head_concat(sb.parts):
        # q and k each several groups side by side in every head: part i of q meets part i of k
        pairs = list(zip(sa.parts, sb.parts))
        if ctx.feature_axis(a) != ra - 1 or ctx.feature_axis(b) != rb - 2 or len(sa.parts) != len(sb.parts):
            return None
        if any((p.size, p.heads) != (q.size, q.heads) for p, q in pairs):
            return None
        joined = [ctx.union([GroupSpace(p.gid, p.size, a, ra - 1), GroupSpace(q.gid, q.size, b, rb - 2)], out, ha)
                  for p, q in pairs]
        for g in joined[1:]:
            ctx.tie_heads(joined[0].gid, g.gid)
        ctx.set_axis(out, ha)
        carry_head_axis(ctx, a, out, ha)
        return [HeadsOnly(joined[0].gid, head_count(sa))]
    if isinstance(sa, HeadSpace) and isinstance(sb, RepeatSpace) and isinstance(sb.part, HeadSpace):
        # grouped-query scores: every key head meets ``repeats`` query heads
        if ctx.feature_axis(a) != ra - 1 or ctx.feature_axis(b) != rb - 2 or sa.size != sb.size:
            return None
        if sa.heads != head_count(sb) or not ctx.repeat_heads(sa.gid, sb.part.gid, sb.repeats):
            return None
        ctx.set_axis(out, ha)
        carry_head_axis(ctx, a, out, ha)
        return [HeadsOnly(sa.gid, sa.heads)]
    if isinstance(sa, HeadsOnly) and isinstance(sb, RepeatSpace) and isinstance(sb.part, HeadSpace):
        # grouped-query context: the value heads, repeated, follow the key heads' assignment
        source = ctx.repeats.get(ctx.find(sa.gid))
        if ctx.feature_axis(b) != rb - 1 or source is None or source[1] != sb.repeats or sa.heads != head_count(sb):
            return None
        ctx.tie_heads(source[0], sb.part.gid)
        ctx.set_axis(out, rb - 1)
        carry_head_axis(ctx, b, out, hb)
        return [sb]
    if isinstance(sa, HeadsOnly) and isinstance(sb, HeadSpace):
        if ctx.feature_axis(b) != rb - 1 or sa.heads != sb.heads:
            return None
        ctx.tie_heads(sa.gid, sb.gid)
        ctx.set_axis(out, rb - 1)
        carry_head_axis(ctx, b, out, hb)
        return [HeadSpace(sb.gid, sb.size, sb.heads)]
    return None


def _single_kv_head(ctx, node, sa, sb: GroupSpace, ha: int):
    """Multi-query attention (one key/value head): the keys or values are a plain group of one
    head's channels, on an axis of size 1 or repeated to the queries' heads; the queries repeat
    the keys' group ``heads`` times. None for any other MatMul."""
    a, b, out = node.input[0], node.input[1], node.output[0]
    rank = ctx.rank(b)
    b_shape = ctx.shape(b)
    if ctx.head_fold_of.get(a, 1) != 1 or b_shape is None:
        return None
    if isinstance(sa, HeadSpace):
        heads = sa.heads
        if ctx.feature_axis(a) != rank - 1 or sb.axis != rank - 2 or sb.size * heads != sa.size:
            return None
        if b_shape[ha] not in (1, heads) or not ctx.repeat_heads(sa.gid, sb.gid, heads):
            return None
        ctx.set_axis(out, ha)
        carry_head_axis(ctx, a, out, ha)
        return [HeadsOnly(sa.gid, heads)]
    if isinstance(sa, HeadsOnly):
        source = ctx.repeats.get(ctx.find(sa.gid))
        if sb.axis != rank - 1 or source is None or source[1] != sa.heads or b_shape[ha] not in (1, sa.heads):
            return None
        if ctx.group_heads.get(ctx.find(source[0]), 1) != 1:
            return None
        ctx.set_axis(out, rank - 1)
        set_head_axis(ctx, out, ha)
        return [RepeatSpace(HeadSpace(sb.gid, sb.size, 1), 1, sa.heads, sb.size * sa.heads)]
    return None
