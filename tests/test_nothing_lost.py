"""Nothing the user owns is overwritten, and nothing is left behind by a refused run: every path
written is checked against every path read and against the other outputs, before any work."""

from __future__ import annotations

import builtins
import hashlib
import os

import numpy as np
import onnx
import pytest

from tests.onnx_builders import mlp, random_mlp_weights
from tests.test_errors import assert_one_line_error, cli


@pytest.fixture
def files(tmp_path):
    """Two models, mixed calibration data and labeled test data per task, in one folder."""
    rng = np.random.default_rng(0)
    f = {"a": tmp_path / "a.onnx", "b": tmp_path / "b.onnx"}
    onnx.save(mlp(random_mlp_weights([10, 8, 6, 3], 0)), f["a"])
    onnx.save(mlp(random_mlp_weights([10, 8, 6, 3], 1)), f["b"])
    f["calib"] = tmp_path / "calib.npz"
    np.savez(f["calib"], x=rng.normal(size=(80, 10)).astype(np.float32))
    for t in "ab":
        f[f"test_{t}"] = tmp_path / f"test_{t}.npz"
        np.savez(f[f"test_{t}"], x=rng.normal(size=(20, 10)).astype(np.float32), labels=rng.integers(0, 3, 20))
    return f


def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def refused(result, folder, before, *words):
    """Exit 1 with one line naming ``words``; every file in the folder as it was, nothing added."""
    assert_one_line_error(result, *words)
    assert snapshot(folder) == before


def zip_args(f, *extra):
    return ["zip", f["a"], f["b"], "-d", f["calib"], "--tasks", "a,b", *extra]


EVAL = ["--eval", "a={test_a},b={test_b}"]


@pytest.mark.parametrize("extra,words", [
    (["-o", "{calib}"], ["--output", "calibration data"]),
    (["-o", "{b}"], ["--output", "model B"]),
    (["-o", "out.onnx", "--report", "{b}"], ["--report", "model B"]),
    (["-o", "out.onnx", "--report", "out.onnx"], ["--report", "--output"]),
    (["-o", "{test_a}", *EVAL], ["--output", "--eval data of task 'a'"]),
    (["-o", "out.onnx", "--report", "{test_b}", *EVAL], ["--report", "--eval data of task 'b'"]),
    (["-o", "out.onnx", "--select-by", "accuracy", "--alpha", "auto", "--task", "a={test_a}", "--task", "b={test_b}",
      "--report", "{test_a}"], ["--report", "--task data of task 'a'"]),
    (["-o", "{a}"], ["--output", "model A"]),
])
def test_zip_never_writes_over_an_input_or_another_output(files, tmp_path, monkeypatch, extra, words):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    args = [str(x).format(**files) for x in extra]
    refused(cli(*zip_args(files, *args)), tmp_path, before, *words)


def test_an_output_linked_to_an_input_is_refused(files, tmp_path):
    link = tmp_path / "link.onnx"
    os.link(files["b"], link)  # a second name for model B's file
    before = snapshot(tmp_path)
    refused(cli(*zip_args(files, "-o", link)), tmp_path, before, "model B")
    sym = tmp_path / "sym.json"
    sym.symlink_to(files["calib"])
    before = snapshot(tmp_path)
    refused(cli(*zip_args(files, "-o", "z.onnx", "--report", sym)), tmp_path, before, "calibration data")


def test_a_model_output_may_not_replace_an_input_models_external_data(files, tmp_path):
    model = onnx.load(files["a"])
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(model, ext / "a.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    out = ext / "weights.bin"
    before = snapshot(ext)
    refused(cli("zip", ext / "a.onnx", files["b"], "-d", files["calib"], "-o", out), ext, before, "model A's external data")


def test_a_model_output_may_not_replace_a_data_file_through_its_external_data_name(files, tmp_path):
    """Saving to x.onnx may write x.onnx.data: that name is checked as well."""
    os.replace(files["calib"], tmp_path / "z.onnx.data")
    before = snapshot(tmp_path)
    refused(cli("zip", files["a"], files["b"], "-d", tmp_path / "z.onnx.data", "-o", tmp_path / "z.onnx"), tmp_path,
            before, "calibration data")


@pytest.mark.parametrize("labels,words", [
    ("missing labels", ["test_a.npz", "no 'labels'"]),
    ("unknown task", ["--eval", "['c']"]),
])
def test_bad_eval_data_is_found_before_zipping(files, tmp_path, labels, words):
    if labels == "missing labels":
        np.savez(files["test_a"], x=np.zeros((20, 10), np.float32))
        spec = f"a={files['test_a']},b={files['test_b']}"
    else:
        spec = f"c={files['test_a']}"
    out = tmp_path / "out.onnx"
    before = snapshot(tmp_path)
    refused(cli(*zip_args(files, "-o", out, "--eval", spec)), tmp_path, before, *words)


def test_eval_data_that_does_not_fit_the_model_leaves_no_output(files, tmp_path):
    np.savez(files["test_a"], x=np.zeros((20, 7), np.float32), labels=np.zeros(20, np.int64))  # 7 features, not 10
    before = snapshot(tmp_path)
    refused(cli(*zip_args(files, "-o", tmp_path / "out.onnx", "--eval", f"a={files['test_a']},b={files['test_b']}")),
            tmp_path, before, "task 'a'")


@pytest.mark.parametrize("extra,words", [
    (["--input-layout", "foo"], ["--input-layout", "NCHW or NHWC"]),
    (["--param", "num_models=3"], ["num_models=3", "number of models"]),
    (["--alpha", "7"], ["alpha=7", "[0, 1]"]),
    (["--beta", "-1"], ["beta=-1", "[0, 1]"]),
    (["--stop-at", "deep"], ["--stop-at", "layer number"]),
    (["--stop-at", "9"], ["--stop-at 9", "out of range"]),
    (["--search", "random"], ["--search"]),
    (["--select-by", "accuracy", "--alpha", "auto"], ["--select-by accuracy", "labeled data"]),
    (["--stop-at", "auto", "--min-fidelity", "2"], ["--min-fidelity", "[0, 1]"]),
])
def test_bad_options_are_refused_before_any_work(files, tmp_path, monkeypatch, extra, words):
    import onnxzip.pipeline

    def no_statistics(*args, **kwargs):
        raise AssertionError("the statistics pass ran before the options were checked")

    monkeypatch.setattr(onnxzip.pipeline, "collect_stats", no_statistics)
    out = tmp_path / "out.onnx"
    before = snapshot(tmp_path)
    refused(cli(*zip_args(files, "-o", out, *extra)), tmp_path, before, *words)


def test_sweep_never_writes_over_an_input(files, tmp_path):
    before = snapshot(tmp_path)
    sweep = ["sweep", files["a"], files["b"], "-d", files["calib"], "--tasks", "a,b"]
    refused(cli(*sweep, "--csv", files["b"]), tmp_path, before, "--csv", "model B")
    refused(cli(*sweep, "--plot", tmp_path / "s.png", "--csv", tmp_path / "s.png"), tmp_path, before, "--csv", "--plot")
    refused(cli(*sweep, "--task", f"a={files['test_a']}", "--csv", files["test_a"]), tmp_path, before, "--csv", "task 'a'")


@pytest.mark.parametrize("name", ["out.txt", "out"])
def test_sweep_plot_needs_an_image_file_name(files, tmp_path, name):
    before = snapshot(tmp_path)
    refused(cli("sweep", files["a"], files["b"], "-d", files["calib"], "--plot", tmp_path / name), tmp_path, before,
            "--plot", "out.png")


def test_sweep_plot_without_matplotlib_is_refused_before_the_sweep(files, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    before = snapshot(tmp_path)
    result = cli("sweep", files["a"], files["b"], "-d", files["calib"], "--plot", tmp_path / "s.png")
    refused(result, tmp_path, before, "pip install 'onnxzip[plot]'")  # the extra's brackets are printed


def test_sweep_says_where_it_wrote(files, tmp_path):
    csv, png = tmp_path / "rows.csv", tmp_path / "plot.png"
    r = cli("sweep", files["a"], files["b"], "-d", files["calib"], "--tasks", "a,b", "--methods", "zipit",
            "--csv", csv, "--plot", png)
    assert r.exit_code == 0, r.output
    assert f"wrote csv: {csv}" in r.output.replace("\n", "") and f"wrote plot: {png}" in r.output.replace("\n", "")
    assert csv.read_text().startswith("kind,method") and png.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".onnxzip-*"))


def test_eval_refuses_a_one_output_model_on_two_tasks(files):
    r = cli("eval", files["a"], "--task", f"a={files['test_a']}", "--task", f"b={files['test_b']}")
    assert_one_line_error(r, "one output", "--ensemble")
    ok = cli("eval", files["a"], "--task", f"a={files['test_a']}", "--json")
    assert ok.exit_code == 0, ok.output


def test_task_names_come_from_the_data_keys(files, tmp_path):
    """Without --tasks, the keys of --eval name the tasks (not the file stems)."""
    out = tmp_path / "out.onnx"
    r = cli("zip", files["a"], files["b"], "-d", files["calib"], "-o", out, "--eval",
            f"first={files['test_a']},second={files['test_b']}", "--json")
    assert r.exit_code == 0, r.output
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["onnxzip.tasks"] == "first,second"


def test_sweep_depths_out_of_range_are_refused_before_the_statistics_pass(files, tmp_path, monkeypatch):
    import onnxzip.pipeline

    def no_statistics(*args, **kwargs):
        raise AssertionError("the statistics pass ran before the options were checked")

    monkeypatch.setattr(onnxzip.pipeline, "collect_stats", no_statistics)
    before = snapshot(tmp_path)
    refused(cli("sweep", files["a"], files["b"], "-d", files["calib"], "--depths", "1,7"), tmp_path, before,
            "--depths [7] out of range")
