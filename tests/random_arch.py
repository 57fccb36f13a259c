"""Random small architectures written with onnx.helper: dense, conv, residual, concat, depthwise."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, rng: np.random.Generator, shape_rng: np.random.Generator):
        self.rng = rng  # weights
        self.shape_rng = shape_rng  # structure: widths and activation kinds
        self.nodes, self.inits = [], []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray, base: str = "w") -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), n))
        return n

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1) -> str:
        w = self.rng.normal(size=(cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)
        b = self.rng.normal(size=cout) * 0.1
        return self.node("Conv", [x, self.const(w), self.const(b, "b")], pads=[k // 2] * 4, group=group)

    def act(self, x: str) -> str:
        op = self.shape_rng.choice(["Relu", "Clip6", "LeakyRelu", "Sigmoid"])
        if op == "Clip6":
            return self.node("Clip", [x, self.const(np.array(0.0), "lo"), self.const(np.array(6.0), "hi")])
        return self.node(str(op), [x])

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        return self.node("BatchNormalization", [x, self.const(r.random(c) + 0.5, "s"), self.const(r.normal(size=c) * 0.1, "bb"),
                                                 self.const(r.normal(size=c) * 0.1, "m"), self.const(r.random(c) + 0.5, "v")])


def random_model(seed: int, blocks: list[str], dense_spelling: str = "gemm", weights_seed: int | None = None) -> onnx.ModelProto:
    """A network from a list of block kinds: conv, res, cat, dw, bn, pool; then a dense head.

    ``seed`` fixes the structure (widths, activations), ``weights_seed`` (default: seed) the weights.
    """
    rng = np.random.default_rng(seed)
    b = Builder(np.random.default_rng(seed if weights_seed is None else weights_seed + 10_000), rng)
    c, h = 3, 8
    x = b.act(b.conv("x", 2, c))
    for kind in blocks:
        if kind == "conv":
            cout = int(rng.integers(2, 7))
            x, c = b.act(b.conv(x, c, cout)), cout
        elif kind == "res":
            y = b.act(b.conv(x, c, c))
            y = b.conv(y, c, c)
            x = b.act(b.node("Add", [y, x]))
        elif kind == "cat":
            c1, c2 = int(rng.integers(1, 4)), int(rng.integers(1, 4))
            y1, y2 = b.act(b.conv(x, c, c1, 1)), b.act(b.conv(x, c, c2, 3))
            x, c = b.node("Concat", [y1, y2], axis=1), c1 + c2
        elif kind == "dw":
            x = b.act(b.conv(x, c, c, 3, group=c))
        elif kind == "bn":
            x = b.bn(x, c)
        elif kind == "pool" and h > 2:
            x, h = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), h // 2
    if rng.random() < 0.5:
        x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
        features = c
    else:
        x = b.node("Flatten", [x], axis=1)
        features = c * h * h
    hidden = int(rng.integers(3, 8))
    for k, (fin, fout) in enumerate(((features, hidden), (hidden, 4))):
        w = b.rng.normal(size=(fout, fin)) / np.sqrt(fin)
        bias = b.rng.normal(size=fout) * 0.1
        if dense_spelling == "gemm":
            x = b.node("Gemm", [x, b.const(w), b.const(bias, "b")], transB=1)
        else:
            x = b.node("Add", [b.node("MatMul", [x, b.const(w.T)]), b.const(bias, "b")])
        if k == 0:
            x = b.act(x)
    b.nodes.append(helper.make_node("Identity", [x], ["logits"], name="out"))
    graph = helper.make_graph(b.nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], initializer=b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
