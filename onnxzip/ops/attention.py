"""Multi-head attention: the head split, the score and context MatMuls between activations.

A projection's output group (q, k or v) is split by a Reshape into a head axis and a within-head
axis (:class:`HeadSpace`). The score MatMul ``q @ k^T`` contracts q's and k's within-head axes, so
q and k share one group; its output keeps only a head axis (:class:`HeadsOnly`). The context
MatMul ``weights @ v`` ties v's heads to the scores' heads: q, k and v share one assignment of
heads, and v's group continues, through the head merge, into the output projection.
"""

from __future__ import annotations

import numpy as np

from onnxzip.graph.spaces import GroupSpace, HeadsOnly, HeadSpace
from onnxzip.ops.axes import map_axis

__all__ = ["split_heads", "merge_heads", "move_heads", "attention_matmul", "transpose_heads"]


def split_heads(ctx, node, space: GroupSpace, in_shape, out_shape, axis: int):
    """Reshape [..., D, ...] -> [..., H, D/H, ...]; None if the channels are not split that way."""
    d = in_shape[axis]
    inner = int(np.prod(in_shape[axis + 1:], dtype=np.int64))
    for k in range(len(out_shape) - 1):
        heads, size = out_shape[k], out_shape[k + 1]
        if heads > 1 and size > 1 and heads * size == d and int(np.prod(out_shape[k + 2:], dtype=np.int64)) == inner:
            if not ctx.set_heads(space.gid, heads):
                return None
            out = node.output[0]
            ctx.set_axis(out, k + 1)
            ctx.head_axis_of[out] = k
            return [HeadSpace(space.gid, d, heads)]
    return None


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


def move_heads(ctx, node, space: HeadSpace, in_shape, out_shape):
    """A Reshape that keeps the within-head axis whole and the head axis whole (a no-op reshape, or
    batch and heads folded into one axis as the dynamo exporter spells attention); None otherwise."""

    x, out = node.input[0], node.output[0]
    head, dim = ctx.head_axis_of.get(x), ctx.feature_axis(x)
    if head is None or dim is None:
        return None
    found_dim, found_head = map_axis(in_shape, out_shape, dim), map_axis(in_shape, out_shape, head)
    if found_dim is None or found_head is None or found_dim[1:] != (1, 1) or found_head[2] != 1:
        return None
    if found_head[0] == found_dim[0]:
        return None
    ctx.set_axis(out, found_dim[0])
    ctx.head_axis_of[out] = found_head[0]
    return [space]


def transpose_heads(ctx, node, space, perm):
    x, out = node.input[0], node.output[0]
    ctx.set_axis(out, perm.index(ctx.feature_axis(x)))
    ctx.head_axis_of[out] = perm.index(ctx.head_axis_of[x])
    return [space]


def attention_matmul(ctx, node):
    """Score (q @ k^T) and context (weights @ v) MatMuls; None for any other MatMul of activations."""
    a, b = node.input[0], node.input[1]
    sa, sb = ctx.space(a), ctx.space(b)
    ra, rb, out = ctx.rank(a), ctx.rank(b), node.output[0]
    if ra is None or ra != rb or ra < 3:
        return None
    ha, hb = ctx.head_axis_of.get(a), ctx.head_axis_of.get(b)
    if ha is None or ha != hb or ha >= ra - 2:
        return None
    if isinstance(sa, HeadSpace) and isinstance(sb, HeadSpace):
        if ctx.feature_axis(a) != ra - 1 or ctx.feature_axis(b) != rb - 2 or (sa.size, sa.heads) != (sb.size, sb.heads):
            return None
        g = ctx.union([GroupSpace(sa.gid, sa.size, a, ra - 1), GroupSpace(sb.gid, sb.size, b, rb - 2)], out, ha)
        ctx.set_axis(out, ha)
        ctx.head_axis_of[out] = ha
        return [HeadsOnly(g.gid, sa.heads)]
    if isinstance(sa, HeadsOnly) and isinstance(sb, HeadSpace):
        if ctx.feature_axis(b) != rb - 1 or sa.heads != sb.heads:
            return None
        ctx.tie_heads(sa.gid, sb.gid)
        ctx.set_axis(out, rb - 1)
        ctx.head_axis_of[out] = hb
        return [HeadSpace(sb.gid, sb.size, sb.heads)]
    return None
