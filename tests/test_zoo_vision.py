"""Vision transformers as torchvision, timm and torch.nn export them zip at full depth (needs torch,
timm, torchvision: ``-m exporter``): a model zipped with itself is given back, with and without the
statistics correction, a permuted copy with the least-squares refit, and two differently seeded
models zip."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph

pytestmark = pytest.mark.exporter

CASES = [(k, e) for k in ("torchvision_vit", "timm_deit", "torch_encoder", "torch_mha", "timm_mixer", "torchvision_swin")
         for e in ("torchscript", "dynamo")]
CASES += [(k, e) for k in ("torch_sdpa_causal", "torch_chunked", "timm_vit_avgpool_nobias", "timm_deit_distilled",
                          "timm_vit_reg_tokens") for e in ("torchscript", "dynamo")]
# dynamo (torch 2.13) cannot export these: the masked encoder takes a data-dependent branch, and
# scaled_dot_product_attention with a float mask fails to reshape its output at a dynamic batch
CASES += [("torch_encoder_masked", "torchscript"), ("torch_sdpa_masked", "torchscript")]


def run(model, x):
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tests.tiny_models import require

    require("torch", "timm", "torchvision")
    zoo = pytest.importorskip("tests.zoo_vision")
    cache = {}

    def get(kind, exporter, seed=0):
        key = (kind, exporter, seed)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{kind}-{exporter}-{seed}")
            cache[key] = zoo.export(zoo.build(kind, seed), folder / "model.onnx", exporter)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo-data") / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((48, 3, 32, 32)).astype(np.float32))
    return path


@pytest.mark.parametrize("kind,exporter", CASES)
def test_self_zip_at_full_depth_gives_the_model_back(exported, data, kind, exporter):
    path = exported(kind, exporter)
    graph = load_layer_graph(path)
    assert graph.max_depth() == graph.num_layers, [u.reason for u in graph.unsupported]
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    want = run(path, x)[0]
    scale = np.abs(want).max()
    assert want.std(axis=0).max() > 1e-3 * scale  # the outputs depend on the input
    for repair in (False, True):
        result = onnxzip.zip_models(path, path, data, method="zipit", params={"alpha": 0.3, "beta": 0.0},
                                    do_repair=repair, refit=False, batch_size=16, tasks=["a", "b"])
        assert result.stop_at == graph.num_layers - 1
        for got in run(result.model, x):
            assert np.abs(got - want).max() < 1e-4 * scale


@pytest.mark.parametrize("kind,exporter", CASES)
def test_zip_with_a_permuted_copy_gives_the_model_back(exported, data, tmp_path, kind, exporter):
    path = exported(kind, exporter)
    graph = load_layer_graph(path)
    other = tmp_path / "permuted.onnx"
    onnx.save(permute_model(graph, random_permutations(graph, seed=3)), other)
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    want = run(path, x)[0]
    result = onnxzip.zip_models(path, other, data, method="permute", refit=True, batch_size=16, tasks=["a", "b"])
    assert result.stop_at == graph.num_layers - 1
    for got in run(result.model, x):
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("kind,exporter", CASES)
def test_two_seeds_zip_at_full_depth(exported, data, kind, exporter):
    a, b = exported(kind, exporter, 0), exported(kind, exporter, 1)
    result = onnxzip.zip_models(a, b, data, method="zipit", params={"alpha": 0.3, "beta": 0.125}, batch_size=16,
                                refit=False, tasks=["a", "b"])
    assert result.stop_at == result.num_layers - 1
    outs = run(result.model, np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32))
    assert len(outs) == 2 and all(o.shape == (4, 5) and np.isfinite(o).all() for o in outs)
