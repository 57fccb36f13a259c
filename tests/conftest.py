from __future__ import annotations

import numpy as np
import pytest

from tests import tiny_models


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, seed=0, exporter="torchscript", fold=True) -> path of an exported model (cached)."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch: str, seed: int = 0, exporter: str = "torchscript", fold: bool = True):
        key = (arch, seed, exporter, fold)
        if key not in cache:
            folder = root / f"{arch}-{seed}-{exporter}-{int(fold)}"
            folder.mkdir()
            cache[key] = tiny_models.export(tiny_models.build(arch, seed), folder / "model.onnx", exporter, fold)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.npz"
    np.savez(path, input=tiny_models.images(96, seed=1))
    return path
