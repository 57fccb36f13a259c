"""The same weights written in different exporters' spellings parse and zip the same way."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip
from onnxzip.graph.compare import layer_signature
from onnxzip.pipeline import load_layer_graph
from tests.onnx_builders import conv_bn, mlp, random_mlp_weights

SPELLINGS = ["gemm_t1", "gemm_t0", "matmul"]


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(128, 10)).astype(np.float32))
    return path


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_dense_spellings_give_the_same_layer_graph(spelling):
    w = random_mlp_weights([10, 8, 6, 3], seed=0)
    ref = load_layer_graph(mlp(w, "gemm_t1"))
    got = load_layer_graph(mlp(w, spelling))
    assert [layer_signature(l) for l in got.layers] == [layer_signature(l) for l in ref.layers]


def test_dense_spellings_zip_to_the_same_function(data):
    wa, wb = random_mlp_weights([10, 8, 6, 3], seed=1), random_mlp_weights([10, 8, 6, 3], seed=2)
    x = np.random.default_rng(5).normal(size=(16, 10)).astype(np.float32)
    outs = {}
    for spelling in SPELLINGS:
        r = onnxzip.zip_models(mlp(wa, spelling), mlp(wb, spelling), data, tasks=["a", "b"], params={"beta": 0.5})
        outs[spelling] = run(r.model, x)
    for spelling in SPELLINGS[1:]:
        for got, want in zip(outs[spelling], outs["gemm_t1"]):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_mixed_spellings_zip_together(data):
    """A torch-style (Gemm transB=1) model zips with a Keras-style (MatMul + Add) one."""
    wa, wb = random_mlp_weights([10, 8, 6, 3], seed=1), random_mlp_weights([10, 8, 6, 3], seed=2)
    x = np.random.default_rng(5).normal(size=(16, 10)).astype(np.float32)
    same = onnxzip.zip_models(mlp(wa, "gemm_t1"), mlp(wb, "gemm_t1"), data, tasks=["a", "b"])
    mixed = onnxzip.zip_models(mlp(wa, "gemm_t1"), mlp(wb, "matmul"), data, tasks=["a", "b"])
    for got, want in zip(run(mixed.model, x), run(same.model, x)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_unfolded_and_folded_batchnorm_are_the_same_model(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.random.default_rng(0).random((64, 2, 5, 5)).astype(np.float32))
    folded = [load_layer_graph(conv_bn(s, folded=True)) for s in (0, 1)]
    unfolded = [load_layer_graph(conv_bn(s, folded=False)) for s in (0, 1)]
    assert [layer_signature(l) for l in folded[0].layers] == [layer_signature(l) for l in unfolded[0].layers]
    x = np.random.default_rng(2).random((8, 2, 5, 5)).astype(np.float32)
    a = onnxzip.zip_models(conv_bn(0, True), conv_bn(1, True), path, tasks=["a", "b"])
    b = onnxzip.zip_models(conv_bn(0, False), conv_bn(1, False), path, tasks=["a", "b"])
    for got, want in zip(run(b.model, x), run(a.model, x)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_nhwc_input_with_transpose_parses_like_nchw():
    nchw = load_layer_graph(conv_bn(0, True))
    nhwc = load_layer_graph(conv_bn(0, True, nhwc_input=True))
    assert [layer_signature(l) for l in nhwc.layers] == [layer_signature(l) for l in nchw.layers]


@pytest.mark.parametrize("opset", [13, 15, 17, 20])
def test_opsets(opset, data):
    w = random_mlp_weights([10, 8, 3], seed=0)
    r = onnxzip.zip_models(mlp(w, "matmul", opset=opset), mlp(random_mlp_weights([10, 8, 3], 1), "gemm_t0", opset=opset), data, tasks=["a", "b"])
    onnx.checker.check_model(r.model)


def test_different_opsets_are_reconciled(data):
    w = random_mlp_weights([10, 8, 3], seed=0)
    r = onnxzip.zip_models(mlp(w, "gemm_t1", opset=13), mlp(w, "gemm_t1", opset=18), data, tasks=["a", "b"])
    assert next(o.version for o in r.model.opset_import if o.domain == "") == 18
