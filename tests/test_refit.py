"""Least-squares refit: exact on a self-zip, equal to numpy's least squares on all the data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip
from onnxzip.merge import compute_merges
from onnxzip.pipeline import prepare_pair, zip_prepared
from onnxzip.refit import _ridge_solve
from onnxzip.stats.collect import fetch_model
from tests.onnx_builders import mlp
from tests.tiny_models import images
from tests.make_models import ARCHS
from tests.test_invariants import _permuted_copy


def run(model, feeds: dict, names=None) -> list[np.ndarray]:
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stop_at", [None, "all"])
def test_refit_of_a_zip_with_a_permuted_self_gives_the_model_back(tiny, calib, tmp_path, arch, stop_at):
    path = tiny(arch)
    other = _permuted_copy(path, tmp_path)
    result = onnxzip.zip_models(path, other, calib, method="zipit", params={"alpha": 0.5, "beta": 0.0},
                                stop_at=stop_at, refit=True, tasks=["a", "b"])
    assert result.refit is not None and result.refit.layers > 0 and result.repair is None
    x = {"input": images(16, seed=8)}
    want = run(path, x)[0]
    for got in run(result.model, x):  # the tolerance of the zip without the refit (test_invariants)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _random_mlp(seed: int, sizes=(6, 10, 8, 3)):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o) * 0.3) for i, o in zip(sizes[:-1], sizes[1:])]


@pytest.mark.parametrize("spelling", ["gemm_t1", "matmul"])
def test_refit_equals_numpy_least_squares_on_all_the_data(tmp_path, spelling):
    a, b = mlp(_random_mlp(0), spelling), mlp(_random_mlp(1), spelling)
    x = np.random.default_rng(2).normal(size=(300, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    pair = prepare_pair(a, b, tmp_path / "calib.npz", tasks=["a", "b"], repair_samples=0)
    params = {"alpha": 0.5, "beta": 0.5}
    z = zip_prepared(pair, "zipit", params, 2, ["a", "b"], refit=True, refit_ridge=0.0, repair_samples=0)
    assert z.refit.samples == len(x)
    merges = compute_merges(pair.graphs[0], pair.stats, "zipit", params, n_models=2)
    layer = pair.graphs[0].layers[1]  # the second trunk layer: its input is the refitted first layer's
    site = next(s for s in z.layout.sites if s.index == 1 and s.model == -1)
    node = next(n for n in z.model.graph.node if n.name == site.node)
    h = run(fetch_model(z.model, [node.input[0]]), {"x": x}, [node.input[0]])[0].astype(np.float64)
    targets = [run(fetch_model(g.model, [layer.preact]), {"x": x}, [layer.preact])[0] for g in pair.graphs]
    y = sum(t.astype(np.float64) @ merges[layer.out_space.gid].merge_of(k).T for k, t in enumerate(targets))
    design = np.concatenate([h, np.ones((len(h), 1))], axis=1)
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in z.model.graph.initializer}
    w = inits[site.weight]
    w = w.T if site.out_axis == 0 else w
    bias = inits[site.bias] if site.bias else sum(sign * inits[init] for _, init, _, sign in site.chain)
    np.testing.assert_allclose(w, solution[:-1], rtol=1e-4, atol=1e-4 * np.abs(solution).max())
    np.testing.assert_allclose(bias, solution[-1], rtol=1e-4, atol=1e-4 * np.abs(solution).max())
    # and the zipped model computes that fit
    fitted = run(fetch_model(z.model, [site.preact]), {"x": x}, [site.preact])[0]
    np.testing.assert_allclose(fitted, design @ solution, rtol=1e-3, atol=1e-4 * np.abs(y).max())


def test_a_layer_with_too_many_inputs_keeps_its_merged_weights(tiny, calib, monkeypatch):
    import onnxzip.refit

    a, b = tiny("cnn", seed=0), tiny("cnn", seed=1)
    plain = onnxzip.zip_models(a, b, calib, params={"alpha": 0.5, "beta": 1.0}, do_repair=False, tasks=["a", "b"])
    monkeypatch.setattr(onnxzip.refit, "MAX_INPUTS", 20)  # the 3x3 convs over 4+ channels are over it
    fitted = onnxzip.zip_models(a, b, calib, params={"alpha": 0.5, "beta": 1.0}, refit=True, tasks=["a", "b"])
    assert fitted.refit.kept and all("inputs per output" in why for why in fitted.refit.kept.values())
    before = {t.name: onnx.numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in fitted.model.graph.initializer}
    nodes = {n.name: n for n in fitted.model.graph.node}
    for node in fitted.refit.kept:
        weight = nodes[node].input[1]
        np.testing.assert_array_equal(after[weight], before[weight])
    assert len(fitted.refit.ridges) == fitted.refit.layers - len(fitted.refit.kept)


def test_ridge_solve_is_the_penalized_least_squares_solution():
    rng = np.random.default_rng(3)
    n = 200
    x = rng.normal(size=(n, 5)) @ rng.normal(size=(5, 5)) + 2.0
    y = x @ rng.normal(size=(5, 2)) + rng.normal(size=(n, 2)) * 0.1 - 1.0
    d = np.concatenate([x, np.ones((n, 1))], axis=1)
    gram, cross = (d.T @ d)[None], (d.T @ y)[None]
    np.testing.assert_allclose(_ridge_solve(gram, cross, 0.0)[0], np.linalg.lstsq(d, y, rcond=None)[0], rtol=1e-8, atol=1e-8)
    trace = np.trace(np.cov(x.T, bias=True)) / 5
    for r in (1e-3, 1e-1, 10.0):
        penalty = np.diag([r * trace] * 5 + [0.0])  # the bias is not penalized
        want = np.linalg.solve(d.T @ d / n + penalty, d.T @ y / n)
        np.testing.assert_allclose(_ridge_solve(gram, cross, r)[0], want, rtol=1e-8, atol=1e-10)
    norms = [np.linalg.norm(_ridge_solve(gram, cross, r)[0, :-1]) for r in (0.0, 1e-2, 1.0, 100.0)]
    assert norms == sorted(norms, reverse=True)
    # a fixed bias: the fit of x to y about zero, no constant
    np.testing.assert_allclose(_ridge_solve(gram, cross, 0.0, free_bias=False)[0, :-1],
                               np.linalg.lstsq(x, y, rcond=None)[0], rtol=1e-8, atol=1e-8)


def test_refit_cli_flag(tiny, calib, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "z.onnx"
    r = CliRunner().invoke(app, ["zip", str(tiny("cnn", seed=0)), str(tiny("cnn", seed=1)), "--data", str(calib),
                                 "-o", str(out), "--alpha", "0.5", "--beta", "1", "--refit"])
    assert r.exit_code == 0, r.output
    assert "refit:" in r.output and out.exists()
