"""Element-wise ops: unary activations pass features through; binary ops unify groups."""

from __future__ import annotations

import numpy as np

from onnxzip.graph.spaces import Blocked, GroupSpace, HeadsOnly, InputSpace, NoFeatures
from onnxzip.ops.registry import register
from onnxzip.ops.rotary import within_head_constant
from onnxzip.ops.shape import constant_lookup

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "HardSwish", "HardSigmoid", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Mish", "ThresholdedRelu",
    "Identity", "Dropout", "Floor", "Ceil", "Round", "Sin", "Cos", "Swish",
    "IsNaN", "IsInf",  # a mask over the same features (the dynamo exporter's guard after a Softmax)
)


def _pass(ctx, node, space):
    if ctx.is_feature(space) and not isinstance(space, GroupSpace):
        ctx.set_axis(node.output[0], ctx.feature_axis(node.input[0]))
    outs = []
    for k, o in enumerate(node.output):
        outs.append(ctx.follow(space, o) if k == 0 else NoFeatures())
    return outs


@register(*UNARY)
def unary(ctx, node):
    return _pass(ctx, node, ctx.space(node.input[0]))


@register("Clip")
def clip(ctx, node):
    for i in node.input[1:]:
        if i and not ctx.is_const(i) and ctx.is_feature(ctx.space(i)):
            return ctx.unsupported_op(node, "Clip bounds computed from features")
    return _pass(ctx, node, ctx.space(node.input[0]))


@register("Cast", "CastLike")
def cast(ctx, node):
    to = ctx.attr(node, "to", None)
    if node.op_type == "Cast" and to not in (1, 10, 11, 16):  # float, float16, double, bfloat16
        return [NoFeatures()]
    return _pass(ctx, node, ctx.space(node.input[0]))


@register("PRelu")
def prelu(ctx, node):
    space = ctx.space(node.input[0])
    if ctx.is_feature(space) and ctx.is_const(node.input[1]):
        if not _const_operand(ctx, node, 1, space, ctx.rank(node.output[0])):
            return ctx.unsupported_op(node, "PRelu slope does not broadcast along channels")
    return _pass(ctx, node, space)


def _const_operand(ctx, node, k, space, out_rank) -> bool:
    """Record a constant operand: broadcast along the channel axis, or one value per channel."""
    axis = ctx.feature_axis(node.input[0])
    shape = ctx.shape(node.input[k]) or ()
    if len(shape) == 0:
        return True
    pos = axis - (out_rank - len(shape))
    if pos < 0 or shape[pos] == 1:
        return True
    if shape[pos] == space.size and isinstance(space, GroupSpace):
        ctx.add_param(node, k, pos, space)
        return True
    return False


BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu_")


@register(*BINARY)
def binary(ctx, node):
    out = node.output[0]
    out_rank = ctx.rank(out)
    ins = [(k, i, ctx.space(i)) for k, i in enumerate(node.input) if i]
    feats = [(k, i, s) for k, i, s in ins if ctx.is_feature(s)]
    if any(isinstance(s, Blocked) for _, _, s in ins):
        return [next(s for _, _, s in ins if isinstance(s, Blocked))]
    if not feats:
        return [InputSpace() if any(isinstance(s, InputSpace) for _, _, s in ins) else NoFeatures()]
    if any(isinstance(s, InputSpace) for _, _, s in ins):
        return ctx.unsupported_op(node, "combines model inputs with features")
    axes = set()
    for k, i, s in feats:
        ax = ctx.feature_axis(i)
        if ax is None:
            return ctx.unsupported_op(node, "operand's channel axis is unknown")
        axes.add(out_rank - (ctx.rank(i) - ax))
    if len(axes) != 1:
        return ctx.unsupported_op(node, "operands' channel axes do not line up")
    axis = axes.pop()
    spaces = [s for _, _, s in feats]
    if all(isinstance(s, GroupSpace) for s in spaces):
        if len({s.size for s in spaces}) != 1:
            return ctx.unsupported_op(node, "operands have different channel counts")
        result = ctx.union(spaces, out, axis)
    elif all(s == spaces[0] for s in spaces):
        result = spaces[0]
    else:
        return ctx.unsupported_op(node, "adds a concatenated or flattened feature space to another")
    for k, i, s in ins:
        if ctx.is_feature(s):
            continue
        if ctx.is_const(i):
            if node.op_type not in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"):
                return ctx.unsupported_op(node, "constant operand")
            shape = ctx.shape(i) or ()
            pos = axis - (out_rank - len(shape))
            if len(shape) == 0 or pos < 0 or shape[pos] == 1:
                continue
            if node.op_type in ("Add", "Sub", "Mul", "Div") and isinstance(result, GroupSpace) and shape[pos] == result.size:
                if node.op_type == "Add" and ctx.attach_bias(node, k, feats[0][1], pos):
                    continue
                ctx.add_param(node, k, pos, result)
                continue
            if node.op_type in ("Add", "Sub", "Mul", "Div") and isinstance(result, HeadsOnly) and shape[pos] == result.heads:
                ctx.add_param(node, k, pos, result)  # a per-head constant (Swin's relative position bias)
                continue
            if node.op_type == "Mul" and within_head_constant(ctx, feats[0][1], result, shape, out_rank):
                continue
            return ctx.unsupported_op(node, f"constant of shape {list(shape)} varies along the channel axis")
        # a run-time computed operand without features (a shape-derived scalar, say)
        shape = ctx.shape(i) or ()
        pos = axis - (out_rank - len(shape))
        if node.op_type in ("Add", "Sub") and pos >= 0 and constant_lookup(ctx, i, pos, result):
            continue
        if node.op_type == "Mul" and isinstance(s, NoFeatures) and within_head_constant(ctx, feats[0][1], result, shape, out_rank):
            continue  # rotary cos/sin tables computed from positions (arange of the sequence length)
        if len(shape) and pos >= 0 and shape[pos] != 1:
            return ctx.unsupported_op(node, "operand computed at run time varies along the channel axis")
    if not isinstance(result, GroupSpace):
        ctx.set_axis(out, axis)
    return [result]


@register("Where")
def where(ctx, node):
    cond, a, b = (ctx.space(i) for i in node.input)
    if ctx.is_feature(cond) and not _same_features(ctx, cond, a) and not _same_features(ctx, cond, b):
        return ctx.unsupported_op(node, "condition computed from features other than the operands'")
    fake = type(node)()
    fake.CopyFrom(node)
    del fake.input[0]
    fake.op_type = "Max"  # same broadcasting and unification rules, no constant parameters allowed
    for i in fake.input:
        if ctx.is_const(i) and (ctx.shape(i) or (1,)) != (1,) and np.prod(ctx.shape(i) or (1,)) > 1:
            return ctx.unsupported_op(node, "constant branch varies along channels")
    return binary(ctx, fake)


def _same_features(ctx, x, y) -> bool:
    """Two spaces hold the same features in the same order (an element-wise mask of an operand)."""
    if isinstance(x, GroupSpace) and isinstance(y, GroupSpace):
        return ctx.find(x.gid) == ctx.find(y.gid) and x.size == y.size
    return ctx.is_feature(x) and x == y
