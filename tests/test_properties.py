"""Property-based tests over random small architectures (dense, conv, residual, concat, depthwise)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import onnxzip
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph
from onnxzip.pipeline import prepare_pair, zip_prepared
from tests.random_arch import random_model


def _ill_conditioned(stats) -> bool:
    std = np.sqrt(np.maximum(np.diagonal(stats.covariance), 0))
    live = std > 0
    return bool(((std < 1e-2 * np.maximum(np.abs(stats.mean), 1e-12)) & live).any())

BLOCKS = st.lists(st.sampled_from(["conv", "res", "cat", "dw", "bn", "pool"]), min_size=0, max_size=4)
SETTINGS = settings(max_examples=int(__import__("os").environ.get("ONNXZIP_EXAMPLES", 12)), deadline=None, derandomize=not __import__("os").environ.get("ONNXZIP_EXAMPLES"), suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def data(tmp_path, seed=0, n=48):
    x = np.random.default_rng(seed).random((n, 2, 8, 8)).astype(np.float32)
    path = tmp_path / f"calib{seed}.npz"
    np.savez(path, x=x)
    return path, x


@SETTINGS
@given(seed=st.integers(0, 10_000), blocks=BLOCKS, spelling=st.sampled_from(["gemm", "matmul"]), pseed=st.integers(0, 100))
def test_random_permutation_preserves_function(seed, blocks, spelling, pseed):
    model = random_model(seed, blocks, spelling)
    graph = load_layer_graph(model)
    assume(not graph.unsupported)  # e.g. a residual Add over a Concat: the zip stops before it
    permuted = permute_model(graph, random_permutations(graph, pseed))
    x = np.random.default_rng(seed).random((5, 2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(permuted, x)[0], run(model, x)[0], atol=1e-4, rtol=1e-4)


@SETTINGS
@given(seed=st.integers(0, 10_000), blocks=BLOCKS, pseed=st.integers(0, 100))
def test_zip_with_a_permuted_copy_returns_the_function(tmp_path_factory, seed, blocks, pseed):
    tmp = tmp_path_factory.mktemp("prop")
    model = random_model(seed, blocks)
    graph = load_layer_graph(model)
    assume(not graph.unsupported)
    other = permute_model(graph, random_permutations(graph, pseed))
    path, x = data(tmp, seed)
    pair = prepare_pair(model, other, path, tasks=["a", "b"])
    # Near-constant features that vary together (sigmoids saturated by random weights) cannot be
    # told apart by any statistic to 1e-4; such models are not a test of the rewrite.
    assume(not any(_ill_conditioned(g) for g in pair.stats.groups.values()))
    r = zip_prepared(pair, "permute", {}, None, ["a", "b"], do_repair=False)
    want = run(model, x[:6])[0]
    for got in run(r.model, x[:6]):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@SETTINGS
@given(seed=st.integers(0, 10_000), blocks=BLOCKS, method=st.sampled_from(["zipit", "permute", "average"]),
       alpha=st.sampled_from([1.0, 0.3, 0.0001]), beta=st.sampled_from([1.0, 0.125, 0.0]), stop=st.sampled_from([None, 1, 2, "all"]))
def test_merged_weights_are_finite(tmp_path_factory, seed, blocks, method, alpha, beta, stop):
    tmp = tmp_path_factory.mktemp("prop")
    a, b = random_model(seed, blocks, weights_seed=1), random_model(seed, blocks, weights_seed=2)
    assume(not load_layer_graph(a).unsupported)
    path, x = data(tmp, seed, n=20)  # a tiny calibration set: degenerate statistics are likely
    params = {"alpha": alpha, "beta": beta} if method == "zipit" else {}
    r = onnxzip.zip_models(a, b, path, method=method, params=params, stop_at=stop, tasks=["a", "b"])
    for t in r.model.graph.initializer:
        v = onnx.numpy_helper.to_array(t)
        if np.issubdtype(v.dtype, np.floating):
            assert np.isfinite(v).all(), t.name
    assert all(np.isfinite(o).all() for o in run(r.model, x[:4]))


def test_dead_and_duplicate_channels_give_finite_weights(tmp_path):
    """Channels that never fire, and channels that copy each other, as after pruning or dying ReLUs."""
    from tests.onnx_builders import mlp

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 10))
    w1[0] = 0.0  # dead: constant 0 after ReLU
    w1[1] = w1[2]  # perfectly correlated
    b1 = np.zeros(6)
    b1[3] = -100.0  # dead: always negative
    w = [(w1, b1), (rng.normal(size=(3, 6)), np.zeros(3))]
    x = rng.normal(size=(30, 10)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    for method in ("zipit", "permute", "average"):
        r = onnxzip.zip_models(mlp(w), mlp(w), tmp_path / "c.npz", method=method, tasks=["a", "b"])
        for t in r.model.graph.initializer:
            assert np.isfinite(onnx.numpy_helper.to_array(t)).all()
