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
