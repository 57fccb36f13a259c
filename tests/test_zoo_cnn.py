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


def _batch(model: onnx.ModelProto):
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") else d.dim_param


@pytest.mark.parametrize("arch", ["regnet", "densenet"])
def test_torchscript_and_dynamo_exports_zip_together(zoo, arch):
    """TorchScript (dynamic batch) with dynamo (batch fixed at 8): the same weights give the
    TorchScript model back, at any batch; different weights zip at full depth."""
    ts, same, other = zoo(arch, "torchscript", 0), zoo(arch, "dynamo", 0), zoo(arch, "dynamo", 1)
    x = zoo.images(8, seed=3)[:5]
    for a, b in ((ts, same), (same, ts)):
        for repair in (False, True):
            r = onnxzip.zip_models(a, b, zoo.calib, method="zipit", params={"alpha": 0.3, "beta": 0.0},
                                   stop_at="all", do_repair=repair, refit=False, tasks=["a", "b"])
            assert _batch(r.model) == "batch", r.warnings
            assert _relative_error(r.model, ts, x) < TOLERANCE, f"repair={repair}"
    m = load_layer_graph(ts).num_layers
    r = onnxzip.zip_models(ts, other, zoo.calib, method="zipit", params={"alpha": 0.3, "beta": 0.5},
                           stop_at=m - 1, refit=False, tasks=["a", "b"])
    assert r.stop_at == m - 1
    outs = run(r.model, x)
    assert len(outs) == 2 and all(o.shape == (5, 5) and np.isfinite(o).all() for o in outs)


def test_a_fresh_resnet_whose_zero_biases_dynamo_drops_zips_across_exporters(zoo, tmp_path):
    """Fresh BatchNorms fold into zero biases, which the dynamo exporter's optimizer leaves out
    and the TorchScript exporter keeps: a missing bias is a zero bias."""
    from torchvision.models.resnet import BasicBlock, ResNet

    from tests import zoo_cnn

    zoo_cnn._torchvision()
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5).eval()
    ts = zoo_cnn.export(model, tmp_path / "ts.onnx", "torchscript")
    (tmp_path / "dy").mkdir()
    dy = zoo_cnn.export(model, tmp_path / "dy" / "model.onnx", "dynamo")

    def biased(path):
        g = load_layer_graph(path)
        return sum(1 for n in g.model.graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2])

    assert biased(ts) > biased(dy)  # the spelling this test is about
    info = onnxzip.check(ts, dy)
    assert info["zippable"] and info["max_stop_at"] == info["num_layers"], info["reason"]
    r = onnxzip.zip_models(dy, ts, zoo.calib, method="permute", stop_at="all", do_repair=False, tasks=["a", "b"])
    assert _relative_error(r.model, ts, zoo.images(8, seed=3)[:3]) < TOLERANCE
