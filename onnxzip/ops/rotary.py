"""Rotary position embeddings (RoPE) on attention heads, as Hugging Face models export them.

``q * cos + rotate_half(q) * sin``, with ``rotate_half(x) = Concat(-x[..., d/2:], x[..., :d/2])``
on each head's channels, and cos/sin tables indexed by position and by channel within a head
(one frequency per pair of channels i and i + d/2). The tables are shared by every head and by q
and k, so the merge must commute with the rotation: channel i of a head may only meet channel i of
another head (the same frequency), while whole heads are paired and merged as usual. The builder
marks such groups ``rotary`` (:meth:`BuildContext.fix_within_heads`); the matcher then pairs heads
and keeps channels in place within them (``onnxzip.merge.head_merges``).
"""

from __future__ import annotations

import numpy as np

from onnxzip.graph.spaces import GroupSpace, HeadPart, HeadSpace, SelectSpace, channel_sources
from onnxzip.ops.attention import carry_head_axis

__all__ = ["slice_within_heads", "split_within_heads", "join_within_heads", "within_head_constant"]


def slice_within_heads(ctx, node, space, index: list | None = None):
    """A Slice of the within-head axis (rotate_half's halves, a partial rotary's rotated channels
    and the rest): a :class:`HeadPart`, and the group's channels stay in place within heads; None
    for any other Slice. ``index``: the channels it keeps, when its bounds are known."""
    x, out = node.input[0], node.output[0]
    axis, head = ctx.feature_axis(x), ctx.head_axis_of.get(x)
    in_shape, out_shape = ctx.shape(x), ctx.shape(out)
    if head is None or in_shape is None or out_shape is None or in_shape[axis] != _width(space):
        return None
    if not 0 < out_shape[axis] < in_shape[axis] or any(a != b for k, (a, b) in enumerate(zip(in_shape, out_shape)) if k != axis):
        return None
    ctx.fix_within_heads(space.gid)
    _note_cut(ctx, space, index)
    ctx.set_axis(out, axis)
    carry_head_axis(ctx, x, out, head)
    return [_part(space, out_shape[axis])]


def _note_cut(ctx, space, index) -> None:
    """Record which channels of a whole head a cut keeps (rotate_half keeps [0, d/2) and [d/2, d):
    channel i and i + d/2 then turn together, see :meth:`BuildContext.note_rotary_cut`)."""
    d = space.size // space.heads
    whole = isinstance(space, HeadSpace)
    ctx.note_rotary_cut(space.gid, (0, d // 2) if whole and index == list(range(d // 2)) else
                        (d // 2, d) if whole and index == list(range(d // 2, d)) else None)


def split_within_heads(ctx, node, space):
    """A Split of the within-head axis: one :class:`HeadPart` per output; None if ``node`` splits
    another axis or the input is not head-structured."""
    x = node.input[0]
    axis, head = ctx.feature_axis(x), ctx.head_axis_of.get(x)
    if head is None or ctx.attr(node, "axis", 0) % ctx.rank(x) != axis:
        return None
    ctx.fix_within_heads(space.gid)
    outs, start = [], 0
    for o in node.output:
        width = ctx.shape(o)[axis]
        _note_cut(ctx, space, list(range(start, start + width)))
        start += width
        ctx.set_axis(o, axis)
        carry_head_axis(ctx, x, o, head)
        outs.append(_part(space, ctx.shape(o)[axis]))
    return outs


def _width(space) -> int:
    return space.width if isinstance(space, HeadPart) else space.size // space.heads


def _part(space, width: int):
    if width == space.size // space.heads:
        return HeadSpace(space.gid, space.size, space.heads)
    return HeadPart(space.gid, space.size, space.heads, width)


def join_within_heads(ctx, node, names: list[str], spaces: list, axis: int):
    """Concat on the within-head axis of parts of the same heads (rotate_half's swapped halves, a
    partial rotary's rotated channels and the rest); None otherwise."""
    if len(spaces) == 2 and all(isinstance(s, SelectSpace) for s in spaces):
        return _swap_group_halves(ctx, node, spaces, axis)
    if not all(isinstance(s, (HeadPart, HeadSpace)) for s in spaces) or not any(isinstance(s, HeadPart) for s in spaces):
        return None
    first = spaces[0]
    if any(ctx.find(s.gid) != ctx.find(first.gid) or (s.size, s.heads) != (first.size, first.heads) for s in spaces):
        return None
    heads = {ctx.head_axis_of.get(n) for n in names}
    if len(heads) != 1 or None in heads or len({ctx.head_fold_of.get(n, 1) for n in names}) != 1:
        return None
    if any(ctx.feature_axis(n) != axis for n in names):
        return None
    width = sum(_width(s) for s in spaces)
    if width > first.size // first.heads:
        return None
    ctx.fix_within_heads(first.gid)
    out = node.output[0]
    ctx.set_axis(out, axis)
    carry_head_axis(ctx, names[0], out, heads.pop())
    return [_part(first, width)]


def _swap_group_halves(ctx, node, spaces: list, axis: int):
    """rotate_half of one key head that is a whole group (multi-query attention): the group's second
    half of channels, then its first half. The channels of a rotary group stay in place, so the
    swap commutes with the merge: the output is the group."""
    a, b = spaces
    part = a.part
    if not isinstance(part, GroupSpace) or b.part != part or part.size % 2:
        return None
    half = part.size // 2
    if a.index != tuple(range(half, part.size)) or b.index != tuple(range(half)):
        return None
    ctx.fix_within_heads(part.gid)
    return [GroupSpace(part.gid, part.size, node.output[0], axis)]


def within_head_constant(ctx, features: str, space, const_shape, out_rank: int) -> bool:
    """A constant operand (cos or sin table) that varies along the within-head axis and is the same
    for every head: allowed, and the group's channels keep their place within heads."""
    sources = channel_sources(space)
    if sources is not None:
        # one key head (multi-query attention), or its halves swapped (rotate_half): the whole
        # group is one head, its channels stay in place
        gids = {g for g, _ in sources}
        axis = ctx.feature_axis(features)
        pos = axis + out_rank - (ctx.rank(features) or 0) - (out_rank - len(const_shape)) if axis is not None else -1
        if len(gids) != 1 or pos < 0 or const_shape[pos] != space.size or int(np.prod(const_shape, dtype=np.int64)) == 0:
            return False
        ctx.fix_within_heads(gids.pop())
        return True
    if not isinstance(space, (HeadSpace, HeadPart)):
        return False
    axis, head = ctx.feature_axis(features), ctx.head_axis_of.get(features)
    if head is None:
        return False
    shift = out_rank - (ctx.rank(features) or 0)
    pos, hpos = axis + shift - (out_rank - len(const_shape)), head + shift - (out_rank - len(const_shape))
    width = _width(space)
    if pos < 0 or const_shape[pos] != width or (hpos >= 0 and const_shape[hpos] != 1):
        return False
    if int(np.prod(const_shape, dtype=np.int64)) == 0:
        return False
    ctx.fix_within_heads(space.gid)
    return True
