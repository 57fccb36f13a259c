"""REPAIR: restores the statistics merging destroys, and leaves a self-zip alone."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

import onnxzip
from onnxzip.stats.collect import fetch_model
from tests.onnx_builders import mlp


def preact_std(model, x, name="pre0"):
    sess = ort.InferenceSession(fetch_model(model, [name]).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([name], {"x": x})[0].std(axis=0)


def test_repair_restores_a_variance_that_averaging_halves(tmp_path):
    # A's hidden unit reads input 0, B's reads input 1; the inputs are independent, so the
    # average (x0 + x1) / 2 has half the variance either source unit had.
    wa = [(np.array([[1.0, 0.0]]), np.zeros(1)), (np.array([[1.0], [-1.0], [0.5]]), np.zeros(3))]
    wb = [(np.array([[0.0, 1.0]]), np.zeros(1)), (np.array([[0.3], [1.0], [-1.0]]), np.zeros(3))]
    x = np.random.default_rng(0).normal(size=(4000, 2)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    data = {"a": path, "b": path}  # both tasks see the same data: targets are the sources' own std (1)
    plain = onnxzip.zip_models(mlp(wa), mlp(wb), data, method="average", do_repair=False, tasks=["a", "b"])
    fixed = onnxzip.zip_models(mlp(wa), mlp(wb), data, method="average", do_repair=True, tasks=["a", "b"], refit=False)
    np.testing.assert_allclose(preact_std(plain.model, x), [np.sqrt(0.5)], rtol=0.05)
    np.testing.assert_allclose(preact_std(fixed.model, x), [1.0], rtol=0.01)
    assert fixed.repair.passes >= 1


def _preact_bn_model(seed):
    """Conv -> Relu -> BatchNormalization (not foldable) -> Conv -> Relu -> GlobalAveragePool -> Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    arrays = {
        "w1": rng.normal(size=(6, 2, 3, 3)), "b1": rng.normal(size=6) * 0.1,
        "s": rng.random(6) + 0.5, "be": rng.normal(size=6) * 0.1, "m": rng.normal(size=6), "v": rng.random(6) + 0.5,
        "w2": rng.normal(size=(5, 6, 3, 3)) * 0.3, "b2": rng.normal(size=5) * 0.1, "fc": rng.normal(size=(3, 5)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("BatchNormalization", ["r1", "s", "be", "m", "v"], ["n1"], name="bn"),
        helper.make_node("Conv", ["n1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1, name="fc"),
    ]
    g = helper.make_graph(nodes, "pre", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _with_data_statistics(model, x):
    """The model with its BatchNorm's stored statistics set to its input's moments on ``x``
    (what a BatchNorm trained on that data holds)."""
    from onnx import numpy_helper

    sess = ort.InferenceSession(fetch_model(model, ["r1"]).SerializeToString(), providers=["CPUExecutionProvider"])
    act = sess.run(["r1"], {"x": x})[0].astype(np.float64)
    for t in model.graph.initializer:
        if t.name in ("m", "v"):
            value = act.mean(axis=(0, 2, 3)) if t.name == "m" else act.var(axis=(0, 2, 3))
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))
    return model


def test_batchnorm_left_in_the_trunk_is_reset_to_the_merged_statistics(tmp_path):
    """Sources whose stored statistics are their data's: the merged BatchNorm gets the merged
    model's (the paper's reset)."""
    from onnx import numpy_helper

    x = np.random.default_rng(1).random((200, 2, 6, 6)).astype(np.float32)
    # per task the same images (each model's targets on its own task's rows), measured on every
    # row (the default measures on an evenly spread subset)
    data = {}
    for task in ("a", "b"):
        data[task] = tmp_path / f"{task}.npz"
        np.savez(data[task], x=x)
    r = onnxzip.zip_models(_with_data_statistics(_preact_bn_model(0), x), _with_data_statistics(_preact_bn_model(1), x),
                           data, method="average", tasks=["a", "b"], repair_samples=0, holdout=0.0,
                           refit=False)
    assert r.repair.samples == 2 * len(x)
    assert any(n.op_type == "BatchNormalization" for n in r.model.graph.node)
    sess = ort.InferenceSession(fetch_model(r.model, ["r1"]).SerializeToString(), providers=["CPUExecutionProvider"])
    act = sess.run(["r1"], {"x": x})[0]
    w = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    np.testing.assert_allclose(w["m"], act.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w["v"], act.var(axis=(0, 2, 3)), rtol=1e-3, atol=1e-5)
