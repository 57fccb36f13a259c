"""Invariants of the rewrite: permutations preserve a model's function; zipping a model with a
permuted copy of itself gives it back."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph
from tests.tiny_models import images

ARCHS = ["mlp", "cnn", "resnet", "dw", "cat", "vit", "mha", "mixer"]


def run(model, x):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", ARCHS)
def test_permuting_every_group_preserves_outputs(tiny, arch, exporter):
    path = tiny(arch, exporter=exporter)
    graph = load_layer_graph(path)
    perms = random_permutations(graph, seed=3)
    assert any((p != np.arange(len(p))).any() for p in perms.values())
    permuted = permute_model(graph, perms)
    onnx.checker.check_model(permuted)
    x = images(16, seed=5)
    (want,), (got,) = run(path, x), run(permuted, x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # the weights did move: a permuted model is not the same file
    w0 = {t.name: t for t in graph.model.graph.initializer}
    changed = sum(
        not np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(w0[t.name]))
        for t in permuted.graph.initializer if t.name in w0
    )
    assert changed > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_unfolded_batchnorm_permutes_too(tiny, arch):
    path = tiny(arch, fold=False)
    graph = load_layer_graph(path)
    permuted = permute_model(graph, random_permutations(graph, seed=4))
    x = images(8, seed=6)
    np.testing.assert_allclose(run(permuted, x)[0], run(path, x)[0], atol=1e-4, rtol=1e-4)


def _permuted_copy(path, tmp_path, seed=7):
    graph = load_layer_graph(path)
    out = tmp_path / "permuted.onnx"
    onnx.save(permute_model(graph, random_permutations(graph, seed)), out)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,params", [("permute", {}), ("zipit", {"beta": 0.0})])
def test_zip_with_permuted_self_recovers_the_model(tiny, calib, tmp_path, arch, method, params):
    path = tiny(arch)
    other = _permuted_copy(path, tmp_path)
    result = onnxzip.zip_models(path, other, calib, method=method, params=params, do_repair=False, tasks=["a", "b"])
    x = images(16, seed=8)
    want = run(path, x)[0]
    got_a, got_b = run(result.model, x)
    np.testing.assert_allclose(got_a, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_b, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["resnet", "cnn"])
def test_repair_changes_nothing_on_a_model_zipped_with_itself(tiny, calib, tmp_path, arch):
    path = tiny(arch)
    other = _permuted_copy(path, tmp_path)
    x = images(16, seed=9)
    want = run(path, x)[0]
    for stop_at in (None, 2):
        result = onnxzip.zip_models(path, other, calib, method="permute", do_repair=True, stop_at=stop_at, tasks=["a", "b"],
                                    refit=False)
        assert result.repair is not None and result.repair.passes > 0
        for got in run(result.model, x):
            np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)


def test_average_without_repair_is_the_mean_of_the_weights(tiny, calib):
    a, b = tiny("cnn", seed=0), tiny("cnn", seed=1)
    result = onnxzip.zip_models(a, b, calib, method="average", do_repair=False, stop_at="all", tasks=["a", "b"])
    ga, gb = load_layer_graph(a), load_layer_graph(b)
    merged = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in ga.model.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in gb.model.graph.initializer}
    for la, lb in zip(ga.layers, gb.layers):
        np.testing.assert_allclose(merged[la.weight], (wa[la.weight] + wb[lb.weight]) / 2, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(merged[la.bias], (wa[la.bias] + wb[lb.bias]) / 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stop_at", [0, 1, 2, 3, "all"])
def test_every_depth_gives_a_valid_model_with_one_output_per_task(tiny, calib, stop_at):
    a, b = tiny("resnet", seed=0), tiny("resnet", seed=1)
    result = onnxzip.zip_models(a, b, calib, stop_at=stop_at, tasks=["a", "b"])
    onnx.checker.check_model(result.model)
    names = [o.name for o in result.model.graph.output]
    assert names == (["logits"] if stop_at == "all" else ["a/logits", "b/logits"])
    outs = run(result.model, images(4))
    assert all(np.isfinite(o).all() for o in outs)
    if stop_at == 0:  # nothing shared: each head is its source model
        for o, src in zip(outs, (a, b)):
            np.testing.assert_allclose(o, run(src, images(4))[0], atol=1e-4)


def test_mixed_exporters_zip(tiny, calib):
    """One TorchScript model and one dynamo model (external data, other opset) zip together."""
    a = tiny("resnet", seed=0, exporter="torchscript")
    b = tiny("resnet", seed=0, exporter="dynamo")
    assert onnxzip.check(a, b)["zippable"]
    result = onnxzip.zip_models(a, b, calib, method="permute", do_repair=False, tasks=["a", "b"])
    x = images(8)
    want = run(a, x)[0]
    for got in run(result.model, x):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_vit_with_decomposed_layernorm_and_erf_gelu_permutes(tiny):
    """Opset 14: LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div, GELU through Erf."""
    path = tiny("vit", seed=3, opset=14)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "LayerNormalization" not in ops and "ReduceMean" in ops and "Erf" in ops
    graph = load_layer_graph(path)
    assert not graph.unsupported
    assert sorted(g.attention_heads for g in graph.groups.values() if g.attention_heads > 1) == [2, 2, 2, 2]
    permuted = permute_model(graph, random_permutations(graph, seed=5))
    x = images(8, seed=2)
    np.testing.assert_allclose(run(permuted, x)[0], run(path, x)[0], atol=1e-4, rtol=1e-4)


def test_embedding_model_zips_end_to_end_and_a_permuted_self_zip_gives_it_back(tmp_path):
    """After the final weight layer the models' outputs share one space: an L2 normalisation (or any
    op) there needs no merge, so --stop-at all zips through it."""
    from tests.onnx_builders import mlp, random_mlp_weights

    model = mlp(random_mlp_weights([10, 16, 12, 8], 0), l2_normalize=True)
    graph = load_layer_graph(model)
    assert graph.max_depth() == graph.num_layers == 3
    permuted = permute_model(graph, random_permutations(graph, seed=1))
    x = np.random.default_rng(0).normal(size=(200, 10)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    want = run(model, x[:20])[0]
    np.testing.assert_allclose(run(permuted, x[:20])[0], want, atol=1e-5)
    for method, params in (("permute", {}), ("zipit", {"alpha": 0.3, "beta": 0.0})):
        z = onnxzip.zip_models(model, permuted, tmp_path / "calib.npz", method=method, params=params, stop_at="all",
                               tasks=["a", "b"], do_repair=False)
        assert z.stop_at == 3
        got = run(z.model, x[:20])
        assert len(got) == 1  # one shared embedding output
        np.testing.assert_allclose(got[0], want, atol=1e-5)
    other = mlp(random_mlp_weights([10, 16, 12, 8], 5), l2_normalize=True)
    z = onnxzip.zip_models(model, other, tmp_path / "calib.npz", stop_at="all", tasks=["a", "b"])
    np.testing.assert_allclose(np.linalg.norm(run(z.model, x[:20])[0], axis=1), 1.0, rtol=1e-5)
