"""Cross-framework merging: Keras (tf2onnx) and JAX/Flax (jax2onnx) models zip with torch ones.

Uses only the committed ONNX samples (samples/train_keras_jax.py made them; TensorFlow and JAX are
not needed here) and small graphs written by hand in each exporter's spelling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxzip
from onnxzip.graph.build import build_layer_graph
from onnxzip.graph.compare import conv_geometry, equivalences, first_difference, layer_ops, layer_signature
from onnxzip.graph.spaces import ExpandSpace
from onnxzip.normalize import align_input_layouts, guess_layout
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph, prepare_pair, zip_prepared

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "digits"

# (model a, model b): each Keras/JAX sample with the torch model of the other task, and Keras + JAX.
PAIRS = {
    "mlp-keras+torch": ("keras_mlp_a.onnx", "mlp_b.onnx"),
    "mlp-torch+jax": ("mlp_a.onnx", "jax_mlp_b.onnx"),
    "vgg-keras+torch": ("keras_vgg_a.onnx", "vgg_b.onnx"),
    "vgg-torch+jax": ("vgg_a.onnx", "jax_vgg_b.onnx"),
    "mlp-keras+jax": ("keras_mlp_a.onnx", "jax_mlp_b.onnx"),
}


def run(model, feeds):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    if isinstance(feeds, np.ndarray):
        feeds = {sess.get_inputs()[0].name: feeds}
    return sess.run(None, feeds)


def task_images(n=32, task="a"):
    with np.load(SAMPLES / f"test_{task}.npz") as z:
        return z["input"][:n]




@pytest.fixture(scope="module")
def graphs():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_layer_graph(SAMPLES / name)
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------------
# The committed samples
# ------------------------------------------------------------------------------------------------
def test_manifest_lists_the_cross_framework_pairs():
    import json

    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    for name, (a, b) in PAIRS.items():
        assert manifest[name]["a"] == a and manifest[name]["b"] == b
        assert (SAMPLES / a).exists() and (SAMPLES / b).exists()
    assert "mlp-keras-nhwc+torch" not in manifest  # NHWC input: the npz files are NCHW


@pytest.mark.parametrize("pair", list(PAIRS))
def test_samples_parse_into_the_same_layer_graph(graphs, pair):
    a, b = (graphs(n) for n in PAIRS[pair])
    assert [layer_signature(l) for l in a.layers] == [layer_signature(l) for l in b.layers]
    assert [conv_geometry(a, l) and conv_geometry(a, l)["pads"] for l in a.layers] == \
        [conv_geometry(b, l) and conv_geometry(b, l)["pads"] for l in b.layers]
    assert [layer_ops(a, l) for l in a.layers] == [layer_ops(b, l) for l in b.layers]
    assert first_difference(a, b) is None
    assert a.max_depth() == a.num_layers and b.max_depth() == b.num_layers


def test_exporter_patterns_are_normalized_away(graphs):
    keras, jax = graphs("keras_vgg_a.onnx"), graphs("jax_vgg_b.onnx")
    jops = [n.op_type for n in jax.model.graph.node]
    # jax2onnx: unfolded BatchNormalization, NHWC Transposes, ReduceSum + Div average pool
    assert "BatchNormalization" not in jops and "Transpose" not in jops and "ReduceSum" not in jops
    assert "ReduceMean" in jops
    notes = " | ".join(jax.notes)
    assert "value_info" in notes and "BatchNormalization" in notes and "ReduceSum + Div" in notes
    # tf2onnx: MatMul + Add dense layers, an unused ai.onnx.ml domain
    assert [l.op_type for l in keras.layers][-2:] == ["MatMul", "MatMul"] and all(l.bias for l in keras.layers)
    assert {o.domain for o in keras.model.opset_import} <= {"", "ai.onnx"}
    # the NHWC transposes are gone: the last conv's output is read channel-first, like torch's
    assert [layer_ops(jax, l) for l in jax.layers][4] == ("mean(spatial)", "relu")


def test_check_explains_equivalent_spellings(graphs):
    lines = equivalences(graphs("vgg_a.onnx"), graphs("jax_vgg_b.onnx"))
    text = "\n".join(lines)
    assert "layers 1, 2, 3, 4, 5: A Conv 3x3 pads [1, 1, 1, 1], B Conv 3x3 auto_pad=SAME_UPPER (= pads [1, 1, 1, 1])" in text
    assert "layers 6, 7: A Gemm, kernel [out, in], B Gemm transB=0, kernel [in, out]" in text
    assert "B: folded BatchNormalization (5 into Conv)" in text
    lines = equivalences(graphs("keras_mlp_a.onnx"), graphs("mlp_b.onnx"))
    assert lines[0] == "layers 1, 2, 3: A MatMul + Add, kernel [in, out], B Gemm, kernel [out, in]: same dense kernel, equivalent"


def test_check_says_input_layouts_differ(graphs):
    diff = first_difference(graphs("keras_mlp_a.nhwc.onnx"), graphs("mlp_b.onnx"))
    assert diff.startswith("input layouts differ: A 'input' [1, 16, 16, 1] (NHWC), B 'input' [1, 1, 16, 16] (NCHW)")


@pytest.mark.parametrize("pair", ["mlp-keras+torch", "mlp-torch+jax", "vgg-keras+torch", "vgg-torch+jax"])
def test_cross_framework_zip_gives_one_finite_output_per_task(pair):
    a, b = PAIRS[pair]
    p = prepare_pair(SAMPLES / a, SAMPLES / b, SAMPLES / "calib.npz", tasks=["a", "b"], max_samples=128)
    z = zip_prepared(p, "zipit", {"alpha": 0.5, "beta": 1.0}, None, ["a", "b"])
    assert [o.name for o in z.model.graph.output] == ["a/logits", "b/logits"]
    for task in "ab":
        x = task_images(64, task)
        outs = run(z.model, x)
        assert all(o.shape == (64, 5) and np.isfinite(o).all() for o in outs)
        # each head still knows its own task (the zipped mlp/vgg score about 95%; this is a floor)
        with np.load(SAMPLES / f"test_{task}.npz") as d:
            labels = d["labels"][:64]
        assert (outs["ab".index(task)].argmax(1) == labels).mean() > 0.8


def test_nhwc_export_zips_like_the_nchw_export_of_the_same_weights():
    nhwc = onnx.load(SAMPLES / "keras_mlp_a.nhwc.onnx")
    nchw = onnx.load(SAMPLES / "keras_mlp_a.onnx")
    torch_b = onnx.load(SAMPLES / "mlp_b.onnx")
    assert guess_layout(nhwc, "input") == "NHWC" and guess_layout(torch_b, "input") == "NCHW"
    aligned, notes = align_input_layouts([nhwc, torch_b])  # default: B takes A's layout
    assert notes == ["model B: input 'input' NCHW -> NHWC (a Transpose in front of the model)"]
    x = task_images(16)
    np.testing.assert_array_equal(run(aligned[1], x.transpose(0, 2, 3, 1).copy())[0], run(torch_b, x)[0])
    aligned, notes = align_input_layouts([nhwc, torch_b], "NCHW")
    assert notes == ["model A: input 'input' NHWC -> NCHW (a Transpose in front of the model)"]
    np.testing.assert_array_equal(run(aligned[0], x)[0], run(nchw, x)[0])
    calib = SAMPLES / "calib.npz"
    got = onnxzip.zip_models(aligned[0], aligned[1], calib, tasks=["a", "b"], max_samples=128)
    want = onnxzip.zip_models(nchw, torch_b, calib, tasks=["a", "b"], max_samples=128)
    for g, w in zip(run(got.model, x), run(want.model, x)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_check_aligns_layouts_and_lists_equivalences():
    info = onnxzip.check(str(SAMPLES / "keras_mlp_a.nhwc.onnx"), str(SAMPLES / "mlp_b.onnx"))
    assert info["zippable"] and info["notes"][:2] == [
        "model B: input 'input' NCHW -> NHWC (a Transpose in front of the model)",
        "layers 1, 2, 3: A MatMul + Add, kernel [in, out], B Gemm, kernel [out, in]: same dense kernel, equivalent",
    ]
    assert not any("value_info" in n for n in info["notes"])  # the opset converter's value_info is no exporter's
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["check", str(SAMPLES / "vgg_a.onnx"), str(SAMPLES / "jax_vgg_b.onnx")])
    assert res.exit_code == 0, res.output
    assert "B Conv 3x3 auto_pad=SAME_UPPER (= pads [1, 1, 1, 1]): same padding, equivalent" in res.output
    assert "B Gemm transB=0, kernel [in, out]" in res.output


def test_zip_takes_model_a_layout_and_says_so(tmp_path):
    with np.load(SAMPLES / "calib.npz") as z:
        calib = z["input"][:128]
    nhwc_data = tmp_path / "calib_nhwc.npz"
    np.savez(nhwc_data, input=calib.transpose(0, 2, 3, 1))
    r = onnxzip.zip_models(SAMPLES / "keras_mlp_a.nhwc.onnx", SAMPLES / "mlp_b.onnx", nhwc_data, tasks=["a", "b"])
    assert any(w.startswith("input layout: model B: input 'input' NCHW -> NHWC") for w in r.warnings)
    assert [d.dim_value for d in r.model.graph.input[0].type.tensor_type.shape.dim][1:] == [16, 16, 1]
    want = onnxzip.zip_models(SAMPLES / "keras_mlp_a.onnx", SAMPLES / "mlp_b.onnx", SAMPLES / "calib.npz",
                              tasks=["a", "b"], max_samples=128)
    x = task_images(16)
    for g, w in zip(run(r.model, x.transpose(0, 2, 3, 1).copy()), run(want.model, x)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    p = prepare_pair(SAMPLES / "keras_mlp_a.nhwc.onnx", SAMPLES / "mlp_b.onnx", SAMPLES / "calib.npz",
                     tasks=["a", "b"], max_samples=64, collect=False, input_layout="NCHW")
    assert p.warnings[0].startswith("input layout: model A: input 'input' NHWC -> NCHW")


# ------------------------------------------------------------------------------------------------
# Permuted copies: the function survives, and zipping with it gives the model back
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["keras_mlp_a.onnx", "keras_vgg_a.onnx", "jax_mlp_b.onnx", "jax_vgg_b.onnx"])
def test_permuting_a_keras_or_jax_model_preserves_its_outputs(graphs, name):
    graph = graphs(name)
    permuted = permute_model(graph, random_permutations(graph, seed=11))
    x = task_images(16)
    np.testing.assert_allclose(run(permuted, x)[0], run(SAMPLES / name, x)[0], atol=1e-4, rtol=1e-4)


def _torch_spelled_mlp(graph) -> onnx.ModelProto:
    """The weights of a (normalized) dense-only model, rewritten the way torch exports them."""
    inits = {t.name: numpy_helper.to_array(t) for t in graph.model.graph.initializer}
    nodes = [helper.make_node("Flatten", ["input"], ["h0"], axis=1, name="/flatten/Flatten")]
    tensors = []
    for k, layer in enumerate(graph.layers):
        w = np.moveaxis(inits[layer.weight], (layer.w_out_axis, layer.w_in_axis), (0, 1))
        tensors += [numpy_helper.from_array(np.ascontiguousarray(w), f"fc{k}.weight"),
                    numpy_helper.from_array(inits[layer.bias], f"fc{k}.bias")]
        last = k == len(graph.layers) - 1
        out = "logits" if last else f"g{k}"
        nodes.append(helper.make_node("Gemm", [f"h{k}", f"fc{k}.weight", f"fc{k}.bias"], [out], transB=1, name=f"/fc{k}/Gemm"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{k + 1}"], name=f"/relu{k}/Relu"))
    g = helper.make_graph(nodes, "torch_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])], initializer=tensors)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_zipping_keras_with_a_permuted_torch_copy_recovers_it(graphs):
    keras = graphs("keras_mlp_a.onnx")
    torch_copy = _torch_spelled_mlp(keras)
    x = task_images(16)
    want = run(SAMPLES / "keras_mlp_a.onnx", x)[0]
    np.testing.assert_allclose(run(torch_copy, x)[0], want, atol=1e-5, rtol=1e-5)
    tgraph = load_layer_graph(torch_copy)
    permuted = permute_model(tgraph, random_permutations(tgraph, seed=5))
    r = onnxzip.zip_models(SAMPLES / "keras_mlp_a.onnx", permuted, SAMPLES / "calib.npz", method="permute",
                           do_repair=False, tasks=["a", "b"], max_samples=128)
    for got in run(r.model, x):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_zipping_jax_vgg_with_its_permuted_self_recovers_it(graphs, tmp_path):
    graph = graphs("jax_vgg_b.onnx")
    other = tmp_path / "permuted.onnx"
    onnx.save(permute_model(graph, random_permutations(graph, seed=2)), other)
    r = onnxzip.zip_models(SAMPLES / "jax_vgg_b.onnx", other, SAMPLES / "calib.npz", method="permute",
                           do_repair=False, tasks=["a", "b"], max_samples=64)
    # images the statistics saw: a channel that never fires on them may be matched to any other such channel
    with np.load(SAMPLES / "calib.npz") as z:
        x = z["input"][:16]
    want = run(SAMPLES / "jax_vgg_b.onnx", x)[0]
    for got in run(r.model, x):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Hand-written spellings of one conv net: torch (NCHW flatten, pads, GAP) vs Keras/JAX
# ------------------------------------------------------------------------------------------------
C, H, W, HIDDEN = 6, 5, 5, 8


def conv_weights(seed):
    rng = np.random.default_rng(seed)
    return dict(
        w=rng.normal(size=(C, 2, 3, 3)).astype(np.float32) / 4, b=rng.normal(size=C).astype(np.float32) * 0.1,
        fc=rng.normal(size=(C, H, W, HIDDEN)).astype(np.float32) / 12,  # [c, h, w, out]
        fcb=rng.normal(size=HIDDEN).astype(np.float32) * 0.1,
        out=rng.normal(size=(HIDDEN, 3)).astype(np.float32) / 3, outb=np.zeros(3, np.float32),
    )


def conv_flatten_model(p, spelling: str) -> onnx.ModelProto:
    """x [N, 2, 5, 5] -> Conv 3x3 -> Relu -> flatten -> dense -> Relu -> dense.

    "torch": pads=[1,1,1,1], Relu, Flatten (C, H, W order), Gemm transB=1.
    "jax": auto_pad=SAME_UPPER, Transpose to NHWC, Relu, Reshape (H, W, C order), Gemm transB=0.
    "keras": pads, Transpose to NHWC, Relu, Reshape with a Shape/Gather/Concat target, MatMul + Add.
    """
    inits = [numpy_helper.from_array(p["w"], "w"), numpy_helper.from_array(p["b"], "b")]
    if spelling == "torch":
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                 helper.make_node("Relu", ["c"], ["r"], name="relu"),
                 helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten")]
        fc = p["fc"].reshape(C * H * W, HIDDEN).T.copy()  # [out, c*h*w]
        inits += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(p["fcb"], "fcb"),
                  numpy_helper.from_array(p["out"].T.copy(), "out"), numpy_helper.from_array(p["outb"], "outb")]
        nodes += [helper.make_node("Gemm", ["f", "fc", "fcb"], ["d"], transB=1, name="fc"),
                  helper.make_node("Relu", ["d"], ["dr"], name="relu2"),
                  helper.make_node("Gemm", ["dr", "out", "outb"], ["logits"], transB=1, name="head")]
    else:
        fc = p["fc"].transpose(1, 2, 0, 3).reshape(H * W * C, HIDDEN).copy()  # [h*w*c, out]
        conv = (helper.make_node("Conv", ["x", "w", "b"], ["c"], auto_pad="SAME_UPPER", name="conv") if spelling == "jax"
                else helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"))
        nodes = [conv, helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1], name="to_nhwc"),
                 helper.make_node("Relu", ["t"], ["r"], name="relu")]
        if spelling == "jax":
            inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "shape"))
            nodes.append(helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"))
        else:
            inits += [numpy_helper.from_array(np.array([0], np.int64), "i0"),
                      numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
            nodes += [helper.make_node("Shape", ["r"], ["s"], name="shape"),
                      helper.make_node("Gather", ["s", "i0"], ["n"], axis=0, name="batch"),
                      helper.make_node("Concat", ["n", "minus1"], ["target"], axis=0, name="target"),
                      helper.make_node("Reshape", ["r", "target"], ["f"], name="flatten")]
        inits += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(p["fcb"], "fcb"),
                  numpy_helper.from_array(p["out"], "out"), numpy_helper.from_array(p["outb"], "outb")]
        if spelling == "jax":
            nodes += [helper.make_node("Gemm", ["f", "fc", "fcb"], ["d"], transB=0, name="fc"),
                      helper.make_node("Relu", ["d"], ["dr"], name="relu2"),
                      helper.make_node("Gemm", ["dr", "out", "outb"], ["logits"], transB=0, name="head")]
        else:
            nodes += [helper.make_node("MatMul", ["f", "fc"], ["m"], name="fc/MatMul"),
                      helper.make_node("Add", ["m", "fcb"], ["d"], name="fc/BiasAdd"),
                      helper.make_node("Relu", ["d"], ["dr"], name="relu2"),
                      helper.make_node("MatMul", ["dr", "out"], ["m2"], name="head/MatMul"),
                      helper.make_node("Add", ["m2", "outb"], ["logits"], name="head/BiasAdd")]
    g = helper.make_graph(nodes, spelling, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, H, W])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def conv_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("xf") / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).random((96, 2, H, W)).astype(np.float32))
    return path


def xs(n=8, seed=3):
    return np.random.default_rng(seed).random((n, 2, H, W)).astype(np.float32)


@pytest.mark.parametrize("spelling", ["jax", "keras"])
def test_spellings_compute_the_same_function(spelling):
    p = conv_weights(0)
    np.testing.assert_allclose(run(conv_flatten_model(p, spelling), xs())[0], run(conv_flatten_model(p, "torch"), xs())[0],
                               atol=1e-5, rtol=1e-5)


def test_nhwc_flatten_unmerges_with_kron_identity_hw_u():
    """Unnormalized NHWC flatten: ExpandSpace(outer=H*W, inner=1), so the unmerge is kron(I_HW, U)."""
    model = conv_flatten_model(conv_weights(0), "jax")
    graph = build_layer_graph(model)  # parsed as written: no normalization
    fc = graph.layers[1]
    assert isinstance(fc.in_space, ExpandSpace) and (fc.in_space.outer, fc.in_space.inner) == (H * W, 1)
    permuted = permute_model(graph, random_permutations(graph, seed=1))
    np.testing.assert_allclose(run(permuted, xs())[0], run(model, xs())[0], atol=1e-5, rtol=1e-5)
    # torch's C x H x W flatten is the other kron order
    tgraph = build_layer_graph(conv_flatten_model(conv_weights(0), "torch"))
    assert (tgraph.layers[1].in_space.outer, tgraph.layers[1].in_space.inner) == (1, H * W)


@pytest.mark.parametrize("spelling", ["jax", "keras"])
def test_normalized_spellings_give_the_torch_layer_graph(spelling):
    p = conv_weights(0)
    want = load_layer_graph(conv_flatten_model(p, "torch"))
    got = load_layer_graph(conv_flatten_model(p, spelling))
    assert [layer_signature(l) for l in got.layers] == [layer_signature(l) for l in want.layers]
    assert first_difference(got, want) is None
    assert "Transpose" not in [n.op_type for n in got.model.graph.node]
    assert any("Flatten with its kernel rows permuted" in n for n in got.notes)


@pytest.mark.parametrize("spelling", ["jax", "keras"])
def test_spellings_zip_to_the_same_model(conv_calib, spelling):
    pa, pb = conv_weights(1), conv_weights(2)
    x = xs(16)
    want = onnxzip.zip_models(conv_flatten_model(pa, "torch"), conv_flatten_model(pb, "torch"), conv_calib, tasks=["a", "b"])
    same = onnxzip.zip_models(conv_flatten_model(pa, spelling), conv_flatten_model(pb, spelling), conv_calib, tasks=["a", "b"])
    mixed = onnxzip.zip_models(conv_flatten_model(pa, "torch"), conv_flatten_model(pb, spelling), conv_calib, tasks=["a", "b"])
    for z in (same, mixed):
        for got, w in zip(run(z.model, x), run(want.model, x)):
            np.testing.assert_allclose(got, w, atol=1e-4, rtol=1e-4)


def _conv_net(seed, stride=1, pad="pads", act="Relu", pool="gap") -> onnx.ModelProto:
    """x [N, 2, 8, 8] -> Conv 3x3 (stride, padding spelling) -> act -> pool -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(C, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(3, C)).astype(np.float32), "fc")]
    conv = helper.make_node("Conv", ["x", "w"], ["c"], strides=[stride, stride], name="conv",
                            **({"pads": [1, 1, 1, 1]} if pad == "pads" else {"auto_pad": pad}))
    nodes = [conv]
    if act == "Relu6":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="act"))
    else:
        nodes.append(helper.make_node(act, ["c"], ["r"], name="act"))
    if pool == "gap":
        nodes += [helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
                  helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten")]
    elif pool == "sum_div":  # jax2onnx's mean over H, W
        hw = (8 // stride) ** 2
        inits += [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"), numpy_helper.from_array(np.array(hw, np.float32), "hw")]
        nodes += [helper.make_node("ReduceSum", ["r", "axes"], ["s"], keepdims=0, name="sum"),
                  helper.make_node("Div", ["s", "hw"], ["f"], name="div")]
    else:
        nodes += [helper.make_node("GlobalMaxPool", ["r"], ["p"], name="gmp"),
                  helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten")]
    nodes.append(helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1, name="fc"))
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_same_upper_and_sum_div_are_equivalent_spellings(tmp_path):
    torch_like = load_layer_graph(_conv_net(0))
    jax_like = load_layer_graph(_conv_net(0, pad="SAME_UPPER", pool="sum_div"))
    assert first_difference(torch_like, jax_like) is None
    assert equivalences(torch_like, jax_like)[0].startswith(
        "layer 1: A Conv 3x3 pads [1, 1, 1, 1], B Conv 3x3 auto_pad=SAME_UPPER (= pads [1, 1, 1, 1])")
    path = tmp_path / "c.npz"
    np.savez(path, x=np.random.default_rng(0).random((64, 2, 8, 8)).astype(np.float32))
    x = np.random.default_rng(1).random((8, 2, 8, 8)).astype(np.float32)
    a = onnxzip.zip_models(_conv_net(0), _conv_net(1), path, tasks=["a", "b"])
    b = onnxzip.zip_models(_conv_net(0), _conv_net(1, pad="SAME_UPPER", pool="sum_div"), path, tasks=["a", "b"])
    for got, want in zip(run(b.model, x), run(a.model, x)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs,words", [
    ({"stride": 2, "pad": "SAME_UPPER"}, "different padding"),  # SAME_UPPER at stride 2 pads [0, 0, 1, 1]
    ({"stride": 2}, "different strides"),
    ({"act": "Relu6"}, "after it A applies {mean(spatial), relu}, B applies {mean(spatial), relu6}"),
    ({"pool": "gmp"}, "B applies {max(spatial), relu}: different activations or pooling"),
])
def test_check_names_real_differences_in_layer_terms(kwargs, words):
    a = load_layer_graph(_conv_net(0, stride=kwargs.get("stride", 1)) if "pad" in kwargs else _conv_net(0))
    b = load_layer_graph(_conv_net(0, **kwargs))
    diff = first_difference(a, b)
    assert diff is not None and diff.startswith("layer 1 (#1)") and words in diff, diff
