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
    fixed = onnxzip.zip_models(mlp(wa), mlp(wb), data, method="average", do_repair=True, tasks=["a", "b"])
    np.testing.assert_allclose(preact_std(plain.model, x), [np.sqrt(0.5)], rtol=0.05)
    np.testing.assert_allclose(preact_std(fixed.model, x), [1.0], rtol=0.01)
    assert fixed.repair.passes >= 1
