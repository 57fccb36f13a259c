"""Language models (Hugging Face BERT and a LLaMA-style decoder): token embeddings, the residual
stream they start, RMSNorm, SwiGLU, rotary position embeddings, attention masks, tied and untied LM
heads. Invariants: a permutation of every feature group leaves the outputs unchanged; zipping a
model with a permuted copy of itself gives it back, with and without the statistics correction; two
different models zip at full depth into a valid model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph
from onnxzip.predictions import owner_masks, token_rows
from tests.tiny_models import example_feeds

# committed models (tests/make_models.py): arch, exporter, static batch (0: dynamic). With a static
# batch the dynamo exporter folds the samples into attention's head axis ([batch * heads, L, d]).
COMMITTED = [("bert", "torchscript", 0), ("llama", "dynamo", 0), ("bert", "dynamo", 4), ("llama", "dynamo", 4),
             ("llama-gqa", "dynamo", 0), ("llama-mqa", "dynamo", 0), ("phi", "dynamo", 0)]


def run(model, feeds):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def token_calib(tmp_path_factory):
    """calib(arch) -> an .npz of token ids (and an attention mask for BERT)."""
    root = tmp_path_factory.mktemp("tokens")

    def get(arch: str, n: int = 64):
        path = root / f"{arch}-{n}.npz"
        if not path.exists():
            np.savez(path, **example_feeds(arch, n, seed=1))
        return path

    return get


def _permuted_copy(path, out, seed=7):
    graph = load_layer_graph(path)
    onnx.save(permute_model(graph, random_permutations(graph, seed)), out)
    return out


def test_embedding_tables_are_weight_layers_that_start_the_residual_stream(tiny):
    graph = load_layer_graph(tiny("bert"))
    # the word table [vocab, D], indexed by the input: a layer, output channels on axis 1, no input channels
    (words,) = [l for l in graph.layers if l.kind == "embedding"]
    assert words.weight_shape == (32, 16) and words.w_out_axis == 1 and words.input == "input_ids"
    # token-type and position tables, indexed by positions computed from shapes and constants, are
    # added constants: their columns follow the residual stream (as the dynamo exporter folds them)
    lookups = [p for p in graph.params if p.op_type == "Gather"]
    assert len(lookups) == 2 and {p.gid for p in lookups} == {words.out_space.gid} and {p.axis for p in lookups} == {1}
    assert graph.max_depth() == graph.num_layers and not graph.unsupported


def test_rotary_queries_and_keys_keep_channels_within_heads(tiny):
    graph = load_layer_graph(tiny("llama", exporter="dynamo"))
    assert graph.max_depth() == graph.num_layers and not graph.unsupported
    rotary = [g for g in graph.groups.values() if g.rotary]
    assert len(rotary) == 1 and rotary[0].attention_heads == 2  # q and k of the block: one group
    values = [g for g in graph.groups.values() if g.attention_heads == 2 and not g.rotary]
    assert len(values) == 1 and values[0].attention_tie == rotary[0].attention_tie
    # SwiGLU: gate and up projections are one group
    swiglu = [g for g in graph.groups.values() if len(g.producers) == 2 and g.size == 32]
    assert len(swiglu) == 1
    # a random permutation moves whole heads of the rotary group, never channels within a head
    d = rotary[0].size // rotary[0].attention_heads
    for seed in range(5):
        perm = random_permutations(graph, seed)[rotary[0].gid]
        assert (perm.reshape(-1, d) - perm.reshape(-1, d)[:, :1] == np.arange(d)).all()


@pytest.mark.parametrize("arch,exporter,batch", COMMITTED)
def test_permuting_every_group_preserves_outputs(tiny, arch, exporter, batch):
    path = tiny(arch, exporter=exporter, batch=batch)
    graph = load_layer_graph(path)
    assert graph.max_depth() == graph.num_layers, [u.reason for u in graph.unsupported]
    permuted = permute_model(graph, random_permutations(graph, seed=3))
    onnx.checker.check_model(permuted)
    x = example_feeds(arch, batch or 6, seed=5)
    np.testing.assert_allclose(run(permuted, x)[0], run(path, x)[0], atol=1e-5, rtol=1e-4)
    changed = {t.name for t in permuted.graph.initializer} & {l.weight for l in graph.layers}
    assert changed


@pytest.mark.parametrize("arch,exporter,batch", COMMITTED)
@pytest.mark.parametrize("correction", ["none", "repair", "refit"])
def test_zip_with_permuted_self_gives_the_model_back(tiny, token_calib, tmp_path, arch, exporter, batch, correction):
    path = tiny(arch, exporter=exporter, batch=batch)
    other = _permuted_copy(path, tmp_path / "permuted.onnx")
    result = onnxzip.zip_models(path, other, token_calib(arch), method="zipit", params={"alpha": 0.3, "beta": 0.0},
                                do_repair=correction == "repair", refit=correction == "refit", stop_at="all",
                                tasks=["a", "b"])
    x = example_feeds(arch, batch or 6, seed=8)
    want = run(path, x)[0]
    for got in run(result.model, x):
        assert relative_error(got, want) < 1e-4


def test_two_llama_models_zip_at_full_depth_with_the_label_free_search(tiny, token_calib):
    a, b = tiny("llama", 0, "dynamo"), tiny("llama", 1, "dynamo")
    result = onnxzip.zip_models(a, b, token_calib("llama", 96), tasks=["a", "b"])
    onnx.checker.check_model(result.model)
    assert result.stop_at == load_layer_graph(a).num_layers - 1  # all but the LM heads shared
    outs = run(result.model, example_feeds("llama", 3, seed=9))
    assert [o.shape for o in outs] == [(3, 16, 32), (3, 16, 32)]
    # fidelity was scored per token (3-D logits): held-out rows times tokens
    selection = result.summary()["selection"]
    assert selection["holdout_samples"] % 16 == 0 and 0.0 < selection["candidates"][0]["joint_agreement"] <= 1.0


def test_sequence_logits_are_one_prediction_per_token():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 5, 7))
    assert token_rows(logits).shape == (20, 7)
    np.testing.assert_array_equal(token_rows(logits)[7], logits[1, 2])
    sharp = logits.copy()
    sharp[:2] *= 10  # model A much more confident on rows 0 and 1 (every token)

    class Batch:
        task = np.full(4, -1)

    owner = owner_masks(Batch(), [sharp, logits])
    assert owner.shape == (2, 4) and owner[0, :2].all() and owner[1, 2:].all()


# ------------------------------------------------------------------------------------------------
# The brief's configurations, exported with torch from transformers (hidden 32, 2 layers, 2 heads,
# intermediate 64, vocabulary 100): both exporters for BERT and LLaMA (TorchScript exports LLaMA
# only with an attention mask, else it meets aten::diff; it computes the rotary tables and the
# rotate_half bounds at run time), tied and untied LM heads.

LM_CASES = [
    ("bert", "torchscript", {}), ("bert", "dynamo", {}),
    ("llama", "dynamo", {"tie": True}), ("llama", "dynamo", {"tie": False}), ("llama", "torchscript", {"mask": True}),
    # grouped-query (4 query heads over 2 key/value heads) and multi-query attention (over 1)
    ("llama", "dynamo", {"heads": 4, "kv_heads": 2}), ("llama", "torchscript", {"heads": 4, "kv_heads": 1, "mask": True}),
    # opset 23: the dynamo exporter writes the attention as ONNX's Attention op
    ("llama", "dynamo", {"heads": 4, "kv_heads": 2, "opset": 23}),
    # partial rotary (Phi): half of each head's channels rotated, the rest passed through
    ("phi", "dynamo", {}), ("phi", "torchscript", {"mask": True}),
    # GPT-NeoX: q/k/v fused side by side in each head, partial rotary
    ("neox", "dynamo", {}), ("neox", "torchscript", {"mask": True}),
]


def _export_lm(tmp_path, arch, exporter, seed, kw):
    from tests import tiny_models

    tiny_models.require("transformers")
    folder = tmp_path / f"{arch}-{exporter}-{seed}"
    folder.mkdir()
    kw = dict(kw)
    opset = kw.pop("opset", 17)
    model = tiny_models.build_language_model(arch, seed, **{"hidden": 32, "layers": 2, "heads": 2, "vocab": 100,
                                                            "intermediate": 64, **kw})
    return tiny_models.export(model, folder / "model.onnx", exporter, opset=opset)


@pytest.mark.exporter
@pytest.mark.parametrize("arch,exporter,kw", LM_CASES, ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}{v[k]}" for k in v))
def test_exported_language_model_self_zip_is_exact_and_a_pair_zips(tmp_path, arch, exporter, kw):
    from tests import tiny_models

    a, b = (_export_lm(tmp_path, arch, exporter, seed, kw) for seed in (0, 1))
    names = [i.name for i in onnx.load(str(a), load_external_data=False).graph.input]
    calib = tmp_path / "calib.npz"
    np.savez(calib, **tiny_models.tokens(64, seed=1, names=names, vocab=100))
    graph = load_layer_graph(a)
    assert not graph.unsupported and graph.max_depth() == graph.num_layers
    if kw.get("opset", 17) >= 23:
        assert any(n.op_type == "Attention" for n in onnx.load(str(a), load_external_data=False).graph.node)
    x = tiny_models.tokens(4, seed=2, names=names, vocab=100)
    want = run(a, x)[0]
    permuted = _permuted_copy(a, tmp_path / "permuted.onnx")
    assert relative_error(run(permuted, x)[0], want) < 1e-5
    for repair in (False, True):
        result = onnxzip.zip_models(a, permuted, calib, method="zipit", params={"alpha": 0.3, "beta": 0.0},
                                    do_repair=repair, stop_at="all", tasks=["a", "b"])
        for got in run(result.model, x):
            assert relative_error(got, want) < 1e-4
    result = onnxzip.zip_models(a, b, calib, method="zipit", params={"alpha": 0.3, "beta": 0.125},
                                stop_at="all", tasks=["a", "b"])
    onnx.checker.check_model(result.model)
    (got,) = run(result.model, x)
    assert got.shape == want.shape and np.isfinite(got).all()


def test_every_depth_of_a_llama_pair_gives_a_valid_model(tiny, token_calib):
    from onnxzip.pipeline import prepare_pair, zip_prepared

    pair = prepare_pair(tiny("llama", 0, "dynamo"), tiny("llama", 1, "dynamo"), token_calib("llama"), tasks=["a", "b"])
    x = example_feeds("llama", 3, seed=4)
    for depth in range(pair.graphs[0].num_layers + 1):
        result = zip_prepared(pair, "zipit", {"alpha": 0.3, "beta": 0.125}, stop_at=depth, tasks=["a", "b"])
        outs = run(result.model, x)
        assert len(outs) == (1 if depth == pair.graphs[0].num_layers else 2)
        assert all(o.shape == (3, 16, 32) and np.isfinite(o).all() for o in outs)


def test_shape_nodes_with_different_inputs_never_correspond_across_models():
    from onnx import helper, numpy_helper

    from onnxzip.split import _same_int_consts

    one = numpy_helper.from_array(np.array([1], dtype=np.int64), "one")
    short = helper.make_node("Concat", ["shape", "one"], ["s"], axis=0)
    long = helper.make_node("Concat", ["shape", "one", "one", "one"], ["l"], axis=0)
    consts = {"one": one}
    assert _same_int_consts(short, short, consts, consts)
    assert not _same_int_consts(long, short, consts, consts)  # GQA's repeat shape is not the view shape


def test_statistics_see_one_row_per_calibration_row():
    from onnxzip.stats.collect import per_row

    rows = 3
    batch = np.arange(rows * 4 * 5, dtype=np.float32).reshape(rows, 4, 5)
    got, axis = per_row(batch, 2, rows)
    assert got is batch and axis == 2
    shared = batch[:1]  # a position embedding: computed once, the same for every row
    got, axis = per_row(shared, -1, rows)
    assert got.shape == (rows, 4, 5) and axis == 2 and (got[2] == shared[0]).all()
    folded = batch.reshape(rows * 4, 5)  # a dense layer on a [rows * tokens, C] view (dynamo)
    got, axis = per_row(folded, 1, rows)
    assert got.shape == (rows, 4, 5) and axis == 2 and (got == batch).all()


def _tied_lm(seed: int, spelling: str) -> onnx.ModelProto:
    """A one-block language model whose LM head reads the embedding table: through a Transpose of
    the same initializer, or a Gemm (transB=1) sharing it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    vocab, d, hidden, tokens = 12, 6, 10, 4
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, d)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((d, hidden)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((hidden, d)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"]),
             helper.make_node("Add", ["x", "y"], ["s"])]
    if spelling == "transpose":
        nodes += [helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["s", "emb_t"], ["logits"])]
    else:
        inits += [numpy_helper.from_array(np.array([-1, d], np.int64), "rows"),
                  numpy_helper.from_array(np.array([-1, tokens, vocab], np.int64), "back")]
        nodes += [helper.make_node("Reshape", ["s", "rows"], ["s2"]), helper.make_node("Gemm", ["s2", "emb"], ["l2"], transB=1),
                  helper.make_node("Reshape", ["l2", "back"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", tokens])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", tokens, vocab])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("spelling", ["transpose", "gemm"])
def test_tied_lm_head_gets_the_embedding_merge(tmp_path, spelling):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_tied_lm(0, spelling), a)
    onnx.save(_tied_lm(1, spelling), b)
    graph = load_layer_graph(a)
    table, head = graph.layers[0], graph.layers[-1]
    assert table.kind == "embedding" and head.in_space.gid == table.out_space.gid  # both uses: the residual group
    ids = np.random.default_rng(0).integers(0, 12, (48, 4)).astype(np.int64)
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=ids)
    permuted = _permuted_copy(a, tmp_path / "permuted.onnx")
    x = {"ids": ids[:5]}
    want = run(a, x)[0]
    for repair in (False, True):
        result = onnxzip.zip_models(a, permuted, calib, method="zipit", params={"beta": 0.0}, do_repair=repair,
                                    stop_at="all", tasks=["a", "b"])
        assert relative_error(run(result.model, x)[0], want) < 1e-4
    result = onnxzip.zip_models(a, b, calib, stop_at="all", tasks=["a", "b"])
    onnx.checker.check_model(result.model)
    assert run(result.model, x)[0].shape == (5, 4, 12)


def test_rmsnormalization_op_scale_follows_the_group(tmp_path):
    """RMSNormalization (opset 23): its scale is a per-channel parameter, like LayerNorm's."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((12, 6)).astype(np.float32), "emb"),
             numpy_helper.from_array((rng.random(6) + 0.5).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]),
             helper.make_node("RMSNormalization", ["x", "scale"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, 5])], inits)
    path = tmp_path / "rms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), path)
    layer_graph = load_layer_graph(path)
    assert [p.op_type for p in layer_graph.params] == ["RMSNormalization"] and not layer_graph.unsupported
    permuted = permute_model(layer_graph, random_permutations(layer_graph, seed=1))
    x = {"ids": rng.integers(0, 12, (3, 4)).astype(np.int64)}
    np.testing.assert_allclose(run(permuted, x)[0], run(path, x)[0], atol=1e-5, rtol=1e-5)


def test_token_ids_outside_the_vocabulary_are_a_user_error(tiny, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.full((8, 16), 40, dtype=np.int64))  # the tiny LLaMA has 32 tokens
    with pytest.raises(onnxzip.OnnxZipError, match="vocabulary"):
        onnxzip.zip_models(tiny("llama", 0, "dynamo"), tiny("llama", 1, "dynamo"), calib, tasks=["a", "b"])


def test_an_op_that_blocks_attention_heads_limits_the_depth():
    """A blocked q/k/v tensor (attention heads) stops the zip before its group's first layer."""
    from onnx import helper

    from onnxzip.graph.build import BuildContext
    from onnxzip.graph.spaces import HeadSpace

    model = helper.make_model(helper.make_graph([], "empty", [], []))
    ctx = BuildContext(model, {})
    node = helper.make_node("Reshape", ["q", "shape"], ["out"], name="repeat")
    ctx.cross_channel(node, HeadSpace(3, 32, 4))
    assert ctx.crossed == {3: [("repeat", "Reshape")]}


@pytest.mark.parametrize("arch,kv_heads", [("llama-gqa", 2), ("llama-mqa", 1)])
def test_grouped_query_attention_repeats_the_key_groups_merge_on_every_query_head(tiny, token_calib, arch, kv_heads):
    """4 query heads over ``kv_heads`` key/value heads: the queries' group repeats the keys' (its
    merge is the keys' merge on every repeat), and a pair zips at full depth keeping the shapes."""
    from onnxzip.merge import repeat_matrix

    graph = load_layer_graph(tiny(arch, 0, "dynamo"))
    assert graph.max_depth() == graph.num_layers, [u.reason for u in graph.unsupported]
    (q,) = [g for g in graph.groups.values() if g.repeat_of is not None]
    k = graph.groups[q.repeat_of[0]]
    assert (q.size, q.attention_heads, q.repeat_of[1]) == (16, 4, 4 // kv_heads)
    assert (k.size, k.attention_heads, k.rotary) == (4 * kv_heads, kv_heads, True)
    pair = [tiny(arch, 0, "dynamo"), tiny(arch, 1, "dynamo")] if kv_heads > 1 else [tiny(arch, 0, "dynamo")] * 2
    result = onnxzip.zip_models(*pair, token_calib(arch), method="zipit", params={"alpha": 0.3, "beta": 0.125},
                                stop_at="all", tasks=["a", "b"])
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(pair[0])).graph.initializer}
    for t in result.model.graph.initializer:
        if t.name in shapes and len(t.dims) == 2:
            assert tuple(t.dims) == shapes[t.name]  # the key/value projections keep their heads
    (got,) = run(result.model, example_feeds(arch, 3, seed=4))
    assert got.shape == (3, 16, 32) and np.isfinite(got).all()
    # the repeat: merged query channel (g, i, c) takes from key channel (g, c) of every model, repeat i only
    p = np.arange(36.0).reshape(6, 6)
    r = repeat_matrix(p, heads=2, repeats=2)
    for (g, i, c), (h, j, e) in [((0, 1, 2), (1, 1, 0)), ((1, 0, 1), (0, 1, 1)), ((1, 1, 0), (1, 1, 2))]:
        assert r[(g * 2 + i) * 3 + c, (h * 2 + j) * 3 + e] == (p[g * 3 + c, h * 3 + e] if i == j else 0)


def test_rotary_pairs_turned_by_any_angle_are_turned_back(tiny, token_calib, tmp_path):
    """Rotary embeddings turn channels i and i + d/2 of every head together, so turning q's and k's
    pairs by fixed angles (any angle per head and pair) leaves the model's function unchanged; a
    zip of the model with such a copy finds the angles and gives the model back."""
    from scipy.linalg import block_diag

    from onnxzip.merge import GroupMerge, Merges
    from onnxzip.split import build_zipped_model

    path = tiny("llama", exporter="dynamo")
    graph = load_layer_graph(path)
    (g,) = [g for g in graph.groups.values() if g.rotary]
    assert g.rotary_pairs and g.attention_heads == 2
    h = g.size // g.attention_heads // 2
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(g.attention_heads):
        c, s = np.cos(a := rng.uniform(-np.pi, np.pi, h)), np.sin(a)
        blocks.append(np.block([[np.diag(c), -np.diag(s)], [np.diag(s), np.diag(c)]]))
    turn = block_diag(*blocks)
    merges = Merges({gid: GroupMerge(np.eye(gr.size), np.eye(gr.size), fixed=gr.output) for gid, gr in graph.groups.items()})
    merges[g.gid] = GroupMerge(turn, turn.T)
    turned, _ = build_zipped_model([graph], merges, graph.num_layers, ["model"])
    onnx.save(turned, tmp_path / "turned.onnx")
    x = example_feeds("llama", 6, seed=8)
    want = run(path, x)[0]
    assert relative_error(run(turned, x)[0], want) < 1e-5
    assert not np.allclose(numpy_weights(turned, graph, g.gid), numpy_weights(onnx.load(str(path)), graph, g.gid))
    result = onnxzip.zip_models(path, tmp_path / "turned.onnx", token_calib("llama"), method="zipit",
                                params={"beta": 0.0}, do_repair=False, stop_at="all", tasks=["a", "b"])
    for got in run(result.model, x):
        assert relative_error(got, want) < 1e-4


def numpy_weights(model, graph, gid):
    """The weight of the first layer that writes group ``gid``."""
    from onnx import numpy_helper

    layer = graph.layers[graph.groups[gid].producers[0]]
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == layer.weight)
