"""Attention as torch.nn and timm spell it (committed tiny "mha" models: nn.MultiheadAttention with
its fused in_proj and sequence-first internals, and a fused qkv Linear cut by reshape/permute/unbind)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxzip
from onnxzip.graph.samples import sample_layouts, samples_first, samples_first_axis
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph
from tests.test_invariants import _permuted_copy
from tests.tiny_models import images


def run(model, x):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_fused_projections_become_one_group_per_part_and_the_zip_reaches_full_depth(tiny, exporter):
    graph = load_layer_graph(tiny("mha", exporter=exporter))
    assert any("split 2 fused projection(s)" in n for n in graph.notes)
    assert graph.max_depth() == graph.num_layers, [u.reason for u in graph.unsupported]
    heads = [g for g in graph.groups.values() if g.attention_heads == 2]
    assert len(heads) == 4  # per block: q with k, and v with the output projection's input
    ties = {}
    for g in heads:
        ties.setdefault(g.attention_tie, []).append(g.gid)
    assert sorted(len(v) for v in ties.values()) == [2, 2]
    # nn.MultiheadAttention computes sequence-first: some pre-activations hold samples off axis 0
    assert any(graph.sample_layout(l.preact) for l in graph.layers)


@pytest.mark.parametrize("method,params", [("permute", {}), ("zipit", {"beta": 0.0})])
def test_zip_with_permuted_self_gives_the_model_back_with_the_correction(tiny, calib, tmp_path, method, params):
    path = tiny("mha")
    other = _permuted_copy(path, tmp_path)
    x = images(16, seed=8)
    want = run(path, x)[0]
    for refit in (False, True):
        result = onnxzip.zip_models(path, other, calib, method=method, params=params, do_repair=True, tasks=["a", "b"],
                                    batch_size=7, refit=refit)  # odd batches: the last one is short
        assert (result.refit if refit else result.repair) is not None
        for got in run(result.model, x):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mha", "vit"])
def test_a_static_batch_folded_into_the_head_axis_zips_at_full_depth(tiny, calib, tmp_path, arch):
    # the dynamo exporter, given a static batch, spells batched attention [B*H, L, d] with the
    # samples folded into the head axis (nn.MultiheadAttention: [L, B*H, d])
    path = tiny(arch, exporter="dynamo", batch=4)
    graph = load_layer_graph(path)
    assert graph.max_depth() == graph.num_layers, [u.reason for u in graph.unsupported]
    x = images(8, seed=8)
    want = np.concatenate([run(path, x[:4])[0], run(path, x[4:])[0]])
    permuted = permute_model(graph, random_permutations(graph, seed=3))
    got = np.concatenate([run(permuted, x[:4])[0], run(permuted, x[4:])[0]])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    other = _permuted_copy(path, tmp_path)
    for refit in (False, True):
        result = onnxzip.zip_models(path, other, calib, method="zipit", params={"beta": 0.0}, do_repair=True,
                                    tasks=["a", "b"], refit=refit)
        for half in (x[:4], x[4:]):
            for got, want_half in zip(run(result.model, half), [run(path, half)[0]] * 2):
                np.testing.assert_allclose(got, want_half, atol=1e-4, rtol=1e-4)


def test_sample_layouts_follow_the_batch_through_transposes_and_flattening():
    # x [N, T, C] -> Transpose -> [T, N, C] -> Reshape -> [T*N, C] -> Relu
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["t", "shape"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "shape")])
    model = helper.make_model(graph)
    shapes = {"x": (2, 5, 3), "t": (5, 2, 3), "r": (10, 3), "y": (10, 3), "shape": (2,)}
    layouts = sample_layouts(model, shapes, batch=2)
    assert layouts["x"] == (0, 1, 1) and layouts["t"] == (1, 1, 1)
    assert layouts["r"] == layouts["y"] == (0, 5, 1)  # 5 token blocks of 2 samples
    x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)
    r = x.transpose(1, 0, 2).reshape(-1, 3)
    back = samples_first(r, layouts["r"], batch=4)  # [samples, outer, inner, C]
    assert back.shape == (4, 5, 1, 3) and samples_first_axis(layouts["r"], 1) == 3
    np.testing.assert_array_equal(back.reshape(4, 5, 3), x)


def test_merged_parameters_keep_an_attention_masks_infinities():
    from onnxzip.split import _merge_values

    m = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    v = np.array([[1.0, -np.inf], [3.0, 2.0], [-np.inf, 4.0]])
    got = _merge_values(m, v)
    np.testing.assert_array_equal(got, [[2.0, -np.inf], [-np.inf, 4.0]])


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_mixer_token_mixing_passes_the_channels_and_matches_its_hidden_units_pooled(tiny, exporter):
    graph = load_layer_graph(tiny("mixer", exporter=exporter))
    assert graph.max_depth() == graph.num_layers, [u.reason for u in graph.unsupported]
    aligned = [g for g in graph.groups.values() if g.aligned]
    assert [g.size for g in aligned] == [16, 16]  # the token positions each token MLP writes
    assert len(graph.pooled) == 2  # its hidden units, measured averaged over the channels
    residual = graph.groups[graph.layers[0].out_space.gid]
    assert residual.size == 8 and not residual.aligned


@pytest.mark.parametrize("layout", ["4d", "3d"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_the_attention_op_zips_with_its_heads_and_repeated_key_heads(tmp_path, layout, kv_heads):
    # ONNX's Attention (opset 23), as torch's dynamo exporter writes scaled_dot_product_attention:
    # 4 query heads over 4 (multi-head), 2 (grouped-query) or 1 (multi-query) key/value heads
    from tests.onnx_builders import attention_op_model

    path = tmp_path / "a.onnx"
    onnx.save(attention_op_model(0, 4, kv_heads, layout), path)
    graph = load_layer_graph(path)
    assert graph.max_depth() == graph.num_layers == 4, [u.reason for u in graph.unsupported]
    repeated = [g for g in graph.groups.values() if g.repeat_of is not None]
    assert [g.repeat_of[1] for g in repeated] == ([] if kv_heads == 4 else [4 // kv_heads])
    x, calib = _permutation_invariants(graph, path, tmp_path, tokens=6)
    pair = tmp_path / "b.onnx"
    onnx.save(attention_op_model(1, 4, kv_heads, layout), pair)
    result = onnxzip.zip_models(path, pair, calib, method="zipit", params={"alpha": 0.3, "beta": 0.125},
                                stop_at="all", tasks=["a", "b"])
    sizes = {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}
    assert all(tuple(t.dims) == sizes[t.name] for t in result.model.graph.initializer if t.name in sizes)
    (got,) = run(result.model, x)
    assert got.shape == (5, 5) and np.isfinite(got).all()


@pytest.mark.parametrize("cut", ["split", "slice"])
def test_q_k_v_fused_side_by_side_in_each_head_become_one_layer_per_part(tmp_path, cut):
    # GPT-NeoX: one Linear read as [.., heads, 3 * d] and cut per head
    from tests.onnx_builders import fused_per_head_attention_model

    path = tmp_path / "a.onnx"
    onnx.save(fused_per_head_attention_model(0, cut=cut), path)
    graph = load_layer_graph(path)
    assert any("fused per head" in n for n in graph.notes)
    assert graph.max_depth() == graph.num_layers == 4, [u.reason for u in graph.unsupported]
    heads = sorted(g.attention_heads for g in graph.groups.values() if g.attention_heads > 1)
    assert heads == [2, 2]  # q with k, and v
    _permutation_invariants(graph, path, tmp_path, tokens=5)


def _permutation_invariants(graph, path, tmp_path, tokens: int):
    """A token model ([N, tokens, 8] in): a random permutation of every group computes the same,
    and zipping it with that permuted copy gives it back, without and with the correction and the
    refit. Returns example inputs and a calibration file."""
    rng = np.random.default_rng(2)
    x = rng.random((5, tokens, 8)).astype(np.float32)
    want = run(path, x)[0]
    permuted = permute_model(graph, random_permutations(graph, seed=3))
    np.testing.assert_allclose(run(permuted, x)[0], want, atol=1e-5, rtol=1e-4)
    other = tmp_path / "permuted.onnx"
    onnx.save(permuted, other)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.random((48, tokens, 8)).astype(np.float32))
    for repair, refit in ((False, False), (True, False), (True, True)):
        result = onnxzip.zip_models(path, other, calib, method="zipit", params={"beta": 0.0}, stop_at="all",
                                    do_repair=repair, refit=refit, tasks=["a", "b"])
        for got in run(result.model, x):
            np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    return x, calib

