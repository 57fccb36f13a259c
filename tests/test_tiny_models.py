"""The committed tiny models (tests/models/) are the ones tests/make_models.py lists, and the
ones tests/tiny_models.py exports today (the second check needs torch: ``-m exporter``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests import make_models
from tests.tiny_models import LANGUAGE_MODELS, example_feeds, images, require


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, x if isinstance(x, dict) else {sess.get_inputs()[0].name: x})


def test_committed_models_are_the_listed_ones_each_in_one_file():
    have = {p.name for p in make_models.MODELS_DIR.iterdir()} if make_models.MODELS_DIR.exists() else set()
    want = {k.filename for k in make_models.MODELS}
    assert not want - have, f"missing: {sorted(want - have)}; run `python tests/make_models.py` (pip install -e '.[export]')"
    assert not have - want, f"not in make_models.MODELS: {sorted(have - want)}"
    for key in make_models.MODELS:
        model = onnx.load(str(make_models.path_of(key)), load_external_data=False)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer), key.filename


@pytest.mark.exporter
@pytest.mark.parametrize("key", make_models.MODELS, ids=lambda k: k.filename[: -len(".onnx")])
def test_committed_model_matches_a_fresh_export(key, tmp_path):
    if key.arch in LANGUAGE_MODELS:
        require("transformers")
    committed = onnx.load(str(make_models.path_of(key)))
    fresh = make_models.export(key, tmp_path)
    assert [n.op_type for n in committed.graph.node] == [n.op_type for n in fresh.graph.node]
    assert [i.name for i in committed.graph.input] == [i.name for i in fresh.graph.input]
    assert [o.name for o in committed.graph.output] == [o.name for o in fresh.graph.output]
    rng = np.random.default_rng(0)
    big, small = (key.batch, key.batch) if key.batch else (16, 3)  # a static batch takes exactly its size
    inputs = (images(big, seed=11), rng.standard_normal((small, 1, 8, 8)).astype(np.float32))
    if key.arch in LANGUAGE_MODELS:
        inputs = (example_feeds(key.arch, big, seed=11), example_feeds(key.arch, small, seed=12))
    for x in inputs:
        (want,), (got,) = run(fresh, x), run(committed, x)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
