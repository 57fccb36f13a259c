"""Tests for onnxzip.evaluate: per-task, joint and ensemble accuracy on tiny hand-built models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxzip.errors import CalibrationDataError, ModelLoadError, OptionError
from onnxzip.evaluate import (
    SHARED_HEAD,
    EnsemblePredictor,
    EvalResult,
    ModelPredictor,
    evaluate,
    evaluate_many,
    load_task_data,
)
from tests.onnx_builders import graph_model


def gemm_model(weight, bias=None, *, batch="N", out_name="logits", in_name="x"):
    """y = x @ weight (+ bias) as one Gemm; weight is [in, out]."""
    weight = np.asarray(weight, np.float32)
    inits = [numpy_helper.from_array(weight, "W")]
    ins = [in_name, "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.float32), "B"))
        ins.append("B")
    return graph_model(
        [helper.make_node("Gemm", ins, [out_name])],
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [batch, weight.shape[0]])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, weight.shape[1]])],
        inits,
    )


def two_head_model(batch="N"):
    """Input x [N, 5]: a/logits = x[:, 0:2], b/logits = x[:, 2:5] (as Gemms with selector weights)."""
    eye = np.eye(5, dtype=np.float32)
    wa, wb = eye[:, :2], eye[:, 2:]
    return graph_model(
        [
            helper.make_node("Gemm", ["x", "Wa"], ["a/logits"]),
            helper.make_node("Gemm", ["x", "Wb"], ["b/logits"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 5])],
        [
            helper.make_tensor_value_info("a/logits", TensorProto.FLOAT, [batch, 2]),
            helper.make_tensor_value_info("b/logits", TensorProto.FLOAT, [batch, 3]),
        ],
        [numpy_helper.from_array(wa, "Wa"), numpy_helper.from_array(wb, "Wb")],
    )


# Hand-built case for the two-head model (see the comments for the expected outcome of every image).
TASK_A_X = np.array(
    [
        [3, 0, 0, 0, 0],  # label 0: right in head a; joint: a's 0.95 beats b's 1/3 -> right
        [0, 3, 0, 0, 0],  # label 1: right; joint right
        [1, 0, 5, 0, 0],  # label 0: right in head a (0.73), but b's 0.99 wins jointly -> joint wrong
        [0, 2, 0, 0, 0],  # label 0: wrong in head a; joint wrong
    ],
    np.float32,
)
TASK_A_Y = np.array([0, 1, 0, 0])
TASK_B_X = np.array(
    [
        [0, 0, 0, 0, 4],  # label 2: right; joint: b's 0.96 beats a's 0.5 -> right
        [0, 0, 0, 4, 0],  # label 0: wrong; joint wrong
    ],
    np.float32,
)
TASK_B_Y = np.array([2, 0])


def hand_tasks():
    return {"a": ({"x": TASK_A_X}, TASK_A_Y), "b": ({"x": TASK_B_X}, TASK_B_Y)}


def test_two_head_model_matches_hand_computed_figures():
    predictor = ModelPredictor(two_head_model())
    assert predictor.tasks == ("a", "b")
    assert predictor.heads == {"a": "a/logits", "b": "b/logits"}
    result = evaluate(predictor, hand_tasks())
    assert result.per_task == {"a": 0.75, "b": 0.5}
    assert result.task_average == pytest.approx(0.625)
    assert result.tasks_with_head == 2 and result.n_tasks == 2
    assert result.joint_correct == {"a": 2, "b": 1}
    assert result.joint == pytest.approx(3 / 6)
    assert result.samples == {"a": 4, "b": 2}
    assert result.head_order == ["a", "b"]
    assert not result.shared_head


def test_missing_head_is_none_and_its_images_count_wrong():
    predictor = ModelPredictor(two_head_model(), heads={"a": "a/logits"})
    result = evaluate(predictor, hand_tasks())
    assert result.per_task == {"a": 0.75, "b": None}
    assert result.task_average == pytest.approx(0.75)
    assert result.tasks_with_head == 1 and result.n_tasks == 2
    # With only head a, the joint argmax is a's own argmax (3 right); b's 2 images are wrong.
    assert result.joint_correct == {"a": 3, "b": 0}
    assert result.joint == pytest.approx(3 / 6)


def test_evaluate_accepts_any_input_name_for_single_input_model():
    tasks = {"a": ({"images": TASK_A_X}, TASK_A_Y), "b": (TASK_B_X, TASK_B_Y)}
    result = evaluate(ModelPredictor(two_head_model()), tasks)
    assert result.per_task == {"a": 0.75, "b": 0.5}


def test_batching_does_not_change_results():
    predictor = ModelPredictor(two_head_model())
    one = evaluate(predictor, hand_tasks(), batch_size=1)
    many = evaluate(predictor, hand_tasks(), batch_size=256)
    assert one == many


def test_identity_gemm_single_task_head():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    labels = x.argmax(axis=1)
    labels[:10] = (labels[:10] + 1) % 4  # 10 of 50 wrong
    predictor = ModelPredictor(gemm_model(np.eye(4)), task="a")
    assert predictor.tasks == ("a",)
    result = evaluate(predictor, {"a": ({"x": x}, labels)})
    assert result.per_task["a"] == pytest.approx(40 / 50)
    assert result.joint == pytest.approx(40 / 50)  # one head: joint equals per-task


def test_shared_head_per_task_and_pooled_joint():
    # One output serving both tasks in one label space: task a's classes are 0-1, b's are 2-3.
    x_a = np.array([[5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0]], np.float32)  # last: predicted 2
    x_b = np.array([[0, 0, 5, 0], [0, 0, 0, 5]], np.float32)
    predictor = ModelPredictor(gemm_model(np.eye(4)))
    assert predictor.tasks is None and predictor.shared
    assert set(predictor.predict({"x": x_a})) == {SHARED_HEAD}
    tasks = {"a": ({"x": x_a}, np.array([0, 1, 1])), "b": ({"x": x_b}, np.array([2, 3]))}
    result = evaluate(predictor, tasks)
    assert result.shared_head
    assert result.per_task == {"a": pytest.approx(2 / 3), "b": 1.0}
    assert result.joint == pytest.approx(4 / 5)
    assert result.task_average == pytest.approx((2 / 3 + 1) / 2)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_ensemble_joint_matches_numpy_reference():
    rng = np.random.default_rng(1)
    wa, ba = rng.normal(size=(6, 3)), rng.normal(size=3)
    wb, bb = rng.normal(size=(6, 4)), rng.normal(size=4)
    model_a, model_b = gemm_model(wa, ba), gemm_model(wb, bb, in_name="input.1")
    x = {t: rng.normal(size=(n, 6)).astype(np.float32) for t, n in (("a", 37), ("b", 23))}
    y = {"a": rng.integers(0, 3, size=37), "b": rng.integers(0, 4, size=23)}
    tasks = {t: ({"x": x[t]}, y[t]) for t in ("a", "b")}

    ensemble = EnsemblePredictor(
        {"a": ModelPredictor(model_a, task="a"), "b": ModelPredictor(model_b, task="b")}
    )
    result = evaluate(ensemble, tasks, batch_size=8)

    right, per_task = 0, {}
    for offset, t in ((0, "a"), (3, "b")):
        xa = x[t].astype(np.float32)
        la = xa @ wa.astype(np.float32) + ba.astype(np.float32)
        lb = xa @ wb.astype(np.float32) + bb.astype(np.float32)
        own = la if t == "a" else lb
        per_task[t] = float(np.mean(own.argmax(1) == y[t]))
        joint = np.concatenate([_softmax(la), _softmax(lb)], axis=1).argmax(1)
        right += int(np.sum(joint == y[t] + offset))
    assert result.per_task == pytest.approx(per_task)
    assert result.joint == pytest.approx(right / 60)
    assert 0 < result.joint < 1

    # Shared-head members serve their task just the same.
    plain = EnsemblePredictor({"a": ModelPredictor(model_a), "b": ModelPredictor(model_b)})
    assert evaluate(plain, tasks) == result


def test_ensemble_member_without_its_head_is_rejected():
    with pytest.raises(OptionError, match="none for 'b'"):
        EnsemblePredictor({"b": ModelPredictor(two_head_model(), heads={"a": "a/logits"})})


def test_evaluate_many_uses_one_code_path():
    model = two_head_model()
    predictors = {
        "zipped": ModelPredictor(model),
        "only a": ModelPredictor(model, heads={"a": "a/logits"}),
    }
    results = evaluate_many(predictors, hand_tasks())
    assert list(results) == ["zipped", "only a"]
    for name, p in predictors.items():
        assert results[name] == evaluate(p, hand_tasks())


def test_static_batch_is_padded_and_padding_dropped():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 3))
    x = rng.normal(size=(10, 5)).astype(np.float32)
    static = ModelPredictor(gemm_model(w, batch=4), task="a")
    dynamic = ModelPredictor(gemm_model(w), task="a")
    assert static.static_batch == 4 and dynamic.static_batch is None
    got = static.predict({"x": x}, batch_size=3)["a"]
    assert got.shape == (10, 3)
    np.testing.assert_allclose(got, dynamic.predict({"x": x})["a"], rtol=1e-6)
    labels = rng.integers(0, 3, size=10)
    tasks = {"a": ({"x": x}, labels)}
    assert evaluate(static, tasks) == evaluate(dynamic, tasks)


def test_to_dict_is_json_serializable():
    result = evaluate(ModelPredictor(two_head_model(), heads={"a": "a/logits"}), hand_tasks())
    d = json.loads(json.dumps(result.to_dict()))
    assert d["per_task"] == {"a": 0.75, "b": None}
    assert d["samples"] == {"a": 4, "b": 2} and d["total_samples"] == 6
    assert isinstance(result, EvalResult)


def test_model_from_path_with_external_data(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(two_head_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").exists()
    assert evaluate(ModelPredictor(path), hand_tasks()).per_task == {"a": 0.75, "b": 0.5}
    unloaded = onnx.load(path, load_external_data=False)
    with pytest.raises(ModelLoadError, match="file path"):
        ModelPredictor(unloaded)


def test_head_mapping_errors():
    model = two_head_model()
    with pytest.raises(OptionError, match="does not have"):
        ModelPredictor(model, heads={"a": "logits"})
    with pytest.raises(OptionError, match="single-output"):
        ModelPredictor(model, task="a")
    unprefixed = two_head_model()
    for i, out in enumerate(unprefixed.graph.output):
        new = f"out{i}"
        unprefixed.graph.node[i].output[0] = new
        out.name = new
    with pytest.raises(OptionError, match="heads="):
        ModelPredictor(unprefixed)
    assert ModelPredictor(unprefixed, heads={"a": "out0", "b": "out1"}).tasks == ("a", "b")


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelPredictor(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot load"):
        ModelPredictor(bad)


def test_labels_beyond_head_classes_are_rejected():
    tasks = {"a": ({"x": TASK_A_X}, np.array([0, 1, 5, 0]))}
    with pytest.raises(CalibrationDataError, match="up to 5.*2 classes"):
        evaluate(ModelPredictor(two_head_model()), tasks)


def test_bad_task_data_is_rejected():
    p = ModelPredictor(two_head_model())
    with pytest.raises(CalibrationDataError, match="3 labels for 4 samples"):
        evaluate(p, {"a": ({"x": TASK_A_X}, TASK_A_Y[:3])})
    with pytest.raises(CalibrationDataError, match="no labels"):
        evaluate(p, {"a": ({"x": TASK_A_X}, None)})
    with pytest.raises(CalibrationDataError, match="expects"):
        evaluate(p, {"a": ({"x": TASK_A_X[:, :4]}, TASK_A_Y)})
    with pytest.raises(OptionError, match="batch_size"):
        evaluate(p, hand_tasks(), batch_size=0)


# --- load_task_data ----------------------------------------------------------------------------


def test_load_task_data_renames_and_casts(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, images=TASK_A_X.astype(np.float64), labels=TASK_A_Y.astype(np.int32))
    raw_inputs, raw_labels = load_task_data(path)
    assert set(raw_inputs) == {"images"} and raw_labels.dtype == np.int64
    inputs, labels = load_task_data(path, two_head_model())
    assert set(inputs) == {"x"} and inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(labels, TASK_A_Y)
    assert evaluate(ModelPredictor(two_head_model()), {"a": (inputs, labels)}).per_task["a"] == 0.75


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": TASK_A_X}, "no 'labels'"),
        ({"x": TASK_A_X, "labels": TASK_A_Y[:2]}, "2 labels for 4 samples"),
        ({"x": np.where(TASK_A_X == 3, np.nan, TASK_A_X), "labels": TASK_A_Y}, "NaN"),
        ({"x": TASK_A_X.astype(np.complex64), "labels": TASK_A_Y}, "dtype complex64"),
        ({"x": TASK_A_X, "labels": TASK_A_Y + 0.5}, "integer"),
        ({"labels": TASK_A_Y}, "only 'labels'"),
    ],
)
def test_load_task_data_errors(tmp_path, arrays, match):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(CalibrationDataError, match=match):
        load_task_data(path, two_head_model())


def test_load_task_data_multi_input_keys_must_match(tmp_path):
    model = graph_model(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2]) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2])],
    )
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 2)), w=np.zeros((3, 2)), labels=np.zeros(3, np.int64))
    with pytest.raises(CalibrationDataError, match="missing \\['y'\\]"):
        load_task_data(path, model)
    np.savez(path, x=np.zeros((3, 2)), y=np.ones((3, 2)), labels=np.zeros(3, np.int64))
    inputs, _ = load_task_data(path, model)
    assert set(inputs) == {"x", "y"}


def test_load_task_data_missing_file(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_task_data(tmp_path / "missing.npz")
