"""Normalization ops: per-channel parameters follow the group (method.md, zip propagation)."""

from __future__ import annotations

from onnxzip.graph.spaces import ConcatSpace, GroupSpace, channel_sources
from onnxzip.ops.registry import register


@register("BatchNormalization", "InstanceNormalization")
def batchnorm(ctx, node):
    x = node.input[0]
    space = ctx.space(x)
    if not ctx.is_feature(space):
        return [space] + [space for _ in node.output[1:]]
    if ctx.feature_axis(x) != 1 or channel_sources(space) is None:
        return ctx.unsupported_op(node, f"{node.op_type} over flattened features or not on axis 1")
    for k in range(1, len(node.input)):
        if not ctx.is_const(node.input[k]):
            return ctx.unsupported_op(node, f"{node.op_type} parameters computed at run time")
    for k in range(1, len(node.input)):
        # per channel; over a Concat (DenseNet) each part's slice follows that part's merge
        ctx.add_param(node, k, 0, space)
    out = ctx.follow(space, node.output[0])
    if not isinstance(out, GroupSpace):
        ctx.set_axis(node.output[0], 1)
    return [out] + [space for _ in node.output[1:]]


@register("LayerNormalization", "RMSNormalization")
def layernorm(ctx, node):
    """LayerNorm (or RMSNorm, opset 23) over the channel axis only: its scale and bias are per channel.

    The normalization itself mixes channels (mean and variance over all of them); the zip treats
    it as per-channel, an approximation the docs state.
    """
    x = node.input[0]
    space = ctx.space(x)
    if not ctx.is_feature(space):
        return [space for _ in node.output]
    rank = ctx.rank(x)
    axis = ctx.attr(node, "axis", -1) % rank
    concat = isinstance(space, ConcatSpace) and ctx.feature_axis(x) == rank - 1
    if axis != rank - 1 or not (concat or (isinstance(space, GroupSpace) and space.axis == rank - 1)):
        return ctx.unsupported_op(node, "LayerNormalization over more than the channel axis")
    for k in range(1, len(node.input)):
        if node.input[k]:
            if not ctx.is_const(node.input[k]):
                return ctx.unsupported_op(node, "LayerNormalization parameters computed at run time")
            ctx.add_param(node, k, len(ctx.shape(node.input[k])) - 1, space)
    if concat:  # Swin's patch merging: LayerNorm over 4 neighbours' channels side by side
        ctx.set_axis(node.output[0], rank - 1)
    return [ctx.follow(space, node.output[0])] + [ctx.space("") for _ in node.output[1:]]
