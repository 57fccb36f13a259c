"""ONNX's ``Attention`` op (opset 23): softmax(q k^T * scale + mask) v in one node.

torch's dynamo exporter writes ``scaled_dot_product_attention`` as this op from opset 23 on. The
op reads q as ``[B, H, L, d]`` and k, v as ``[B, H_kv, S, d]`` (heads on axis 1), or all three as
``[B, L, heads * d]`` with ``q_num_heads`` / ``kv_num_heads``, and repeats key/value heads to the
query heads when ``H_kv`` divides ``H`` (grouped-query attention). Its feature groups are those
of the two MatMuls it stands for (:mod:`onnxzip.ops.attention`): q and k share one group (or, with
fewer key heads, q's group repeats k's), v's heads follow the same assignment, and the output
carries v's group, repeated to the query heads when they are more.
"""

from __future__ import annotations

from onnxzip.graph.spaces import Blocked, GroupSpace, HeadSpace, InputSpace, NoFeatures, RepeatSpace
from onnxzip.ops.attention import set_head_axis
from onnxzip.ops.registry import register


def _heads_of(ctx, name: str, space, layout_4d: bool, heads_attr: int):
    """(group id, heads, channels) of a q/k/v input; None if it is not head-structured as the op
    reads it. Key/value heads repeated before the op (``repeat_kv``) count once."""
    if layout_4d:
        shape = ctx.shape(name)
        on_axes = ctx.head_axis_of.get(name) == 1 and ctx.feature_axis(name) == 3 and ctx.head_fold_of.get(name, 1) == 1
        if isinstance(space, RepeatSpace) and isinstance(space.part, HeadSpace) and on_axes:
            return space.part.gid, space.part.heads, space.part.size
        if isinstance(space, HeadSpace) and on_axes:
            return space.gid, space.heads, space.size
        if isinstance(space, GroupSpace) and space.axis == 3 and shape is not None and shape[1] == 1:
            return space.gid, 1, space.size  # one key/value head
        return None
    if isinstance(space, GroupSpace) and space.axis == 2 and heads_attr > 0 and space.size % heads_attr == 0:
        if heads_attr > 1 and not ctx.set_heads(space.gid, heads_attr):
            return None
        return space.gid, heads_attr, space.size
    return None


@register("Attention")
def attention(ctx, node):
    names = list(node.input) + [""] * (6 - len(node.input))
    q, k, v, mask = names[:4]
    spaces = [ctx.space(n) for n in (q, k, v)]
    blocked = next((s for s in spaces if isinstance(s, Blocked)), None)
    if blocked is not None:
        return [blocked for _ in node.output]
    if not any(ctx.is_feature(s) for s in spaces):
        kind = InputSpace() if any(isinstance(s, InputSpace) for s in spaces) else NoFeatures()
        return [kind for _ in node.output]
    if any(names[4:6]) or any(node.output[1:]):
        return ctx.unsupported_op(node, "Attention with a KV cache (past or present keys/values) or its scores as an output")
    if mask and ctx.is_feature(ctx.space(mask)):
        return ctx.unsupported_op(node, "Attention mask computed from features")
    rank = ctx.rank(q)
    layout_4d = rank == 4
    if rank not in (3, 4) or any(ctx.rank(n) != rank for n in (k, v)):
        return ctx.unsupported_op(node, "Attention inputs of different ranks")
    found = [_heads_of(ctx, n, s, layout_4d, ctx.attr(node, attr, 0))
             for n, s, attr in zip((q, k, v), spaces, ("q_num_heads", "kv_num_heads", "kv_num_heads"))]
    if any(f is None for f in found):
        return ctx.unsupported_op(node, "Attention inputs are not split into heads as the op reads them")
    (qg, qh, qsize), (kg, kh, ksize), (vg, vh, vsize) = found
    if kh != vh or qh % kh or qsize // qh != ksize // kh:
        return ctx.unsupported_op(node, "Attention heads of q, k and v do not line up")
    if mask and not _mask_ok(ctx, mask):
        return ctx.unsupported_op(node, "Attention mask with one value per head")
    out = node.output[0]
    repeats = qh // kh
    if repeats == 1:
        joined = ctx.union([GroupSpace(qg, qsize, q, rank - 1), GroupSpace(kg, ksize, k, rank - 1)], out, rank - 1)
        ctx.tie_heads(joined.gid, vg)
    elif not ctx.repeat_heads(qg, kg, repeats):
        return ctx.unsupported_op(node, "Attention query heads already repeat other key heads")
    else:
        ctx.tie_heads(kg, vg)
    ctx.set_axis(out, rank - 1)
    if not layout_4d:
        part = GroupSpace(vg, vsize, out, 2)
        return [part if repeats == 1 else RepeatSpace(part, vh, repeats, vsize * repeats)]
    set_head_axis(ctx, out, 1)
    part = HeadSpace(vg, vsize, vh)
    return [part if repeats == 1 else RepeatSpace(part, vh, repeats, vsize * repeats)]


def _mask_ok(ctx, mask: str) -> bool:
    """A mask or additive bias shared by all heads (broadcast over the head axis)."""
    shape = ctx.shape(mask) or ()
    if len(shape) < 3:
        return True
    return shape[len(shape) - 3] == 1
