"""A TorchScript export (dynamic batch) zipped with a dynamo export (static batch) of the same
architecture: the exporters' spellings are equivalent, each model runs at its own batch
constraint, and the zipped model takes any batch where the static model's graph allows it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import onnxzip
from cli.main import app
from onnxzip.batchaxis import release_static_batch
from onnxzip.errors import ArchitectureMismatchError
from onnxzip.normalize import normalize
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph
from tests.tiny_models import images


def run(model, x: np.ndarray) -> list[np.ndarray]:
    """Every output on every row of ``x``, fed in runs of the model's static batch when it has one
    (the last run padded)."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    fixed = sess.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else len(x)
    outs = []
    for s in range(0, len(x), step):
        part = x[s:s + step]
        rows = len(part)
        if rows < step:
            part = np.concatenate([part, np.zeros((step - rows,) + part.shape[1:], part.dtype)])
        outs.append([o[:rows] for o in sess.run(None, {sess.get_inputs()[0].name: part})])
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def batch_of(model: onnx.ModelProto):
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") else d.dim_param


def permuted(path, tmp_path, seed=7):
    graph = load_layer_graph(path)
    out = tmp_path / f"permuted-{seed}.onnx"
    onnx.save(permute_model(graph, random_permutations(graph, seed)), out)
    return out


@pytest.mark.parametrize("arch", ["cnn", "resnet", "vit"])
@pytest.mark.parametrize("method,params", [("permute", {}), ("zipit", {"beta": 0.0})])
@pytest.mark.parametrize("repair", [False, True])
def test_torchscript_zipped_with_a_permuted_dynamo_copy_gives_it_back(tiny, calib, tmp_path, arch, method, params, repair):
    x_path = tiny(arch)  # TorchScript, dynamic batch
    y_path = permuted(tiny(arch, exporter="dynamo", batch=4), tmp_path)  # same weights, static batch 4
    x = images(11, seed=8)  # not a multiple of 4: the zipped model must take any batch
    want = run(x_path, x)[0]
    for a, b in ((x_path, y_path), (y_path, x_path)):
        r = onnxzip.zip_models(a, b, calib, method=method, params=dict(params), do_repair=repair, refit=False,
                               tasks=["a", "b"])
        assert r.stop_at == load_layer_graph(x_path).max_depth() - 1  # every layer but the heads
        assert batch_of(r.model) == "batch", r.warnings
        assert any("static batch 4 released" in w and "takes any batch" in w for w in r.warnings)
        for got in run(r.model, x):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_samples_folded_into_the_head_axis_are_released(tiny, calib, tmp_path):
    """The dynamo export of nn.MultiheadAttention folds the samples into the head axis ([4 * heads,
    L, d]): the Reshapes that spell it infer that axis, and the zipped model takes any batch and
    computes the TorchScript model's function."""
    x_path = tiny("mha")
    y_path = permuted(tiny("mha", exporter="dynamo", batch=4), tmp_path)
    x = images(10, seed=3)
    want = run(x_path, x)[0]
    for a, b in ((x_path, y_path), (y_path, x_path)):
        r = onnxzip.zip_models(a, b, calib, method="zipit", params={"beta": 0.0}, do_repair=False, refit=False,
                               tasks=["a", "b"])
        assert batch_of(r.model) == "batch"
        for got in run(r.model, x):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_graph_that_depends_on_its_static_batch_keeps_it(tiny, tmp_path):
    """The dynamo export of a LLaMA-style decoder with a static batch builds its causal mask for
    that batch: the zipped model takes batches of exactly 4, and still computes the dynamic
    export's function."""
    from tests.tiny_models import example_feeds

    x_path = tiny("llama", exporter="dynamo")
    y_path = permuted(tiny("llama", exporter="dynamo", batch=4), tmp_path)
    calib = tmp_path / "tokens.npz"
    np.savez(calib, **example_feeds("llama", 48, seed=1))
    x = example_feeds("llama", 8, seed=3)
    sess = ort.InferenceSession(str(x_path), providers=["CPUExecutionProvider"])
    want = sess.run(None, x)[0]
    for a, b in ((x_path, y_path), (y_path, x_path)):
        r = onnxzip.zip_models(a, b, calib, method="zipit", params={"beta": 0.0}, do_repair=False, refit=False,
                               tasks=["a", "b"])
        assert batch_of(r.model) == 4
        assert any("depends on its static batch of 4" in w and "exactly 4" in w for w in r.warnings), r.warnings
        zipped = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])
        for half in (slice(0, 4), slice(4, 8)):
            for got in zipped.run(None, {k: v[half] for k, v in x.items()}):
                np.testing.assert_allclose(got, want[half], atol=1e-4, rtol=1e-4)


def test_different_seeds_across_exporters_zip_at_full_depth(tiny, calib):
    a, b = tiny("resnet"), tiny("resnet", 1, exporter="dynamo", batch=4)
    info = onnxzip.check(a, b)
    assert info["zippable"], info["reason"]
    depth = load_layer_graph(a).max_depth()
    assert info["max_stop_at"] == depth
    r = onnxzip.zip_models(a, b, calib, tasks=["a", "b"])
    assert r.stop_at == depth - 1
    assert batch_of(r.model) == "batch"
    outs = run(r.model, images(5, seed=2))
    assert len(outs) == 2 and all(np.isfinite(o).all() and o.shape == (5, 5) for o in outs)


def _without_bias_of_first_conv(path, tmp_path) -> tuple:
    """Two copies of a model: its first Conv's bias set to zero, and the same bias left out (what
    the dynamo exporter's optimizer writes for an all-zero bias)."""
    model, _ = normalize(onnx.load(str(path)))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2])
    bias = next(t for t in model.graph.initializer if t.name == conv.input[2])
    bias.CopyFrom(onnx.numpy_helper.from_array(np.zeros(bias.dims, np.float32), bias.name))
    zero = tmp_path / "zero_bias.onnx"
    onnx.save(model, zero)
    del conv.input[2]
    model.graph.initializer.remove(bias)
    none = tmp_path / "no_bias.onnx"
    onnx.save(model, none)
    return zero, none


def test_a_missing_bias_is_a_zero_bias(tiny, calib, tmp_path):
    zero, none = _without_bias_of_first_conv(tiny("cnn"), tmp_path)
    x = images(9, seed=4)
    want = run(zero, x)[0]
    for a, b in ((zero, permuted(none, tmp_path)), (none, permuted(zero, tmp_path))):
        assert onnxzip.check(a, b)["zippable"]
        r = onnxzip.zip_models(a, b, calib, method="zipit", params={"beta": 0.0}, do_repair=False, refit=False,
                               tasks=["a", "b"])
        for got in run(r.model, x):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_mismatch_names_what_differs(tiny):
    info = onnxzip.check(tiny("cnn"), tiny("resnet", exporter="dynamo", batch=4))
    assert not info["zippable"]
    reason = info["reason"]
    assert reason.startswith("layer 2 (#2): different weight (out, in, kernel) [12, 8, 3, 3] vs [8, 8, 3, 3]; "
                             "output group 1 of 12 channels vs group 1 of 8 channels: A "), reason


def _with_batch(path, tmp_path, batch: int):
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    out = tmp_path / f"batch{batch}.onnx"
    onnx.save(model, out)
    return out


def test_two_different_static_batches_are_a_one_line_error(tiny, calib, tmp_path):
    a = tiny("resnet", exporter="dynamo", batch=4)
    b = _with_batch(a, tmp_path, 2)
    info = onnxzip.check(a, b)
    assert not info["zippable"] and "different static batch sizes" in info["reason"]
    with pytest.raises(ArchitectureMismatchError, match=r"different static batch sizes: A .* 4, B .* 2; re-export"):
        onnxzip.zip_models(a, b, calib, tasks=["a", "b"])
    res = CliRunner().invoke(app, ["zip", str(a), str(b), "--data", str(calib), "-o", str(tmp_path / "z.onnx")])
    assert res.exit_code == 1
    assert "different static batch sizes" in res.output and "Traceback" not in res.output


def test_release_static_batch_checks_its_result(tiny):
    x = images(4, seed=5)
    model, _ = normalize(onnx.load(str(tiny("cnn", exporter="dynamo", batch=4))))
    released, note = release_static_batch(model, {"x": x})
    assert released is not None, note
    assert batch_of(released) == "batch" and "released" in note
    np.testing.assert_allclose(run(released, images(7, seed=6))[0], run(model, images(7, seed=6))[0], atol=1e-5)
    # a class token expanded to the batch at export time: expanded at run time instead
    vit, _ = normalize(onnx.load(str(tiny("vit", exporter="dynamo", batch=4))))
    released, note = release_static_batch(vit, {"x": x})
    assert released is not None and "1 token repeated over the batch now Expands to it" in note, note
    assert [n.op_type for n in released.graph.node].count("Expand") == 1
    np.testing.assert_allclose(run(released, images(6, seed=6))[0], run(vit, images(6, seed=6))[0], atol=1e-5)
    # attention with the samples folded into the head axis: the Reshapes infer that axis
    mha, _ = normalize(onnx.load(str(tiny("mha", exporter="dynamo", batch=4))))
    released, note = release_static_batch(mha, {"x": x})
    assert released is not None and batch_of(released) == "batch", note
    np.testing.assert_allclose(run(released, images(6, seed=6))[0], run(tiny("mha"), images(6, seed=6))[0], atol=1e-5)
    # a causal mask built for the batch: kept
    from tests.tiny_models import example_feeds

    llama, _ = normalize(onnx.load(str(tiny("llama", exporter="dynamo", batch=4))))
    kept, why = release_static_batch(llama, example_feeds("llama", 4, seed=5))
    assert kept is None and "depends on its static batch of 4" in why, why


def test_a_bias_only_the_second_model_has_needs_a_place_in_the_first(tiny, calib, tmp_path):
    """A MatMul without a bias Add cannot take the merged bias of a partner that has one: the
    message says so and what to do; the other order zips."""
    path = tiny("vit")
    graph = load_layer_graph(path)
    layer = next(l for l in graph.layers if l.op_type == "MatMul" and l.bias is not None)
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    add = next(n for n in model.graph.node if n.op_type == "Add" and layer.bias in n.input)
    matmul_out = next(i for i in add.input if i != layer.bias)
    for n in model.graph.node:
        for q, i in enumerate(n.input):
            if i == add.output[0]:
                n.input[q] = matmul_out
    model.graph.node.remove(add)
    none = tmp_path / "no_bias.onnx"
    onnx.save(model, none)
    info = onnxzip.check(none, path)
    assert not info["zippable"]
    assert "has a bias" in info["reason"] and "give the model with the bias first" in info["reason"], info["reason"]
    assert onnxzip.check(path, none)["zippable"]
    r = onnxzip.zip_models(path, none, calib, method="zipit", params={"beta": 0.0}, do_repair=False, refit=False,
                           tasks=["a", "b"])
    assert all(np.isfinite(o).all() for o in run(r.model, images(3, seed=1)))
