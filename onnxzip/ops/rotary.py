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

from onnxzip.graph.spaces import GroupSpace, HalfHeads, HeadSpace, SelectSpace, channel_sources
from onnxzip.ops.attention import carry_head_axis

__all__ = ["slice_half", "join_halves", "within_head_constant"]


def slice_half(ctx, node, space: HeadSpace):
    """Slice of each head's first or second half of channels; None for any other slice."""
    x, out = node.input[0], node.output[0]
    axis = ctx.feature_axis(x)
    head = ctx.head_axis_of.get(x)
    d = space.size // space.heads
    in_shape, out_shape = ctx.shape(x), ctx.shape(out)
    if head is None or in_shape is None or out_shape is None or in_shape[axis] != d or out_shape[axis] * 2 != d:
        return None
    if any(a != b for k, (a, b) in enumerate(zip(in_shape, out_shape)) if k != axis):
        return None
    # bounds are constants, or computed from the shape (``x.shape[-1] // 2``, as TorchScript exports
    # it): the head size is fixed, so the value the probe saw holds for every input
    names = [node.input[k] if len(node.input) > k and node.input[k] else None for k in range(1, 5)]
    values = [ctx.int_value(c) if c is not None else None for c in names]
    if any(c is not None and v is None for c, v in zip(names, values)) or values[0] is None:
        return None
    starts = values[0].reshape(-1).tolist()
    axes = values[2].reshape(-1).tolist() if values[2] is not None else list(range(len(starts)))
    steps = values[3].reshape(-1).tolist() if values[3] is not None else [1] * len(starts)
    rank = len(in_shape)
    found = [(s, st) for s, a, st in zip(starts, axes, steps) if int(a) % rank == axis]
    if len(found) != 1 or found[0][1] != 1:
        return None
    start = int(found[0][0])
    start = start + d if start < 0 else start
    if start not in (0, d // 2):
        return None
    ctx.fix_within_heads(space.gid)
    ctx.set_axis(out, axis)
    carry_head_axis(ctx, x, out, head)
    return [HalfHeads(space.gid, space.size, space.heads, start // (d // 2))]


def join_halves(ctx, node, names: list[str], spaces: list, axis: int):
    """Concat of the two halves of the same heads on the within-head axis (rotate_half); None
    otherwise."""
    if len(spaces) == 2 and all(isinstance(s, SelectSpace) for s in spaces):
        return _swap_group_halves(ctx, node, spaces, axis)
    if len(spaces) != 2 or not all(isinstance(s, HalfHeads) for s in spaces):
        return None
    a, b = spaces
    if ctx.find(a.gid) != ctx.find(b.gid) or {a.half, b.half} != {0, 1} or ctx.feature_axis(names[0]) != axis:
        return None
    heads = {ctx.head_axis_of.get(n) for n in names}
    if len(heads) != 1 or None in heads or len({ctx.head_fold_of.get(n, 1) for n in names}) != 1:
        return None
    out = node.output[0]
    ctx.set_axis(out, axis)
    carry_head_axis(ctx, names[0], out, heads.pop())
    return [HeadSpace(a.gid, a.size, a.heads)]


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
    if not isinstance(space, (HeadSpace, HalfHeads)):
        return False
    axis, head = ctx.feature_axis(features), ctx.head_axis_of.get(features)
    if head is None:
        return False
    shift = out_rank - (ctx.rank(features) or 0)
    pos, hpos = axis + shift - (out_rank - len(const_shape)), head + shift - (out_rank - len(const_shape))
    d = space.size // space.heads
    width = d if isinstance(space, HeadSpace) else d // 2
    if pos < 0 or const_shape[pos] != width or (hpos >= 0 and const_shape[hpos] != 1):
        return False
    if int(np.prod(const_shape, dtype=np.int64)) == 0:
        return False
    ctx.fix_within_heads(space.gid)
    return True
