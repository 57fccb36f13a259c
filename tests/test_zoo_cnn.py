"""torchvision's convolutional families (tiny instances, both torch exporters): every layer zips,
a model zipped with itself or with a permuted copy of itself comes back, a pair zips.

Needs torch and torchvision's model definitions: ``python -m pytest -q -m exporter tests/test_zoo_cnn.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph

pytestmark = pytest.mark.exporter

# VGG-11-BN's 4096-wide classifier makes its zips slow (minutes): self-zips only
ARCHS = ["regnet", "resnext", "shufflenet", "densenet", "mobilenet_v2"]
TOLERANCE = 1e-4  # of the output scale


def run(model, x):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    pytest.importorskip("torch")
    from tests import zoo_cnn

    try:
        zoo_cnn._torchvision()  # (not importorskip: torchvision needs its operators declared first)
    except ImportError:
        pytest.skip("torchvision is not installed")

    root = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(arch, exporter, seed=0):
        key = (arch, exporter, seed)
        if key not in cache:
            folder = root / f"{arch}-{exporter}-{seed}"
            folder.mkdir()
            cache[key] = zoo_cnn.export(zoo_cnn.build(arch, seed), folder / "model.onnx", exporter)
        return cache[key]

    calib = root / "calib.npz"
    np.savez(calib, input=zoo_cnn.images(64, seed=1))
    get.calib = calib
    get.images = zoo_cnn.images
    return get


def _relative_error(model, path, x):
    want = run(path, x)[0]
    return max(float(np.abs(o - want).max()) for o in run(model, x)) / float(np.abs(want).max())


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_zips_and_a_self_zip_gives_the_model_back(zoo, arch, exporter):
    path = zoo(arch, exporter)
    g = load_layer_graph(path)
    assert not g.unsupported and g.max_depth() == g.num_layers
    x = zoo.images(8, seed=3)
    for repair in (False, True):
        r = onnxzip.zip_models(path, path, zoo.calib, method="zipit", params={"alpha": 0.3, "beta": 0.0},
                               stop_at="all", do_repair=repair, refit=False, tasks=["a", "b"])
        assert _relative_error(r.model, path, x) < TOLERANCE, f"repair={repair}"


@pytest.mark.parametrize("arch", ARCHS)
def test_zip_with_a_permuted_copy_gives_the_model_back(zoo, arch, tmp_path):
    path = zoo(arch, "torchscript")
    g = load_layer_graph(path)
    other = tmp_path / "permuted.onnx"
    onnx.save(permute_model(g, random_permutations(g, seed=5)), other)
    x = zoo.images(8, seed=3)
    assert _relative_error(onnx.load(str(other)), path, x) < 1e-5  # the permutation changes nothing
    r = onnxzip.zip_models(path, other, zoo.calib, method="zipit", params={"alpha": 0.3, "beta": 0.0},
                           stop_at="all", do_repair=False, tasks=["a", "b"])
    assert _relative_error(r.model, path, x) < TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_a_pair_zips_at_full_depth(zoo, arch):
    a, b = zoo(arch, "dynamo", 0), zoo(arch, "dynamo", 1)
    m = load_layer_graph(a).num_layers
    r = onnxzip.zip_models(a, b, zoo.calib, method="zipit", params={"alpha": 0.3, "beta": 0.5},
                           stop_at=m - 1, refit=False, tasks=["a", "b"])
    assert r.stop_at == m - 1
    outs = run(r.model, zoo.images(8, seed=4))
    assert len(outs) == 2 and all(o.shape == (8, 5) and np.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("repair", [False, True])
def test_vgg11_bn_with_a_wide_classifier_self_zips_exactly(zoo, repair):
    path = zoo("vgg11_bn", "torchscript")
    r = onnxzip.zip_models(path, path, zoo.calib, method="zipit", params={"alpha": 0.3, "beta": 0.0},
                           stop_at="all", do_repair=repair, refit=False, tasks=["a", "b"])
    assert _relative_error(r.model, path, zoo.images(8, seed=3)) < TOLERANCE
