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

from onnxzip.graph.spaces import GroupSpace, HeadsOnly, HeadSpace
from onnxzip.ops.axes import map_axis

__all__ = [
    "split_heads", "merge_heads", "move_heads", "map_heads", "attention_matmul", "transpose_heads", "set_head_axis",
    "carry_head_axis",
]


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


def merge_heads(ctx, node, space: HeadSpace, in_shape, out_shape):
    """Reshape [..., H, D/H, ...] -> [..., D, ...] (head axis right before the within-head axis)."""
    x = node.input[0]
    head, dim = ctx.head_axis_of.get(x), ctx.feature_axis(x)
    if head is None or dim != head + 1:
        return None
    inner = int(np.prod(in_shape[dim + 1:], dtype=np.int64))
    for k in range(len(out_shape)):
        if out_shape[k] == space.size and int(np.prod(out_shape[k + 1:], dtype=np.int64)) == inner:
            return [GroupSpace(space.gid, space.size, node.output[0], k)]
    return None


def map_heads(ctx, x: str, in_shape, out_shape, heads: int):
    """Where ``x``'s head axis goes through a row-major reshape: (output axis, its fold), or None
    when the heads are split or mixed with what follows them. The head axis is seen as two axes,
    its fold and the heads, so folds come and go ([B, H, L, d] <-> [B*H, L, d])."""
    head, fold = ctx.head_axis_of[x], ctx.head_fold_of.get(x, 1)
    if in_shape[head] != fold * heads:
        return None
    virtual = list(in_shape[:head]) + [fold, heads] + list(in_shape[head + 1:])
    found = map_axis(virtual, out_shape, head + 1)
    if found is None or found[2] != 1:
        return None
    return found[0], found[1]


def move_heads(ctx, node, space: HeadSpace, in_shape, out_shape):
    """A Reshape that keeps the within-head axis whole and the head axis whole (a no-op reshape, or
    batch and heads folded into one axis as the dynamo exporter spells attention); None otherwise."""

    x, out = node.input[0], node.output[0]
    head, dim = ctx.head_axis_of.get(x), ctx.feature_axis(x)
    if head is None or dim is None:
        return None
    fold = ctx.head_fold_of.get(x, 1)
    virtual = list(in_shape[:head]) + [fold, space.heads] + list(in_shape[head + 1:])
    found_dim = map_axis(virtual, out_shape, dim + 1 if dim > head else dim) if in_shape[head] == fold * space.heads else None
    found_head = map_heads(ctx, x, in_shape, out_shape, space.heads)
    if found_dim is None or found_head is None or found_dim[1:] != (1, 1):
        return None
    if found_head[0] == found_dim[0]:
        return None
    ctx.set_axis(out, found_dim[0])
    set_head_axis(ctx, out, *found_head)
    return [space]


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
    if ha is None or ha != hb or ha >= ra - 2 or ctx.head_fold_of.get(a, 1) != ctx.head_fold_of.get(b, 1):
        return None
    if isinstance(sa, HeadSpace) and isinstance(sb, HeadSpace):
        if ctx.feature_axis(a) != ra - 1 or ctx.feature_axis(b) != rb - 2 or (sa.size, sa.heads) != (sb.size, sb.heads):
            return None
        g = ctx.union([GroupSpace(sa.gid, sa.size, a, ra - 1), GroupSpace(sb.gid, sb.size, b, rb - 2)], out, ha)
        ctx.set_axis(out, ha)
        carry_head_axis(ctx, a, out, ha)
        return [HeadsOnly(g.gid, sa.heads)]
    if isinstance(sa, HeadsOnly) and isinstance(sb, HeadSpace):
        if ctx.feature_axis(b) != rb - 1 or sa.heads != sb.heads:
            return None
        ctx.tie_heads(sa.gid, sb.gid)
        ctx.set_axis(out, rb - 1)
        carry_head_axis(ctx, b, out, hb)
        return [HeadSpace(sb.gid, sb.size, sb.heads)]
    return None
