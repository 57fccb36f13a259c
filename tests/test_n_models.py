"""More than two models (issue 14): N permuted copies of one model zip back to it, N = 2 through the
list form is the two-model zip byte for byte, the N-way matchers, heads of different sizes, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip
from onnxzip.errors import ArchitectureMismatchError, OptionError
from onnxzip.matchers import correlation_from_covariance, match
from onnxzip.matchers.zipit import zip_budget
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph
from tests.onnx_builders import mlp, random_mlp_weights
from tests.test_match import assert_same
from tests.tiny_models import images


def run(model, feeds):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    if not isinstance(feeds, dict):
        feeds = {sess.get_inputs()[0].name: feeds}
    return sess.run(None, feeds)


def permuted_copies(path, tmp_path, n):
    graph = load_layer_graph(path)
    paths = [path]
    for k in range(1, n):
        out = tmp_path / f"permuted{k}.onnx"
        onnx.save(permute_model(graph, random_permutations(graph, seed=20 + k)), out)
        paths.append(out)
    return paths


# --- the N-way matchers -----------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("F", [1, 4, 7, 12])
def test_within_model_budget_is_beta_times_each_models_share_of_merges(n, F):
    for beta in (0.0, 0.0375, 0.125, 0.25, 0.5, 1.0):
        assert zip_budget(F, n, beta) == math.floor(beta * (((n - 1) * F) // n) + 1e-9)


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("F", [1, 2, 5, 9])
def test_n_way_zipit_matches_the_column_removal_reference(n, F):
    rng = np.random.default_rng(10 * n + F)
    feats = rng.standard_normal((n * F, 4 * n * F + 8))
    base = rng.standard_normal((F, feats.shape[1]))
    for k in range(1, n):  # every model a noisy, permuted copy of the first: real cross-model structure
        feats[k * F:(k + 1) * F] += 2 * base[rng.permutation(F)]
    feats[:F] += 2 * base
    corr = correlation_from_covariance(np.cov(feats))
    q = rng.integers(-2, 3, size=(n * F, n * F)) / 2.0
    tied = np.triu(q) + np.triu(q, 1).T
    for c in (corr, np.round(corr, 1), tied, np.full((n * F, n * F), 0.5)):
        for alpha, beta in itertools.product([1.0, 0.5, 0.3, 0.0], [1.0, 0.25, 0.125, 0.0]):
            assert_same(c, alpha, beta, num_models=n)


@pytest.mark.parametrize("method", ["permute", "average"])
@pytest.mark.parametrize("n", [3, 4])
def test_n_way_permute_and_average(method, n):
    rng = np.random.default_rng(n)
    F = 6
    x = rng.standard_normal((F, 50))
    perms = [np.arange(F)] + [rng.permutation(F) for _ in range(n - 1)]
    corr = correlation_from_covariance(np.cov(np.vstack([x[p] for p in perms])))
    m, u = match(corr, method=method, num_models=n)
    assert m.shape == (F, n * F) and u.shape == (n * F, F)
    np.testing.assert_allclose(m @ u, np.eye(F), atol=1e-12)
    for k, p in enumerate(perms):
        uk = u[k * F:(k + 1) * F]
        want = np.eye(F)[p] if method == "permute" else np.eye(F)  # feature j of model k is x[p[j]]: cluster p[j]
        np.testing.assert_array_equal(uk, want)
    np.testing.assert_allclose(m, u.T / n)


# --- N permuted copies zip back to the model --------------------------------------------------

CORRECTIONS = {"off": dict(do_repair=False), "correction": dict(do_repair=True, refit=False), "refit": dict(refit=True)}


@pytest.mark.parametrize("correction", list(CORRECTIONS))
@pytest.mark.parametrize("method,params", [("permute", {}), ("zipit", {"alpha": 1.0, "beta": 0.0})])
@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet"])
def test_zip_of_n_permuted_copies_gives_the_model_back(tiny, calib, tmp_path, arch, n, method, params, correction):
    path = tiny(arch)
    paths = permuted_copies(path, tmp_path, n)
    tasks = [f"t{k}" for k in range(n)]
    result = onnxzip.zip_models(paths, calib, method=method, params=params, tasks=tasks, **CORRECTIONS[correction])
    assert len(result.layout.outputs) == n and result.tasks == tasks
    x = images(16, seed=8)
    want = run(path, x)[0]
    outs = run(result.model, x)
    assert len(outs) == n
    for got in outs:
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta["onnxzip.tasks"] == ",".join(tasks)
    assert len(eval(meta["onnxzip.sources"].replace("null", "None"))) == n
    if method == "zipit":
        assert '"num_models": %d' % n in meta["onnxzip.params"]


@pytest.mark.parametrize("correction", ["off", "refit"])
@pytest.mark.parametrize("method,params", [("permute", {}), ("zipit", {"alpha": 1.0, "beta": 0.0})])
@pytest.mark.parametrize("arch", ["vit", "mha", "mixer"])
def test_zip_of_three_permuted_attention_models_pairs_whole_heads(tiny, calib, tmp_path, arch, method, params, correction):
    """Every model's heads are paired with the first model's (whole heads), then channels within."""
    path = tiny(arch)
    paths = permuted_copies(path, tmp_path, 3)
    result = onnxzip.zip_models(paths, calib, method=method, params=params, tasks=["a", "b", "c"], **CORRECTIONS[correction])
    x = images(16, seed=8)
    want = run(path, x)[0]
    for got in run(result.model, x):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_zip_of_three_copies_at_partial_depth_and_the_label_free_choice(tiny, calib, tmp_path):
    """alpha 1: a merged pair stays as similar to the third model's twin as each member was (with
    alpha < 1 a cluster of two can lose its third member to a pair that is still unmerged, so N > 2
    copies are not always given back); the refit-or-correction choice label-free."""
    path = tiny("cnn")
    paths = permuted_copies(path, tmp_path, 3)
    x = images(16, seed=9)
    want = run(path, x)[0]
    for kwargs in (dict(method="permute", stop_at=1, do_repair=False), dict(method="zipit", params={"alpha": 1.0, "beta": 0.0})):
        result = onnxzip.zip_models(paths, calib, tasks=["a", "b", "c"], **kwargs)
        for got in run(result.model, x):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# --- N = 2 through the list form is the two-model zip -----------------------------------------

@pytest.mark.parametrize("method,params,stop_at", [("zipit", {"alpha": 0.5, "beta": 1.0}, None), ("permute", {}, 1),
                                                   ("zipit", None, None)])
def test_two_models_as_a_list_give_the_same_file(tiny, calib, tmp_path, method, params, stop_at):
    a, b = tiny("resnet"), tiny("resnet", seed=1)
    one, two = tmp_path / "pair.onnx", tmp_path / "list.onnx"
    onnxzip.zip_models(a, b, calib, output=one, method=method, params=params, stop_at=stop_at, tasks=["a", "b"])
    onnxzip.zip_models([a, b], calib, output=two, method=method, params=params, stop_at=stop_at, tasks=["a", "b"])
    assert one.read_bytes() == two.read_bytes()
    three = tmp_path / "keyword.onnx"
    onnxzip.zip_models([a, b], data=calib, output=three, method=method, params=params, stop_at=stop_at, tasks=["a", "b"])
    assert one.read_bytes() == three.read_bytes()


# --- heads of different sizes -----------------------------------------------------------------

def _shared_trunk_models(tmp_path, classes=(3, 4, 5), seed=0):
    """MLPs with one trunk (hidden units permuted per model) and heads with their own class counts:
    zipped with permute, every head computes exactly what its model does."""
    rng = np.random.default_rng(seed)
    (w0, b0), (w1, b1) = random_mlp_weights([8, 16, 12], seed)
    paths = []
    for k, c in enumerate(classes):
        p, q = rng.permutation(16), rng.permutation(12)
        head = (rng.standard_normal((c, 12)), rng.standard_normal(c) * 0.1)
        weights = [(w0[p], b0[p]), (w1[q][:, p], b1[q]), (head[0][:, q], head[1])]
        path = tmp_path / f"m{k}.onnx"
        onnx.save(mlp(weights), path)
        paths.append(path)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return paths, tmp_path / "calib.npz", x


@pytest.mark.parametrize("method", ["permute", "zipit"])
def test_heads_of_different_sizes(tmp_path, method):
    paths, calib, x = _shared_trunk_models(tmp_path)
    params = {"alpha": 1.0, "beta": 0.0} if method == "zipit" else {}
    result = onnxzip.zip_models(paths, calib, method=method, params=params, tasks=["three", "four", "five"], do_repair=False)
    outs = run(result.model, x[:20])
    assert [o.shape[1] for o in outs] == [3, 4, 5]
    for path, got in zip(paths, outs):
        np.testing.assert_allclose(got, run(path, x[:20])[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(OptionError, match=r"heads of different sizes stay apart\): share at most 2 layers"):
        onnxzip.zip_models(paths, calib, method=method, params=params, stop_at="all", tasks=["a", "b", "c"])
    info = onnxzip.check(paths)
    assert info["zippable"] and info["max_stop_at"] == 2 and "heads of different sizes [3, 4, 5]" in info["limited_by"]


def test_heads_of_different_sizes_with_the_label_free_choices(tmp_path):
    paths, calib, x = _shared_trunk_models(tmp_path, classes=(3, 4))
    result = onnxzip.zip_models(paths, calib, tasks=["a", "b"], stop_at="auto", min_fidelity=0.9)
    assert result.stop_at <= 2 and [o.shape[1] for o in run(result.model, x[:4])] == [3, 4]


# --- errors -----------------------------------------------------------------------------------

def test_fewer_than_two_models(tiny, calib):
    path = tiny("mlp")
    with pytest.raises(OptionError, match="at least 2 models, got 1"):
        onnxzip.zip_models([path], calib)
    with pytest.raises(OptionError, match="at least 2 models, got 1"):
        onnxzip.pipeline.prepare_models([path], calib)
    with pytest.raises(OptionError, match="at least 2 models"):
        onnxzip.check([path])


def test_duplicate_task_names(tiny, calib):
    path = tiny("mlp")
    with pytest.raises(OptionError, match="--tasks names must differ, got a,b,a"):
        onnxzip.zip_models([path, path, path], calib, tasks=["a", "b", "a"])
    with pytest.raises(OptionError, match="--tasks needs 3 names, got 2"):
        onnxzip.zip_models([path, path, path], calib, tasks=["a", "b"])


def test_models_that_differ_are_named_with_the_layer(tiny, calib):
    mlp_path, cnn_path = tiny("mlp"), tiny("cnn")
    with pytest.raises(ArchitectureMismatchError, match=r"model 3, .*model\.onnx, against model 1.*: layer 1"):
        onnxzip.zip_models([mlp_path, mlp_path, cnn_path], calib, tasks=["a", "b", "c"])
    info = onnxzip.check([mlp_path, mlp_path, cnn_path])
    assert not info["zippable"] and info["reason"].startswith("model 3 against model 1: layer 1")


def test_num_models_is_the_number_of_files(tiny, calib):
    path = tiny("mlp")
    with pytest.raises(OptionError, match=r"number of files given \(3\)"):
        onnxzip.zip_models([path, path, path], calib, params={"num_models": 2, "alpha": 0.3, "beta": 0.1})


# --- the command line -------------------------------------------------------------------------

def test_cli_zip_check_and_eval_of_three_models(tmp_path):
    import json

    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    paths, calib, x = _shared_trunk_models(tmp_path)
    rng = np.random.default_rng(3)
    tests = []
    for t, c in zip(("t3", "t4", "t5"), (3, 4, 5)):
        np.savez(tmp_path / f"{t}.npz", x=x[:50], labels=rng.integers(0, c, 50))
        tests.append(f"{t}={tmp_path / f'{t}.npz'}")
    out = tmp_path / "zipped.onnx"
    args = ["zip", *map(str, paths), "--data", str(calib), "--tasks", "t3,t4,t5", "-o", str(out), "--method", "permute",
            "--no-repair", "--json", *[a for e in tests for a in ("--eval", e)]]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["tasks"] == ["t3", "t4", "t5"] and set(summary["cost"]) == {"model 1", "model 2", "model 3", "zipped"}
    assert set(summary["eval"]) == {"model 1", "model 2", "model 3", "ensemble", "zipped"}
    assert summary["eval"]["zipped"] == summary["eval"]["ensemble"]  # exact: shared trunk, own heads
    r = runner.invoke(app, ["eval", str(out), *[a for e in tests for a in ("--task", e)],
                            *[a for p in paths for a in ("--ensemble", str(p))], "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got[str(out)]["joint"] == got["ensemble"]["joint"]
    r = runner.invoke(app, ["sweep", *map(str, paths), "--data", str(calib), "--tasks", "t3,t4,t5", "--methods", "permute",
                            *[a for e in tests for a in ("--task", e)], "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert [row["method"] for row in rows[:4]] == ["ensemble", "model 1", "model 2", "model 3"]
    assert [row["shared"] for row in rows[4:]] == ["0/3", "1/3", "2/3"]
    r = runner.invoke(app, ["check", *map(str, paths)])
    assert r.exit_code == 0 and "deepest zip --stop-at 2" in r.output and "heads of different sizes" in r.output
    r = runner.invoke(app, ["zip", str(paths[0]), "--data", str(calib), "-o", str(tmp_path / "one.onnx")])
    assert r.exit_code == 1 and "at least 2 models, got 1" in r.output


@pytest.mark.slow
def test_bundled_three_task_sample_zips_close_to_its_ensemble():
    """samples/digits3: the label-free default zip of the three VGGs against their ensemble (joint)."""
    from pathlib import Path

    from onnxzip.evaluate import EnsemblePredictor, ModelPredictor, evaluate, load_task_data

    root = Path(__file__).resolve().parents[1] / "samples" / "digits3"
    tasks = ["t0", "t1", "t2"]
    paths = [str(root / f"vgg_{t}.onnx") for t in tasks]
    data = {t: load_task_data(root / f"test_{t}.npz") for t in tasks}
    result = onnxzip.zip_models(paths, str(root / "calib.npz"), tasks=tasks)
    ensemble = evaluate(EnsemblePredictor({t: ModelPredictor(p, task=t) for t, p in zip(tasks, paths)}), data).joint
    zipped = evaluate(ModelPredictor(result.model), data).joint
    assert zipped >= ensemble - 0.03 and zipped > 0.85


@pytest.mark.parametrize("correction", ["off", "refit"])
@pytest.mark.parametrize("method,params", [("permute", {}), ("zipit", {"alpha": 1.0, "beta": 0.0})])
def test_zip_of_three_permuted_grouped_query_models(tiny, tmp_path, method, params, correction):
    """Grouped-query attention over three models: key heads paired with the first model's, the
    queries' merge repeated from the keys'."""
    from tests.tiny_models import example_feeds

    path = tiny("llama-gqa", 0, "dynamo")
    paths = permuted_copies(path, tmp_path, 3)
    calib = tmp_path / "tokens.npz"
    np.savez(calib, **example_feeds("llama-gqa", 48, seed=1))
    result = onnxzip.zip_models(paths, calib, method=method, params=params, tasks=["a", "b", "c"], stop_at="all",
                                **CORRECTIONS[correction])
    x = example_feeds("llama-gqa", 4, seed=5)
    sess = lambda m: ort.InferenceSession(m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m),  # noqa: E731
                                          providers=["CPUExecutionProvider"])
    want = sess(path).run(None, x)[0]
    for got in sess(result.model).run(None, x):
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
