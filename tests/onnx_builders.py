"""Small ONNX graphs written by hand with onnx.helper, in several exporters' spellings."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def graph_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    """A checked model of one graph (IR version 8) from nodes, input/output value infos and initializers."""
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp(weights, spelling: str = "gemm_t1", opset: int = 17, hidden_act: str = "Relu",
        l2_normalize: bool = False) -> onnx.ModelProto:
    """x [N, in] -> dense -> act -> ... -> logits, from weights = [(W [out, in], b [out]), ...].

    spelling: "gemm_t1" (Gemm transB=1, torch), "gemm_t0" (Gemm transB=0, Keras/JAX),
    "matmul" (MatMul + Add with an [in, out] kernel). ``l2_normalize``: the last layer's output
    divided by its L2 norm, as torch exports ``F.normalize`` (an embedding model's head).
    """
    nodes, inits = [], []
    x = "x"
    for k, (w, b) in enumerate(weights):
        out = "logits" if k == len(weights) - 1 else f"h{k}"
        pre = out if k == len(weights) - 1 else f"pre{k}"
        if spelling == "gemm_t1":
            inits += [numpy_helper.from_array(w.astype(np.float32), f"w{k}"), numpy_helper.from_array(b.astype(np.float32), f"b{k}")]
            nodes.append(helper.make_node("Gemm", [x, f"w{k}", f"b{k}"], [pre], transB=1, name=f"dense{k}"))
        elif spelling == "gemm_t0":
            inits += [numpy_helper.from_array(w.T.astype(np.float32).copy(), f"w{k}"), numpy_helper.from_array(b.astype(np.float32), f"b{k}")]
            nodes.append(helper.make_node("Gemm", [x, f"w{k}", f"b{k}"], [pre], transB=0, name=f"dense{k}"))
        elif spelling == "matmul":
            inits += [numpy_helper.from_array(w.T.astype(np.float32).copy(), f"w{k}"), numpy_helper.from_array(b.astype(np.float32), f"b{k}")]
            nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"mm{k}"], name=f"dense{k}"))
            nodes.append(helper.make_node("Add", [f"mm{k}", f"b{k}"], [pre], name=f"bias{k}"))
        else:
            raise ValueError(spelling)
        if k < len(weights) - 1:
            nodes.append(helper.make_node(hidden_act, [pre], [out], name=f"act{k}"))
        x = out
    if l2_normalize:
        nodes[-1].output[0] = "emb"  # the last dense layer's output, then divided by its norm
        inits.append(numpy_helper.from_array(np.array(1e-12, np.float32), "eps"))
        nodes += [
            helper.make_node("ReduceL2", ["emb"], ["norm"], axes=[-1], keepdims=1, name="l2") if opset < 18 else
            helper.make_node("ReduceL2", ["emb", "l2_axes"], ["norm"], keepdims=1, name="l2"),
            helper.make_node("Clip", ["norm", "eps", ""], ["clipped"], name="clip"),
            helper.make_node("Shape", ["emb"], ["emb_shape"], name="shape"),
            helper.make_node("Expand", ["clipped", "emb_shape"], ["expanded"], name="expand"),
            helper.make_node("Div", ["emb", "expanded"], ["logits"], name="out_norm"),
        ]
        if opset >= 18:
            inits.append(numpy_helper.from_array(np.array([-1], np.int64), "l2_axes"))
    n_in = weights[0][0].shape[1]
    n_out = weights[-1][0].shape[0]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def random_mlp_weights(sizes, seed):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o) * 0.1) for i, o in zip(sizes[:-1], sizes[1:])]


def conv_bn(seed: int, folded: bool, nhwc_input: bool = False, opset: int = 17) -> onnx.ModelProto:
    """Conv -> (BatchNormalization | folded) -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32) * 0.1
    scale, beta = rng.random(6).astype(np.float32) + 0.5, rng.normal(size=6).astype(np.float32) * 0.1
    mean, var = rng.normal(size=6).astype(np.float32) * 0.1, rng.random(6).astype(np.float32) + 0.5
    fc = rng.normal(size=(3, 6)).astype(np.float32)
    fcb = np.zeros(3, np.float32)
    nodes, inits = [], []
    x = "x"
    if nhwc_input:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
        x = "x_nchw"
    if folded:
        s = scale / np.sqrt(var + 1e-5)
        inits += [numpy_helper.from_array(w * s[:, None, None, None], "w"), numpy_helper.from_array((b - mean) * s + beta, "b")]
        nodes.append(helper.make_node("Conv", [x, "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"))
    else:
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        inits += [numpy_helper.from_array(v, n) for v, n in ((scale, "s"), (beta, "be"), (mean, "m"), (var, "v"))]
        nodes.append(helper.make_node("Conv", [x, "w", "b"], ["c0"], pads=[1, 1, 1, 1], name="conv"))
        nodes.append(helper.make_node("BatchNormalization", ["c0", "s", "be", "m", "v"], ["c"], epsilon=1e-5, name="bn"))
    inits += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(fcb, "fcb")]
    nodes += [
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    shape = ["N", 5, 5, 2] if nhwc_input else ["N", 2, 5, 5]
    graph = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _conv(rng, name, x, out, c_in, c_out, group=1, k=3, inits=None, nodes=None):
    w = (rng.standard_normal((c_out, c_in // group, k, k)) / np.sqrt(c_in // group * k * k)).astype(np.float32)
    b = (0.1 * rng.standard_normal(c_out)).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
    nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [out], pads=[k // 2] * 4, group=group, name=name))


def _head(rng, x, c, nodes, inits, classes=5):
    w = (rng.standard_normal((classes, c)) / np.sqrt(c)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fc.w"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"),
              helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]


def cnn_family(kind: str, seed: int = 0) -> onnx.ModelProto:
    """A small CNN on x [N, 1, 8, 8] in one of the spellings real convolutional families export:

    * "grouped": ResNeXt-style 1x1 -> grouped 3x3 (group 4) -> 1x1, residual, grouped 3x3 at the end;
    * "shuffle": ShuffleNetV2-style channel Split, Concat and channel shuffle
      (Reshape [N, 2, C/2, H, W] -> Transpose -> Reshape), with a depthwise Conv;
    * "dense": DenseNet-style BatchNormalization + Relu + Conv over a growing channel Concat.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    relu = lambda x, y: nodes.append(helper.make_node("Relu", [x], [y], name=f"relu_{y}"))  # noqa: E731

    def bn(name, x, out, c):
        scale = (1 + 0.2 * rng.standard_normal(c)).astype(np.float32)
        bias, mean = (0.1 * rng.standard_normal((2, c))).astype(np.float32)
        var = (0.5 + rng.random(c)).astype(np.float32)
        for p, v in zip(("s", "b", "m", "v"), (scale, bias, mean, var)):
            inits.append(numpy_helper.from_array(v, f"{name}.{p}"))
        nodes.append(helper.make_node("BatchNormalization", [x] + [f"{name}.{p}" for p in "sbmv"], [out], name=name))

    if kind == "grouped":
        _conv(rng, "stem", "x", "s0", 1, 16, k=3, inits=inits, nodes=nodes)
        relu("s0", "r0")
        _conv(rng, "c1", "r0", "p1", 16, 8, k=1, inits=inits, nodes=nodes)
        relu("p1", "r1")
        _conv(rng, "c2", "r1", "p2", 8, 8, group=4, inits=inits, nodes=nodes)
        relu("p2", "r2")
        _conv(rng, "c3", "r2", "p3", 8, 16, k=1, inits=inits, nodes=nodes)
        nodes.append(helper.make_node("Add", ["p3", "r0"], ["sum"], name="residual"))
        relu("sum", "r3")
        _conv(rng, "c4", "r3", "p4", 16, 8, group=2, inits=inits, nodes=nodes)
        relu("p4", "r4")
        _head(rng, "r4", 8, nodes, inits)
    elif kind == "shuffle":
        _conv(rng, "stem", "x", "s0", 1, 8, inits=inits, nodes=nodes)
        relu("s0", "r0")
        _conv(rng, "b1", "r0", "p1", 8, 8, k=1, inits=inits, nodes=nodes)  # unit 1: two branches
        relu("p1", "r1")
        _conv(rng, "b2", "r0", "p2", 8, 8, k=1, inits=inits, nodes=nodes)
        relu("p2", "r2")
        nodes.append(helper.make_node("Concat", ["r1", "r2"], ["cat1"], axis=1, name="cat1"))
        c = 16
        for u in range(2):  # shuffle, split in halves, one half through a branch, concat
            src = "cat1" if u == 0 else f"cat{u + 1}"
            shp5 = numpy_helper.from_array(np.array([0, 2, c // 2, 8, 8], np.int64), f"shape5_{u}")
            shp4 = numpy_helper.from_array(np.array([0, c, 8, 8], np.int64), f"shape4_{u}")
            inits += [shp5, shp4]
            nodes += [helper.make_node("Reshape", [src, f"shape5_{u}"], [f"g{u}"], name=f"split_ch{u}"),
                      helper.make_node("Transpose", [f"g{u}"], [f"t{u}"], perm=[0, 2, 1, 3, 4], name=f"swap{u}"),
                      helper.make_node("Reshape", [f"t{u}", f"shape4_{u}"], [f"sh{u}"], name=f"join_ch{u}")]
            inits.append(numpy_helper.from_array(np.array([c // 2, c // 2], np.int64), f"halves{u}"))
            nodes.append(helper.make_node("Split", [f"sh{u}", f"halves{u}"], [f"x1_{u}", f"x2_{u}"], axis=1, name=f"chunk{u}"))
            _conv(rng, f"u{u}a", f"x2_{u}", f"ua{u}", c // 2, c // 2, k=1, inits=inits, nodes=nodes)
            relu(f"ua{u}", f"ra{u}")
            _conv(rng, f"u{u}dw", f"ra{u}", f"ud{u}", c // 2, c // 2, group=c // 2, inits=inits, nodes=nodes)
            _conv(rng, f"u{u}b", f"ud{u}", f"ub{u}", c // 2, c // 2, k=1, inits=inits, nodes=nodes)
            relu(f"ub{u}", f"rb{u}")
            nodes.append(helper.make_node("Concat", [f"x1_{u}", f"rb{u}"], [f"cat{u + 2}"], axis=1, name=f"cat{u + 2}"))
        _conv(rng, "last", "cat3", "pl", c, 12, k=1, inits=inits, nodes=nodes)
        relu("pl", "rl")
        _head(rng, "rl", 12, nodes, inits)
    elif kind == "dense":
        _conv(rng, "stem", "x", "s0", 1, 6, inits=inits, nodes=nodes)
        feats, c = ["s0"], 6
        for layer in range(3):
            src = feats[0]
            if len(feats) > 1:
                src = f"in{layer}"
                nodes.append(helper.make_node("Concat", list(feats), [src], axis=1, name=f"concat{layer}"))
            bn(f"bn{layer}", src, f"n{layer}", c)
            relu(f"n{layer}", f"a{layer}")
            _conv(rng, f"d{layer}", f"a{layer}", f"f{layer}", c, 4, inits=inits, nodes=nodes)
            feats.append(f"f{layer}")
            c += 4
        nodes.append(helper.make_node("Concat", list(feats), ["all"], axis=1, name="concat_all"))
        bn("bn_all", "all", "n_all", c)
        relu("n_all", "a_all")
        _head(rng, "a_all", c, nodes, inits)
    else:
        raise ValueError(kind)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])
    return graph_model(nodes, [x], [y], inits)


def strided_pool_head(seed: int = 0, batch: int = 4) -> onnx.ModelProto:
    """x [batch, 1, 8, 8] (a static batch) -> Conv -> Relu -> Conv -> Relu -> ReduceMean over H, W
    -> Reshape [-1] -> Gather of every entry in order -> Flatten -> Gemm: torch's dynamo exporter
    spells a pooled ``as_strided`` view so, the Gather's indices a constant once the batch is static."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    c = 8
    _conv(rng, "c1", "x", "p1", 1, c, inits=inits, nodes=nodes)
    nodes.append(helper.make_node("Relu", ["p1"], ["r1"], name="relu1"))
    _conv(rng, "c2", "r1", "p2", c, c, inits=inits, nodes=nodes)
    nodes.append(helper.make_node("Relu", ["p2"], ["r2"], name="relu2"))
    inits += [numpy_helper.from_array(np.array([2, 3], np.int64), "hw"),
              numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"),
              numpy_helper.from_array(np.arange(batch * c, dtype=np.int64).reshape(batch, c, 1, 1), "strided_idx")]
    nodes += [helper.make_node("ReduceMean", ["r2", "hw"], ["mean"], keepdims=1, name="mean"),
              helper.make_node("Reshape", ["mean", "flat_shape"], ["flat1d"], name="view"),
              helper.make_node("Gather", ["flat1d", "strided_idx"], ["strided"], axis=0, name="as_strided"),
              helper.make_node("Flatten", ["strided"], ["flat"], axis=1, name="flatten")]
    w = (rng.standard_normal((5, c)) / np.sqrt(c)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fc.w"), numpy_helper.from_array(np.zeros(5, np.float32), "fc.b")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1, name="fc"))
    return graph_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])], inits, opset=18)


class _TokenModel:
    """Pieces of the small token models below: dense layers (MatMul + Add) and the common end
    (output projection of the attention ``a``, residual Add with ``h``, Relu, mean over tokens,
    a 5-class Gemm head)."""

    def __init__(self, rng, inits: list, nodes: list):
        self.rng, self.inits, self.nodes = rng, inits, nodes

    def dense(self, name: str, x: str, n_in: int, n_out: int, out: str) -> None:
        w = (self.rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, f"{name}.w"),
                       numpy_helper.from_array((0.1 * self.rng.standard_normal(n_out)).astype(np.float32), f"{name}.b")]
        self.nodes += [helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}.mm"], name=name),
                       helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [out], name=f"{name}.add")]

    def finish(self, attended: int, width: int, tokens: int, opset: int) -> onnx.ModelProto:
        self.dense("o", "a", attended, width, "o")
        self.inits.append(numpy_helper.from_array(np.array([1], np.int64), "tokens_axis"))
        self.nodes += [helper.make_node("Add", ["o", "h"], ["res"], name="residual"),
                       helper.make_node("Relu", ["res"], ["act"], name="relu"),
                       helper.make_node("ReduceMean", ["act", "tokens_axis"], ["pooled"], keepdims=0, name="pool")]
        w = (self.rng.standard_normal((5, width)) / np.sqrt(width)).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, "head.w"), numpy_helper.from_array(np.zeros(5, np.float32), "head.b")]
        self.nodes.append(helper.make_node("Gemm", ["pooled", "head.w", "head.b"], ["logits"], transB=1, name="head"))
        return graph_model(self.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", tokens, 8])],
                           [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], self.inits, opset=opset)


def attention_op_model(seed: int = 0, heads: int = 4, kv_heads: int = 4, layout: str = "4d", d: int = 4,
                       tokens: int = 6, width: int = 16) -> onnx.ModelProto:
    """x [N, tokens, width] -> dense embedding -> q/k/v projections -> ONNX ``Attention`` (opset 23,
    causal; ``heads`` query heads over ``kv_heads`` key/value heads of size ``d``) -> output
    projection -> residual Add -> Relu -> mean over tokens -> Gemm head.

    layout "4d": the heads split by Reshape + Transpose before the op (as torch's dynamo exporter
    writes ``scaled_dot_product_attention`` at opset 23); "3d": q/k/v as ``[N, tokens, heads * d]``
    with the op's ``q_num_heads`` and ``kv_num_heads``.
    """
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    dense = _TokenModel(rng, inits, nodes).dense

    dense("embed", "x", 8, width, "h")
    dense("q", "h", width, heads * d, "q")
    dense("k", "h", width, kv_heads * d, "k")
    dense("v", "h", width, kv_heads * d, "v")
    if layout == "4d":
        for name, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            inits.append(numpy_helper.from_array(np.array([0, 0, n, d], np.int64), f"{name}.shape"))
            nodes += [helper.make_node("Reshape", [name, f"{name}.shape"], [f"{name}4"], name=f"{name}.split"),
                      helper.make_node("Transpose", [f"{name}4"], [f"{name}h"], perm=[0, 2, 1, 3], name=f"{name}.heads")]
        nodes.append(helper.make_node("Attention", ["qh", "kh", "vh"], ["ah"], is_causal=1, name="attention"))
        inits.append(numpy_helper.from_array(np.array([0, 0, heads * d], np.int64), "a.shape"))
        nodes += [helper.make_node("Transpose", ["ah"], ["a4"], perm=[0, 2, 1, 3], name="a.tokens"),
                  helper.make_node("Reshape", ["a4", "a.shape"], ["a"], name="a.join")]
    else:
        nodes.append(helper.make_node("Attention", ["q", "k", "v"], ["a"], is_causal=1, q_num_heads=heads,
                                      kv_num_heads=kv_heads, name="attention"))
    return _TokenModel(rng, inits, nodes).finish(heads * d, width, tokens, opset=23)


def fused_per_head_attention_model(seed: int = 0, heads: int = 2, d: int = 4, cut: str = "split", tokens: int = 5,
                                   width: int = 8) -> onnx.ModelProto:
    """x [N, tokens, 8] -> dense embedding -> one Linear to q/k/v side by side in each head
    (GPT-NeoX's ``query_key_value``: Reshape [.., heads, 3 * d], Transpose, then a Split, or three
    Slices with ``cut="slice"``) -> softmax(q k^T) v -> output projection -> residual Add -> Relu
    -> mean over tokens -> Gemm head."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    dense = _TokenModel(rng, inits, nodes).dense

    dense("embed", "x", 8, width, "h")
    dense("qkv", "h", width, 3 * heads * d, "qkv")
    inits += [numpy_helper.from_array(np.array([0, 0, heads, 3 * d], np.int64), "qkv.shape"),
              numpy_helper.from_array(np.array([0, 0, heads * d], np.int64), "a.shape"),
              numpy_helper.from_array(np.array(1.0 / np.sqrt(d), np.float32), "scale")]
    nodes += [helper.make_node("Reshape", ["qkv", "qkv.shape"], ["qkv4"], name="qkv.heads"),
              helper.make_node("Transpose", ["qkv4"], ["qkvt"], perm=[0, 2, 1, 3], name="qkv.t")]
    if cut == "split":
        nodes.append(helper.make_node("Split", ["qkvt"], ["q", "k", "v"], axis=3, num_outputs=3, name="qkv.split"))
    else:
        for j, name in enumerate("qkv"):
            for what, value in (("start", j * d), ("end", (j + 1) * d), ("axis", 3)):
                inits.append(numpy_helper.from_array(np.array([value], np.int64), f"{name}.{what}"))
            nodes.append(helper.make_node("Slice", ["qkvt", f"{name}.start", f"{name}.end", f"{name}.axis"], [name],
                                          name=f"qkv.slice_{name}"))
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="k.t"),
              helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale"),
              helper.make_node("Softmax", ["scaled"], ["weights"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["weights", "v"], ["ctx"], name="context"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3], name="ctx.t"),
              helper.make_node("Reshape", ["ctx_t", "a.shape"], ["a"], name="ctx.join")]
    return _TokenModel(rng, inits, nodes).finish(heads * d, width, tokens, opset=18)
