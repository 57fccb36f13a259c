"""Embedding models (a final dense layer followed by an L2 normalisation, classes scored by cosine
against a class-embedding matrix): eval, label-free scoring and the zip through the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip
from onnxzip.evaluate import EmbeddingScorer, EnsemblePredictor, ModelPredictor, evaluate
from onnxzip.predictions import EMBEDDING_LOGIT_SCALE, embedding_scores, load_class_embeddings
from tests.onnx_builders import mlp, random_mlp_weights
from tests.test_errors import assert_one_line_error, cli

D = 8


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    f = {}
    for k, t in enumerate("ab"):
        f[t] = tmp_path / f"{t}.onnx"
        onnx.save(mlp(random_mlp_weights([10, 16, 12, D], k), l2_normalize=True), f[t])
        f[f"classes_{t}"] = tmp_path / f"classes_{t}.npy"
        np.save(f[f"classes_{t}"], rng.normal(size=(3 + k, D)).astype(np.float32))  # 3 and 4 classes
        f[f"test_{t}"] = tmp_path / f"test_{t}.npz"
        np.savez(f[f"test_{t}"], x=rng.normal(size=(30, 10)).astype(np.float32), labels=rng.integers(0, 3 + k, 30))
    f["calib"] = tmp_path / "calib.npz"
    np.savez(f["calib"], x=rng.normal(size=(200, 10)).astype(np.float32))
    return f


def scores_numpy(model_path, x, classes):
    emb = ort.InferenceSession(str(model_path)).run(None, {"x": x})[0]
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    c = classes / np.linalg.norm(classes, axis=1, keepdims=True)
    return EMBEDDING_LOGIT_SCALE * emb @ c.T


def test_ensemble_of_embedding_models_equals_numpy(files):
    classes = {t: load_class_embeddings(files[f"classes_{t}"]) for t in "ab"}
    data = {t: (dict(np.load(files[f"test_{t}"])), np.load(files[f"test_{t}"])["labels"]) for t in "ab"}
    for t in "ab":
        data[t][0].pop("labels")
    members = {t: EmbeddingScorer(ModelPredictor(str(files[t]), task=t), classes) for t in "ab"}
    got = evaluate(EnsemblePredictor(members), data)
    right = 0
    for k, t in enumerate("ab"):
        x, labels = data[t][0]["x"], data[t][1]
        heads = [scores_numpy(files[u], x, np.load(files[f"classes_{u}"])) for u in "ab"]
        probs = [np.exp(h - h.max(1, keepdims=True)) for h in heads]
        probs = np.concatenate([p / p.sum(1, keepdims=True) for p in probs], axis=1)
        right += int((probs.argmax(1) == labels + (0 if t == "a" else 3)).sum())
        assert got.per_task[t] == pytest.approx(float((heads[k].argmax(1) == labels).mean()))
    assert got.joint == pytest.approx(right / 60)


def test_embedding_scores_are_scaled_cosines():
    rng = np.random.default_rng(1)
    e, c = rng.normal(size=(5, D)), rng.normal(size=(3, D))
    s = embedding_scores(3.0 * e, 0.5 * c)  # scale-free in both
    cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    np.testing.assert_allclose(s, EMBEDDING_LOGIT_SCALE * cos)


def test_zip_stop_at_all_with_class_embeddings_scores_and_evaluates(files, tmp_path):
    out = tmp_path / "z.onnx"
    r = cli("zip", files["a"], files["b"], "-d", files["calib"], "-o", out, "--stop-at", "all", "--json",
            "--classes", f"a={files['classes_a']}", "--classes", f"b={files['classes_b']}",
            "--eval", f"a={files['test_a']},b={files['test_b']}")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["stop_at"] == summary["num_layers"] == 3
    assert set(summary["eval"]) == {"model A", "model B", "ensemble", "zipped"}
    assert summary["eval"]["zipped"]["per_task"]["b"] is not None  # the shared embedding serves both tasks
    # the label-free search scored candidates on class scores: every candidate has a task agreement
    assert all(set(c["task_agreement"]) == {"a", "b"} for c in summary["selection"]["candidates"])
    r = cli("eval", out, "--task", f"a={files['test_a']}", "--task", f"b={files['test_b']}", "--json",
            "--classes", f"a={files['classes_a']}", "--classes", f"b={files['classes_b']}")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)[str(out)]["joint"] == pytest.approx(summary["eval"]["zipped"]["joint"])


def test_class_embeddings_problems_are_one_line_errors(files, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, D + 1), np.float32))  # the wrong embedding size
    out = tmp_path / "z.onnx"
    base = ["zip", files["a"], files["b"], "-d", files["calib"], "-o", out, "--stop-at", "all", "--tasks", "a,b"]
    assert_one_line_error(cli(*base, "--classes", f"a={bad}", "--classes", f"b={files['classes_b']}"), "dimensions")
    assert_one_line_error(cli(*base, "--classes", f"c={files['classes_a']}"), "--classes", "['c']")
    assert_one_line_error(cli(*base, "--classes", f"a={files['classes_a']}"), "missing")
    np.save(bad, np.zeros((3,), np.float32))
    assert_one_line_error(cli(*base, "--classes", f"a={bad}", "--classes", f"b={files['classes_b']}"), "[classes, D]")
    assert not out.exists()


def test_zip_with_class_embeddings_matches_the_library(files):
    classes = {t: files[f"classes_{t}"] for t in "ab"}
    z = onnxzip.zip_models(files["a"], files["b"], files["calib"], stop_at="all", tasks=["a", "b"], classes=classes)
    assert z.stop_at == 3 and z.selection["holdout_samples"] > 0
