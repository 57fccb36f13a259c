"""inspect and check on models the zip cannot pass all the way: they never crash, they name the op that
stops the zip and the deepest --stop-at, and a zip at that depth works (one deeper is refused)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import onnxzip
from cli.main import app
from onnxzip.errors import UnsupportedOpError

runner = CliRunner()


def cli(*args, width: int = 200):
    return runner.invoke(app, [str(a) for a in args], terminal_width=width)


def _conv_then_lrn(seed):
    """conv1 -> conv2 -> a local response normalization (no handler: it mixes neighbouring
    channels) reading conv2's features -> pool -> dense head: conv2's group cannot be zipped, so the
    deepest zip shares conv1 alone."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (4, 2, 3, 3)), ("w2", (4, 4, 3, 3)), ("fc", (3, 4)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("LRN", ["r2"], ["n2"], size=3, name="lrn"),
        helper.make_node("GlobalAveragePool", ["n2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1, name="head"),
    ]
    graph = helper.make_graph(nodes, "lrn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def lrn_pair(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_conv_then_lrn(0), a)
    onnx.save(_conv_then_lrn(1), b)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(40, 2, 5, 5)).astype(np.float32))
    return a, b, data


def test_inspect_prints_the_layers_up_to_the_op_that_stops_the_zip(lrn_pair):
    a, _, _ = lrn_pair
    info = json.loads(cli("inspect", a, "--json").output)
    assert info["num_layers"] == 3 and info["max_stop_at"] == 1
    assert info["limited_by"]["node"] == "lrn" and info["limited_by"]["op_type"] == "LRN"
    assert "no handler" in info["limited_by"]["reason"]
    r = cli("inspect", a)
    assert r.exit_code == 0, r.output
    assert "conv1" in r.output and "conv2" not in r.output and "head" not in r.output  # up to the limit only
    assert "first op the zip cannot pass: LRN 'lrn'" in r.output and "no handler" in r.output
    assert "--stop-at 1 of 3 layers" in r.output
    full = cli("inspect", a, "--all")
    assert full.exit_code == 0 and all(n in full.output for n in ("conv1", "conv2", "head"))
    table = full.output[full.output.index("weight layers"):]
    assert table.index("conv1") < table.index("^ deepest") < table.index("--stop-at 1") < table.index("conv2")


def test_check_reports_the_depth_and_the_zip_reaches_it(lrn_pair):
    a, b, data = lrn_pair
    info = onnxzip.check(a, b)
    assert info["zippable"] and info["max_stop_at"] == 1 and "'lrn'" in info["limited_by"]
    r = cli("check", a, b)
    assert r.exit_code == 0 and "zippable" in r.output and "--stop-at 1" in r.output and "not zippable" not in r.output
    z = onnxzip.zip_models(a, b, data, params={"alpha": 0.3, "beta": 0.125}, stop_at=1)
    assert z.stop_at == 1
    with pytest.raises(UnsupportedOpError, match="lrn"):
        onnxzip.zip_models(a, b, data, params={"alpha": 0.3, "beta": 0.125}, stop_at=2)


def test_inspect_of_a_model_that_zips_fully_says_so(tiny):
    r = cli("inspect", tiny("resnet"))
    assert r.exit_code == 0, r.output
    assert "every layer can be zipped" in r.output and "first op the zip cannot pass" not in r.output
    assert json.loads(cli("inspect", tiny("resnet"), "--json").output)["limited_by"] is None


def _nan_guarded_softmax(path):
    """The committed tiny ViT with its first attention's weights passed through an op onnxzip has
    no handler for: p * Sign(p) after the Softmax (the same weights), so the zip cannot pass the
    attention weights, nor the values multiplied with them."""
    m = onnx.load(str(path))
    soft = next(n for n in m.graph.node if n.op_type == "Softmax")
    p = soft.output[0]
    readers = [n for n in m.graph.node if p in n.input]
    guarded = [helper.make_node("Sign", [p], [p + "_sign"], name="nan_check"),
               helper.make_node("Mul", [p, p + "_sign"], [p + "_safe"], name="nan_guard")]
    for n in readers:
        n.input[list(n.input).index(p)] = p + "_safe"
    at = list(m.graph.node).index(soft) + 1
    for k, n in enumerate(guarded):
        m.graph.node.insert(at + k, n)
    onnx.checker.check_model(m)
    return m


def test_an_op_on_attention_weights_limits_the_depth_to_before_the_attention(tiny, calib, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_nan_guarded_softmax(tiny("vit", 0)), a)
    onnx.save(_nan_guarded_softmax(tiny("vit", 0)), b)  # one committed ViT seed: a self-zip suffices here
    info = onnxzip.inspect(a)
    depth = info["max_stop_at"]
    assert 0 < depth < info["num_layers"]
    assert info["limited_by"]["node"] == "nan_check"
    qkv = [l for l in info["layers"] if l["number"] == depth + 1]
    assert len(qkv) == 3  # the limit falls just before the first attention's q, k and v projections
    r = cli("inspect", a)
    assert r.exit_code == 0 and "Sign 'nan_check'" in r.output and f"--stop-at {depth} of" in r.output
    assert onnxzip.check(a, b)["max_stop_at"] == depth
    z = onnxzip.zip_models(a, b, calib, params={"alpha": 0.3, "beta": 0.125}, stop_at=depth)
    assert [o.name for o in z.model.graph.output] == ["a/logits", "b/logits"]
    with pytest.raises(UnsupportedOpError, match="nan_check"):
        onnxzip.zip_models(a, b, calib, params={"alpha": 0.3, "beta": 0.125}, stop_at=depth + 1)


def test_inspect_and_check_when_no_layer_can_be_shared(tmp_path):
    from tests.test_errors import _channel_mixing_model  # conv1, then an LRN reading conv1's features

    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_channel_mixing_model(0), a)
    onnx.save(_channel_mixing_model(1), b)
    r = cli("inspect", a)
    assert r.exit_code == 0, r.output
    assert "first op the zip cannot pass: LRN 'lrn'" in r.output
    assert "--stop-at 0 of" in r.output and "no layer can be shared" in r.output
    info = onnxzip.check(a, b)
    assert not info["zippable"] and info["max_stop_at"] == 0
    r = cli("check", a, b)
    assert r.exit_code == 1 and r.output.startswith("not zippable")
