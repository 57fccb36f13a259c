"""Tests for onnxzip.cost: parameters, FLOPs of hand-built graphs, latency measurement."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxzip.cost import FlopReport, count_flops, count_params, measure_latency
from onnxzip.errors import CalibrationDataError, ModelLoadError, OptionError
from tests.onnx_builders import graph_model

RNG = np.random.default_rng(0)


def _init(name, *shape, dtype=np.float32):
    return numpy_helper.from_array(RNG.normal(size=shape).astype(dtype), name)


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _single(node, in_shape, out_shape, initializers=()):
    inputs, outputs = [_vi(node.input[0], in_shape)], [_vi(node.output[0], out_shape)]
    return graph_model([node], inputs, outputs, initializers)


def test_conv_with_bias():
    # x [N,3,8,8] -> Conv 4x3x3x3, pads 1 -> [1,4,8,8] = 256 outputs, each 27 MACs + 1 bias add
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1])
    model = _single(node, ["N", 3, 8, 8], ["N", 4, 8, 8], [_init("W", 4, 3, 3, 3), _init("B", 4)])
    report = count_flops(model)
    assert report.total == 2 * 256 * 27 + 256
    assert report.by_op_type == {"Conv": 14080}
    assert report.unknown == [] and report.batch == 1


def test_grouped_conv_without_bias():
    # depthwise: group 3, W [3,1,3,3], no pads: out [1,3,6,6] = 108, each 9 MACs
    node = helper.make_node("Conv", ["x", "W"], ["y"], group=3)
    model = _single(node, ["N", 3, 8, 8], ["N", 3, 6, 6], [_init("W", 3, 1, 3, 3)])
    assert count_flops(model).total == 2 * 108 * 9


def test_conv_transpose():
    # x [N,4,4,4], W [4,2,3,3] -> out [1,2,6,6]; each of 64 inputs scatters 2*9 MACs; bias: 72 adds
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"])
    model = _single(node, ["N", 4, 4, 4], ["N", 2, 6, 6], [_init("W", 4, 2, 3, 3), _init("B", 2)])
    assert count_flops(model).total == 2 * 64 * 2 * 9 + 72


def test_gemm_with_bias():
    # [1,10] x [10,5] (transB: weight [5,10]) + bias: 2*1*10*5 + 5
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
    model = _single(node, ["N", 10], ["N", 5], [_init("W", 5, 10), _init("B", 5)])
    assert count_flops(model).total == 105
    assert count_params(model) == 55


def test_matmul_rank3_and_batched():
    # x [N,7,6] @ W [6,4] -> [1,7,4]: 2*7*6*4
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    model = _single(node, ["N", 7, 6], ["N", 7, 4], [_init("W", 6, 4)])
    assert count_flops(model).total == 2 * 7 * 6 * 4
    # batched, two activations: a [N,3,7,6] @ b [N,3,6,4] -> 3 matmuls per sample
    mm = helper.make_node("MatMul", ["a", "b"], ["y"])
    inputs = [_vi("a", ["N", 3, 7, 6]), _vi("b", ["N", 3, 6, 4])]
    model = graph_model([mm], inputs, [_vi("y", ["N", 3, 7, 4])])
    assert count_flops(model).total == 3 * 2 * 7 * 6 * 4


def test_relu_and_global_average_pool():
    relu = helper.make_node("Relu", ["x"], ["y"])
    assert count_flops(_single(relu, ["N", 16], ["N", 16])).total == 16
    gap = helper.make_node("GlobalAveragePool", ["x"], ["y"])
    assert count_flops(_single(gap, ["N", 4, 8, 8], ["N", 4, 1, 1])).total == 4 * 8 * 8


def test_small_cnn_breakdown_and_shape_only_ops():
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "W2", "B2"], ["y"], transB=1),
        helper.make_node("Softmax", ["y"], ["s"]),
    ]
    model = graph_model(
        nodes,
        [_vi("x", ["batch", 3, 8, 8])],
        [_vi("s", ["batch", 10])],
        [_init("W1", 4, 3, 3, 3), _init("B1", 4), _init("W2", 10, 4), _init("B2", 10)],
    )
    report = count_flops(model)
    expected = {
        "Conv": 2 * 256 * 27 + 256,
        "Relu": 256,
        "MaxPool": 4 * 4 * 4 * 4,  # 64 outputs x 2x2 kernel
        "GlobalAveragePool": 64,
        "Gemm": 2 * 4 * 10 + 10,
        "Softmax": 30,
        "Flatten": 0,
    }
    assert report.by_op_type == expected
    assert report.total == sum(expected.values())
    assert list(report.by_op_type)[0] == "Conv"  # largest first
    assert report.by_node["Relu#1"] == 256
    assert json.loads(json.dumps(report.to_dict()))["total"] == report.total


def test_elementwise_and_normalization_rates():
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Add", ["bn", "x"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["y"]),
    ]
    inits = [_init(n, 4) for n in "sbm"] + [numpy_helper.from_array(np.ones(4, np.float32), "v")]
    model = graph_model(nodes, [_vi("x", ["N", 4, 2, 2])], [_vi("y", ["N", 4, 2, 2])], inits)
    assert count_flops(model).by_op_type == {"BatchNormalization": 32, "Add": 16, "Sigmoid": 16}


def test_static_batch_is_divided_out():
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
    model = _single(node, [4, 10], [4, 5], [_init("W", 5, 10), _init("B", 5)])
    report = count_flops(model)
    assert report.batch == 4 and report.total == 105


def test_unknown_shapes_fall_back_and_named_dims():
    relu = helper.make_node("Relu", ["x"], ["y"], name="act")
    model = _single(relu, ["N", "L"], ["N", "L"])
    report = count_flops(model)
    assert report.total == 0 and report.unknown == ["act"]
    assert count_flops(model, dims={"L": 10}).total == 10


def _sliced_table_model(table_rows: int = 16):
    """x [N, 8] + P[:, :x.shape[1]] (a Slice whose end is computed from Shape, as in a Hugging Face BERT's
    position ids): onnx shape inference leaves the slice and everything after it unknown."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["n"]),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["end"]),
        helper.make_node("Slice", ["P", "zero1", "end", "one1"], ["p"]),
        helper.make_node("Add", ["x", "p"], ["y"], name="add"),
        helper.make_node("MatMul", ["y", "W"], ["z"], name="mm"),
    ]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "zero1"),
             numpy_helper.from_array(np.array([1], np.int64), "one1"),
             _init("P", 1, table_rows), _init("W", 8, 16)]
    return graph_model(nodes, [_vi("x", ["N", 8])], [_vi("z", ["N", 16])], inits)


def test_shapes_inference_cannot_know_are_measured_with_onnxruntime(tmp_path):
    model = _sliced_table_model()
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.value_info}
    assert not all(d.HasField("dim_value") for d in shapes["y"].dim)  # the case: inference cannot say
    report = count_flops(model)
    assert report.unknown == [] and report.by_node["add"] == 8 and report.by_node["mm"] == 2 * 16 * 8
    # the same from a file whose tensors are all in external data (small ones are read back)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    assert count_flops(path).total == report.total
    # in memory with the external data not loaded, the run cannot happen: unknown, counted 0, as before
    unloaded = onnx.load(str(path), load_external_data=False)
    assert count_flops(unloaded).unknown == ["add", "mm"]


def test_uncounted_op_types_are_listed():
    node = helper.make_node("Hardmax", ["x"], ["y"])
    report = count_flops(_single(node, ["N", 5], ["N", 5]))
    assert report.total == 0 and report.uncounted == {"Hardmax": 1} and report.unknown == []


def test_caller_model_is_not_mutated():
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)
    model = _single(node, ["N", 10], ["N", 5], [_init("W", 5, 10)])
    before = model.SerializeToString()
    count_flops(model)
    count_params(model)
    assert model.SerializeToString() == before


def test_params_count_shared_initializer_once():
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "B"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W"], ["h3"]),  # W used again
        helper.make_node("Reshape", ["h3", "shape"], ["y"]),
    ]
    inits = [
        _init("W", 4, 4),
        _init("B", 4),
        _init("unused", 100),
        numpy_helper.from_array(np.array([-1, 4], np.int64), "shape"),  # not a float parameter
    ]
    model = graph_model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], inits)
    assert count_params(model) == 16 + 4
    assert count_flops(model).by_op_type == {"MatMul": 2 * 2 * 16, "Add": 4, "Reshape": 0}


def test_external_data_path(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    model = graph_model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 4, 8, 8])],
                   [_init("W", 4, 3, 3, 3), _init("B", 4)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    assert count_params(path) == 112
    assert count_flops(str(path)).total == 14080 + 256
    unloaded = onnx.load(path, load_external_data=False)
    assert count_flops(unloaded).total == 14080 + 256
    x = np.zeros((2, 3, 8, 8), np.float32)
    assert measure_latency(path, {"x": x}, warmup=0, repeats=2)["batch"] == 2


def test_missing_or_corrupt_model(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        count_params(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff garbage")
    with pytest.raises(ModelLoadError):
        count_flops(bad)


def test_measure_latency():
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)
    model = _single(node, ["N", 10], ["N", 5], [_init("W", 5, 10)])
    x = np.zeros((8, 10))  # float64: cast to the model's float32
    stats = measure_latency(model, {"input": x}, warmup=1, repeats=5, intra_op_threads=1)
    assert stats["repeats"] == 5 and stats["batch"] == 8
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["max_ms"]
    assert stats["providers"] == ["CPUExecutionProvider"]
    with pytest.raises(OptionError, match="repeats"):
        measure_latency(model, x, repeats=0)
    static = _single(node, [4, 10], [4, 5], [_init("W", 5, 10)])
    with pytest.raises(CalibrationDataError, match="static batch of 4"):
        measure_latency(static, x)


def test_report_type():
    model = _single(helper.make_node("Relu", ["x"], ["y"]), ["N", 2], ["N", 2])
    assert isinstance(count_flops(model), FlopReport)
