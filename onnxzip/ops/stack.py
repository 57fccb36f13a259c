"""Cutting a concatenation of equal feature groups apart along an axis of its own.

A fused q/k/v projection (split into one layer per part by :mod:`onnxzip.fused`, joined by a
channel Concat) is reshaped by the exporters to ``[..., 3, D]`` or ``[..., 3, heads, D/heads]``,
moved about (Unsqueeze, Transpose, Squeeze) and cut with Gather, Split + Squeeze or Slice +
Squeeze ("unbind"). :class:`StackSpace` follows the part axis through these ops; picking one
index of it gives that part's group (a :class:`HeadSpace` when the heads were split too).
"""

from __future__ import annotations

import numpy as np

from onnxzip.graph.spaces import ConcatSpace, GroupSpace, HeadSpace, StackSpace

__all__ = ["stack_parts", "reshape_stack", "transpose_stack", "gather_stack", "slice_stack", "split_stack",
           "unit_axis_map", "squeeze_axis_map"]


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64)) if len(dims) else 1


def _axes_of(ctx, x: str) -> dict[str, int | None]:
    return {"stack": ctx.stack_axis_of.get(x), "head": ctx.head_axis_of.get(x), "channel": ctx.feature_axis(x)}


def _emit(ctx, out: str, space: StackSpace, axes: dict):
    """The space of ``out``: the stack, or its only part once the part axis is gone."""
    if axes["stack"] is None:
        if len(space.parts) != 1:
            return None
        part = space.parts[0]
        if space.heads > 1:
            ctx.set_axis(out, axes["channel"])
            ctx.head_axis_of[out] = axes["head"]
            return HeadSpace(part.gid, space.size, space.heads)
        return GroupSpace(part.gid, space.size, out, axes["channel"])
    ctx.stack_axis_of[out] = axes["stack"]
    ctx.set_axis(out, axes["channel"])
    if space.heads > 1:
        ctx.head_axis_of[out] = axes["head"]
    return space


def stack_parts(ctx, node, space: ConcatSpace, in_shape, out_shape, axis: int):
    """Reshape [..., k*D, ...] of k equal groups -> [..., k, D, ...] or [..., k, H, D/H, ...]."""
    parts = space.parts
    if len(parts) < 2 or not all(isinstance(p, GroupSpace) for p in parts) or len({p.size for p in parts}) != 1:
        return None
    k, d = len(parts), parts[0].size
    pre, post = tuple(in_shape[:axis]), tuple(in_shape[axis + 1:])
    out_shape = tuple(out_shape)
    if out_shape[:axis] != pre or out_shape[axis] != k:
        return None
    middle = out_shape[axis + 1:len(out_shape) - len(post)]
    if out_shape[len(out_shape) - len(post):] != post or _prod(middle) != d:
        return None
    if len(middle) == 1:
        heads = 1
    elif len(middle) == 2 and middle[0] > 1 and middle[1] > 1:
        heads = middle[0]
        if not all(ctx.set_heads(p.gid, heads) for p in parts):
            return None
    else:
        return None
    out = node.output[0]
    axes = {"stack": axis, "head": axis + 1 if heads > 1 else None, "channel": axis + len(middle)}
    return _emit(ctx, out, StackSpace(tuple(parts), d, heads), axes)


def unit_axis_map(in_shape, out_shape) -> list | None:
    """For a reshape that only adds or drops axes of size 1: each input axis's output axis
    (None for a dropped unit axis); None when the reshape does more."""
    src = [k for k, d in enumerate(in_shape) if d != 1]
    dst = [k for k, d in enumerate(out_shape) if d != 1]
    if [in_shape[k] for k in src] != [out_shape[k] for k in dst]:
        return None
    where = [None] * len(in_shape)
    for a, b in zip(src, dst):
        where[a] = b
    return where


def squeeze_axis_map(rank_in: int, axes: list[int], unsqueeze: bool) -> list:
    """Each input axis's output axis under Squeeze (None: removed) or Unsqueeze of ``axes``."""
    if unsqueeze:
        rank_out = rank_in + len(axes)
        added = {a % rank_out for a in axes}
        kept = [k for k in range(rank_out) if k not in added]
        return kept
    gone = {a % rank_in for a in axes}
    where, j = [], 0
    for k in range(rank_in):
        if k in gone:
            where.append(None)
        else:
            where.append(j)
            j += 1
    return where


def reshape_stack(ctx, node, space: StackSpace, where: list):
    """Any reshape given as an input -> output axis map (``where``)."""
    x = node.input[0]
    axes = {}
    for key, a in _axes_of(ctx, x).items():
        if a is None:
            axes[key] = None
            continue
        axes[key] = where[a]
        if axes[key] is None and key != "stack":
            return None
    if axes["stack"] is None and ctx.shape(x)[ctx.stack_axis_of[x]] != 1:
        return None
    return _emit(ctx, node.output[0], space, axes)


def transpose_stack(ctx, node, space: StackSpace, perm: list):
    axes = {key: (None if a is None else perm.index(a)) for key, a in _axes_of(ctx, node.input[0]).items()}
    return _emit(ctx, node.output[0], space, axes)


def gather_stack(ctx, node, space: StackSpace):
    """Gather of one constant index along the part axis: that part."""
    x, idx = node.input[0], node.input[1]
    axis = ctx.attr(node, "axis", 0) % ctx.rank(x)
    axes = _axes_of(ctx, x)
    if axis != axes["stack"] or not ctx.is_const(idx):
        return None
    value = ctx.const(idx)
    if value.size != 1:
        return None
    i = int(value.reshape(-1)[0]) % len(space.parts)
    shift = value.ndim - 1  # a scalar index drops the axis, a [1]-shaped one keeps it
    part = StackSpace((space.parts[i],), space.size, space.heads)
    new = {}
    for key, a in axes.items():
        if a is None or a < axis:
            new[key] = a
        elif a == axis:
            new[key] = None if value.ndim == 0 else a
        else:
            new[key] = a + shift
    return _emit(ctx, node.output[0], part, new)


def slice_stack(ctx, node, space: StackSpace):
    """Slice along the part axis with constant bounds (step 1): the parts in range."""
    x = node.input[0]
    rank = ctx.rank(x)
    ins = [node.input[k] if len(node.input) > k else "" for k in range(5)]
    if not all(ctx.is_const(i) for i in ins[1:3]) or any(i and not ctx.is_const(i) for i in ins[3:]):
        return None
    starts, ends = ctx.const(ins[1]).tolist(), ctx.const(ins[2]).tolist()
    axes = ctx.const(ins[3]).tolist() if ins[3] else list(range(len(starts)))
    steps = ctx.const(ins[4]).tolist() if ins[4] else [1] * len(starts)
    in_shape, out_shape = ctx.shape(x), ctx.shape(node.output[0])
    own = _axes_of(ctx, x)
    keep = list(range(len(space.parts)))
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= rank
        if a == own["stack"]:
            if st != 1:
                return None
            keep = list(range(len(space.parts)))[slice(s, e)]
        elif a in (own["head"], own["channel"]) and out_shape[a] != in_shape[a]:
            return None
    if not keep:
        return None
    sub = StackSpace(tuple(space.parts[i] for i in keep), space.size, space.heads)
    return _emit(ctx, node.output[0], sub, dict(own))


def split_stack(ctx, node, space: StackSpace):
    """Split along the part axis: each output its parts."""
    x = node.input[0]
    rank = ctx.rank(x)
    axis = ctx.attr(node, "axis", 0) % rank
    own = _axes_of(ctx, x)
    if axis != own["stack"]:
        return None
    outs, start = [], 0
    for o in node.output:
        n = ctx.shape(o)[axis]
        sub = StackSpace(tuple(space.parts[start:start + n]), space.size, space.heads)
        start += n
        outs.append(_emit(ctx, o, sub, dict(own)))
    return outs if all(s is not None for s in outs) else None
