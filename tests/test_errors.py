"""Every bad input gets one clear line, exit code 1, the right exception, and no output file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import onnxzip
from cli.main import app
from onnxzip.errors import (
    ArchitectureMismatchError, CalibrationDataError, ModelLoadError, OnnxZipError, OptionError, OutputPathError,
    UnsupportedOpError,
)
from tests.onnx_builders import mlp, random_mlp_weights

runner = CliRunner()


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(mlp(random_mlp_weights([10, 8, 6, 3], 0)), a)
    onnx.save(mlp(random_mlp_weights([10, 8, 6, 3], 1)), b)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(80, 10)).astype(np.float32))
    return a, b, data


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("error:"), text
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1 or all(w in text for w in words), text
    for w in words:
        assert w in text, (w, text)


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


CASES = {
    "missing model": (lambda t, a, b, d: (t / "nope.onnx", b, d), ModelLoadError, ["no such file"]),
    "not onnx": (lambda t, a, b, d: (_write(t / "x.onnx", b"hello world"), b, d), ModelLoadError, ["not a readable ONNX"]),
    "truncated": (lambda t, a, b, d: (_write(t / "x.onnx", a.read_bytes()[:60]), b, d), ModelLoadError, ["ONNX"]),
    "empty file": (lambda t, a, b, d: (_write(t / "x.onnx", b""), b, d), ModelLoadError, ["empty"]),
    "architectures differ": (lambda t, a, b, d: (a, _save(t / "c.onnx", mlp(random_mlp_weights([10, 7, 6, 3], 2))), d), ArchitectureMismatchError, ["layer 1", "A ", "B "]),
    "input shapes differ": (lambda t, a, b, d: (a, _save(t / "c.onnx", mlp(random_mlp_weights([9, 8, 6, 3], 2))), d), ArchitectureMismatchError, ["input"]),
    "missing keys": (lambda t, a, b, d: (a, b, save_npz(t / "k.npz", p=np.zeros((4, 10), np.float32), q=np.zeros((4, 10), np.float32))), CalibrationDataError, ["missing"]),
    "wrong shape": (lambda t, a, b, d: (a, b, save_npz(t / "s.npz", x=np.zeros((4, 11), np.float32))), CalibrationDataError, ["shape"]),
    "wrong dtype": (lambda t, a, b, d: (a, b, save_npz(t / "s.npz", x=np.array([["a"] * 10] * 4))), CalibrationDataError, ["dtype"]),
    "nan": (lambda t, a, b, d: (a, b, save_npz(t / "n.npz", x=np.full((4, 10), np.nan, np.float32))), CalibrationDataError, ["NaN"]),
    "no samples": (lambda t, a, b, d: (a, b, save_npz(t / "e.npz", x=np.zeros((0, 10), np.float32))), CalibrationDataError, ["no samples"]),
    "data not npz": (lambda t, a, b, d: (a, b, _write(t / "d.npz", b"nope")), CalibrationDataError, [".npz"]),
    "data missing": (lambda t, a, b, d: (a, b, t / "none.npz"), CalibrationDataError, ["no such file"]),
}


def _write(path, data):
    path.write_bytes(data)
    return path


def _save(path, model):
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, pair, tmp_path):
    a, b, data = pair
    make, exc, words = CASES[case]
    ma, mb, d = make(tmp_path, a, b, data)
    out = tmp_path / "out.onnx"
    with pytest.raises(exc):
        onnxzip.zip_models(str(ma), str(mb), str(d), output=str(out))
    assert not out.exists()
    result = cli("zip", ma, mb, "--data", d, "-o", out)
    assert_one_line_error(result, *words)
    assert not out.exists()
    verbose = cli("--verbose", "zip", ma, mb, "--data", d, "-o", out)
    assert isinstance(verbose.exception, OnnxZipError)


def test_missing_external_data(tmp_path, pair):
    a, b, data = pair
    model = onnx.load(a)
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="external data"):
        onnxzip.zip_models(tmp_path / "ext.onnx", b, data)
    assert_one_line_error(cli("zip", tmp_path / "ext.onnx", b, "-d", data, "-o", tmp_path / "o.onnx"), "external data")


def test_external_data_outside_the_folder_is_refused(tmp_path, pair):
    a, b, data = pair
    model = onnx.load(a)
    sub = tmp_path / "sub"
    sub.mkdir()
    onnx.save(model, tmp_path / "secret.onnx", save_as_external_data=True, location="secret.data", size_threshold=0)
    shutil.move(tmp_path / "secret.onnx", sub / "m.onnx")
    m = onnx.load(sub / "m.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.data"
    onnx.save(m, sub / "m.onnx")
    with pytest.raises(ModelLoadError, match="outside"):
        onnxzip.zip_models(sub / "m.onnx", b, data)


@pytest.mark.parametrize("args,exc,word", [
    (["--method", "nope"], OptionError, "unknown matching method"),
    (["--beta", "1.5"], OptionError, "out of range"),
    (["--stop-at", "99"], OptionError, "out of range"),
    (["--stop-at", "deep"], OptionError, "--stop-at"),
    (["--method", "permute", "--alpha", "0.5"], OptionError, "takes no parameter"),
    (["--tasks", "a,a"], OptionError, "must differ"),
    (["--batch-size", "0"], OptionError, "batch-size"),
])
def test_bad_options(pair, tmp_path, args, exc, word):
    a, b, data = pair
    out = tmp_path / "o.onnx"
    assert_one_line_error(cli("zip", a, b, "-d", data, "-o", out, *args), word)
    assert not out.exists()


def test_output_path_problems(pair, tmp_path):
    a, b, data = pair
    with pytest.raises(OutputPathError):
        onnxzip.zip_models(a, b, data, output=tmp_path / "missing" / "o.onnx")
    before = a.read_bytes()
    with pytest.raises(OutputPathError):
        onnxzip.zip_models(a, b, data, output=a)
    assert a.read_bytes() == before
    assert_one_line_error(cli("zip", a, b, "-d", data, "-o", a), "input")
    assert_one_line_error(cli("zip", a, b, "-d", data, "-o", tmp_path / "missing" / "o.onnx"), "does not exist")


def _blocked_model(seed):
    """A dense layer, then an op that mixes channels (LpNormalization), then two more layers."""
    rng = np.random.default_rng(seed)
    w = [rng.normal(size=s).astype(np.float32) for s in ((8, 10), (6, 8), (3, 6))]
    inits = [numpy_helper.from_array(x, f"w{k}") for k, x in enumerate(w)]
    nodes = [
        helper.make_node("Gemm", ["x", "w0"], ["h0"], transB=1, name="d0"),
        helper.make_node("LpNormalization", ["h0"], ["n0"], axis=1, name="mix"),
        helper.make_node("Gemm", ["n0", "w1"], ["h1"], transB=1, name="d1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="r1"),
        helper.make_node("Gemm", ["r1", "w2"], ["logits"], transB=1, name="d2"),
    ]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_unsupported_op_before_the_depth_names_it(tmp_path, pair):
    _, _, data = pair
    a, b = _save(tmp_path / "a.onnx", _blocked_model(0)), _save(tmp_path / "b.onnx", _blocked_model(1))
    with pytest.raises(UnsupportedOpError, match="LpNormalization") as e:
        onnxzip.zip_models(a, b, data)
    assert "--stop-at 0" in str(e.value)
    r = onnxzip.zip_models(a, b, data, stop_at=0)  # sharing nothing is still possible
    assert [o.name for o in r.model.graph.output] == ["a/logits", "b/logits"]
    assert_one_line_error(cli("zip", a, b, "-d", data, "-o", tmp_path / "o.onnx"), "LpNormalization", "mix")
    info = onnxzip.inspect(a)
    assert info["unsupported"][0]["op_type"] == "LpNormalization"


def test_check_reports_first_difference(pair, tmp_path):
    a, b, _ = pair
    c = _save(tmp_path / "c.onnx", mlp(random_mlp_weights([10, 8, 5, 3], 2)))
    ok = cli("check", a, b)
    assert ok.exit_code == 0 and "zippable" in ok.output
    bad = cli("check", a, c)
    assert bad.exit_code == 1
    assert "layer 2" in bad.output and "A " in bad.output and "B " in bad.output


def test_small_calibration_set_warns(pair, tmp_path):
    a, b, _ = pair
    d = save_npz(tmp_path / "few.npz", x=np.random.default_rng(0).normal(size=(12, 10)).astype(np.float32))
    r = onnxzip.zip_models(a, b, d)
    assert any("calibration samples" in w for w in r.warnings)
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in r.model.graph.initializer)


def test_too_few_samples(pair, tmp_path):
    a, b, _ = pair
    one = save_npz(tmp_path / "one.npz", x=np.zeros((1, 10), np.float32))
    with pytest.raises(CalibrationDataError, match="at least 2"):
        onnxzip.zip_models(a, b, one)
    assert_one_line_error(cli("zip", a, b, "-d", one, "-o", tmp_path / "o.onnx"), "at least 2")


def _two_input_model(names, seed):
    rng = np.random.default_rng(seed)
    w0, w1 = (numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), f"w{k}") for k in range(2))
    nodes = [
        helper.make_node("Gemm", [names[0], "w0"], ["h0"], transB=1, name="d0"),
        helper.make_node("Gemm", [names[1], "w1"], ["h1"], transB=1, name="d1"),
        helper.make_node("Add", ["h0", "h1"], ["logits"], name="add"),
    ]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in names],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], initializer=[w0, w1])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_different_input_names_of_multi_input_models(tmp_path):
    a = _save(tmp_path / "a.onnx", _two_input_model(["x", "y"], 0))
    b = _save(tmp_path / "b.onnx", _two_input_model(["p", "q"], 1))
    d = save_npz(tmp_path / "d.npz", x=np.zeros((8, 3), np.float32), y=np.zeros((8, 3), np.float32))
    with pytest.raises(ArchitectureMismatchError, match="input names differ"):
        onnxzip.zip_models(a, b, d)
    assert_one_line_error(cli("zip", a, b, "-d", d, "-o", tmp_path / "o.onnx"), "input names differ")


def test_opsets_that_cannot_be_reconciled(pair, tmp_path, monkeypatch):
    a, _, data = pair
    b = _save(tmp_path / "b13.onnx", mlp(random_mlp_weights([10, 8, 6, 3], 1), opset=13))

    def refuse(model, target):
        raise RuntimeError("No adapter for op Foo")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    with pytest.raises(ModelLoadError, match="cannot convert from opset 13 to 17"):
        onnxzip.zip_models(a, b, data)


def _channel_mixing_model(seed):
    """Conv, then a local response normalization (no handler: it mixes neighbouring channels),
    a Conv, pooling and a dense layer."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (4, 2, 3, 3)), ("w2", (4, 4, 3, 3)), ("fc", (3, 4)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("LRN", ["r1"], ["n1"], size=3, name="lrn"),
        helper.make_node("Conv", ["n1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1, name="head"),
    ]
    graph = helper.make_graph(nodes, "lrn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inspect_and_check_say_how_deep_a_zip_can_go(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_channel_mixing_model(0), a)
    onnx.save(_channel_mixing_model(1), b)
    r = cli("inspect", a, "--json")
    assert r.exit_code == 0, r.output  # a layer reading a blocked space no longer crashes inspect
    info = json.loads(r.output)
    assert info["max_stop_at"] == 0 and info["unsupported"][0]["node"] == "lrn"
    r = cli("check", a, b)
    assert r.exit_code == 1 and "not zippable: no layer can be shared" in r.output and "'lrn'" in r.output
