"""Weight layers: Conv, Gemm and MatMul with an initializer start a new feature group."""

from __future__ import annotations

from onnxzip.graph.layergraph import Layer
from onnxzip.graph.spaces import Blocked, GroupSpace, InputSpace, NoFeatures
from onnxzip.ops.registry import register


def _check_input(ctx, node, name, axis):
    """The input's space, if its channel axis is where the layer reads channels."""
    space = ctx.space(name)
    if isinstance(space, (InputSpace, Blocked)):
        return space
    if isinstance(space, NoFeatures):
        return InputSpace()
    if ctx.feature_axis(name) != axis:
        return None
    return space


@register("Conv")
def conv(ctx, node):
    x, w = node.input[0], node.input[1]
    if not ctx.is_const(w):
        return ctx.unsupported_op(node, "Conv weights are computed at run time, not stored as an initializer")
    weight = ctx.const(w)
    space = _check_input(ctx, node, x, 1)
    if space is None:
        return ctx.unsupported_op(node, "Conv input's channel axis is not axis 1")
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and not ctx.is_const(bias):
        return ctx.unsupported_op(node, "Conv bias is computed at run time")
    group = int(ctx.attr(node, "group", 1))
    out = node.output[0]
    c_in = ctx.shape(x)[1]
    if group == 1:
        out_space = ctx.new_group(weight.shape[0], out, 1)
        per_channel = False
    elif group == c_in and weight.shape[1] == 1 and weight.shape[0] == c_in:
        if not ctx.is_feature(space):
            return ctx.unsupported_op(node, "depthwise Conv on model inputs")
        out_space = ctx.follow(space, out, 1)  # per channel: the features keep their space
        if not isinstance(out_space, GroupSpace):
            ctx.set_axis(out, 1)
        per_channel = True
    else:
        # each of the ``group`` output blocks reads only its own input block: merges stay inside
        # the blocks, on both sides (split.merged_layer rewrites the weight block by block)
        out_space = ctx.new_group(weight.shape[0], out, 1)
        per_channel = False
        c_out = weight.shape[0]
        if ctx.is_feature(space):
            for g in range(group):
                if not ctx.keep_apart(space, range(g * c_in // group, (g + 1) * c_in // group)):
                    return ctx.unsupported_op(node, f"grouped Conv (group={group}) over flattened or head-split features")
        for g in range(group):
            ctx.keep_apart(out_space, range(g * c_out // group, (g + 1) * c_out // group))
    ctx.add_layer(Layer(
        node=node.name, op_type="Conv", weight=w, bias=bias, input=x, output=out, in_space=space,
        out_space=out_space, w_out_axis=0, w_in_axis=1, weight_shape=tuple(weight.shape),
        per_channel=per_channel, group=group,
    ))
    return [out_space]


@register("Gemm")
def gemm(ctx, node):
    x, w = node.input[0], node.input[1]
    if ctx.attr(node, "transA", 0):
        return ctx.unsupported_op(node, "Gemm with transA=1")
    if not ctx.is_const(w):
        return ctx.unsupported_op(node, "Gemm weights are computed at run time, not stored as an initializer")
    weight = ctx.const(w)
    trans_b = int(ctx.attr(node, "transB", 0))
    out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (not ctx.is_const(bias) or ctx.const(bias).size not in (weight.shape[out_axis],)):
        return ctx.unsupported_op(node, "Gemm bias is not one value per output feature")
    space = _check_input(ctx, node, x, 1)
    if space is None:
        return ctx.unsupported_op(node, "Gemm input's feature axis is not axis 1")
    out = node.output[0]
    out_space = ctx.new_group(weight.shape[out_axis], out, 1)
    ctx.add_layer(Layer(
        node=node.name, op_type="Gemm", weight=w, bias=bias, input=x, output=out, in_space=space,
        out_space=out_space, w_out_axis=out_axis, w_in_axis=in_axis, weight_shape=tuple(weight.shape),
    ))
    return [out_space]


@register("MatMul")
def matmul(ctx, node):
    a, b = node.input[0], node.input[1]
    sa, sb = ctx.space(a), ctx.space(b)
    if ctx.is_const(b) and not ctx.is_const(a):
        weight = ctx.const(b)
        if weight.ndim != 2:
            return ctx.unsupported_op(node, "MatMul with a weight of rank other than 2")
        rank = ctx.rank(a)
        space = _check_input(ctx, node, a, rank - 1)
        if space is None:
            return _mix_tokens(ctx, node, a, weight)
        out = node.output[0]
        out_space = ctx.new_group(weight.shape[1], out, ctx.rank(out) - 1)
        layer = Layer(
            node=node.name, op_type="MatMul", weight=b, bias=None, input=a, output=out, in_space=space,
            out_space=out_space, w_out_axis=1, w_in_axis=0, weight_shape=tuple(weight.shape),
        )
        ctx.add_layer(layer)
        carried = ctx.carried.get(a)
        if carried is not None:  # the token MLP's last layer: back to the channels it carried
            layer.token_mixing = True
            ctx.aligned.add(out_space.gid)
            _attach_token_bias(ctx, node, layer, weight.shape[1])
            return [GroupSpace(carried.gid, carried.size, out, carried.axis)]
        return [out_space]
    if ctx.is_const(a) and not ctx.is_const(b):
        return ctx.unsupported_op(node, "MatMul with the weight as the left operand")
    if not ctx.is_feature(sa) and not ctx.is_feature(sb):
        return ctx.unsupported_op(node, "MatMul of model inputs")
    from onnxzip.ops.attention import attention_matmul

    outs = attention_matmul(ctx, node)
    if outs is not None:
        return outs
    return ctx.unsupported_op(node, "MatMul between two activations that is not an attention score or context product")


def _mix_tokens(ctx, node, a, weight):
    """A dense layer over another axis than the channels (MLP-Mixer's token mixing).

    For the channel group it is a per-channel op: every channel is mixed across tokens alike, so
    the group passes through untouched (its weights have no channel axis). Its own outputs are a
    new group on the last axis (the token MLP's hidden units); the channel group is carried along
    (``ctx.carried``) to the layer that maps back to tokens, whose outputs are token positions, the
    same in every model (an aligned group: averaged, not matched).

    The hidden units are matched like any hidden layer's, on statistics averaged over the channels
    first (:attr:`LayerGraph.pooled`): their samples are (sample, channel) pairs, and the channels of
    two models differ, so only a channel-free summary pairs the models' rows.
    """
    space = ctx.space(a)
    rank = ctx.rank(a)
    if not isinstance(space, GroupSpace) or space.axis == rank - 1 or a in ctx.carried:
        return ctx.unsupported_op(node, "MatMul input's feature axis is not the last axis")
    out = node.output[0]
    out_space = ctx.new_group(weight.shape[1], out, ctx.rank(out) - 1)
    ctx.add_layer(Layer(
        node=node.name, op_type="MatMul", weight=node.input[1], bias=None, input=a, output=out, in_space=InputSpace(),
        out_space=out_space, w_out_axis=1, w_in_axis=0, weight_shape=tuple(weight.shape), token_mixing=True,
    ))
    ctx.carried[out] = GroupSpace(space.gid, space.size, out, space.axis + ctx.rank(out) - rank)
    return [out_space]


def _attach_token_bias(ctx, node, layer: Layer, width: int) -> None:
    """The bias Add right after a token-mixing layer is that layer's (its channels are tokens)."""
    out = node.output[0]
    users = [n for n in ctx.model.graph.node if out in n.input]
    if len(users) != 1 or users[0].op_type != "Add" or out in ctx.graph_outputs:
        return
    add = users[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    if ctx.is_const(other) and tuple(ctx.shape(other)) == (width,):
        layer.bias = other
        layer.output = add.output[0]
        ctx.token_bias.add((add.name, other))
