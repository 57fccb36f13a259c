from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests import make_models, tiny_models


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, seed=0, exporter="torchscript", fold=True, opset=17, batch=0) -> path of an exported
    model (``batch`` > 0: exported with that static batch).

    The models are committed under tests/models/ (tests/make_models.py exports them; no torch
    needed here). Each test session gets its own copy, named model.onnx in a folder of its own as
    an export would be; a dynamo model comes with its weights in model.onnx.data, as the dynamo
    exporter saves it.
    """
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch: str, seed: int = 0, exporter: str = "torchscript", fold: bool = True,
            opset: int = make_models.DEFAULT_OPSET, batch: int = 0):
        key = make_models.Key(arch, seed, exporter, fold, opset, batch)
        if key not in cache:
            src = make_models.path_of(key)
            if not src.exists():
                listed = "" if key in make_models.MODELS else " (add its key to MODELS there first)"
                pytest.fail(f"{src} is missing: run `python tests/make_models.py`{listed}; it needs torch: "
                            "pip install -e '.[export]'", pytrace=False)
            folder = root / src.stem
            folder.mkdir()
            path = folder / "model.onnx"
            if exporter == "dynamo":
                onnx.save(onnx.load(str(src)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                          location="model.onnx.data", size_threshold=make_models.DYNAMO_EXTERNAL_THRESHOLD)
            else:
                path.write_bytes(src.read_bytes())
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.npz"
    np.savez(path, input=tiny_models.images(96, seed=1))
    return path
