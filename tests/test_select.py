"""Label-free choice of alpha, beta and depth; sweeps reuse one statistics pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import onnxzip
import onnxzip.pipeline as pipeline
from cli.main import app
from onnxzip.cost import count_flops
from onnxzip.errors import OptionError
from onnxzip.select import fidelity, make_holdout, sweep

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "digits"
A, B, CALIB = SAMPLES / "mlp_a.onnx", SAMPLES / "mlp_b.onnx", SAMPLES / "calib.npz"


def test_auto_alpha_beta_reports_every_candidate_and_keeps_the_best():
    r = onnxzip.zip_models(A, B, CALIB, params={"alpha": "auto", "beta": "auto"}, tasks=["a", "b"])
    sel = r.selection
    assert len(sel["candidates"]) == 11  # coordinate search over the paper's 6 x 6 grid
    best = max(c["score"] for c in sel["candidates"])
    chosen = [c for c in sel["candidates"] if c["params"] == sel["alpha_beta"]][0]
    assert chosen["score"] == best
    assert (r.params["alpha"], r.params["beta"]) == (sel["alpha_beta"]["alpha"], sel["alpha_beta"]["beta"])
    assert sel["holdout_samples"] > 50 and r.samples < 512  # held-out samples are not in the statistics


def test_fixed_beta_searches_alpha_only():
    r = onnxzip.zip_models(A, B, CALIB, params={"alpha": "auto", "beta": 0.5}, tasks=["a", "b"])
    assert {c["params"]["beta"] for c in r.selection["candidates"]} == {0.5}
    assert len(r.selection["candidates"]) == 6


PAPER = {"alpha": 0.3, "beta": 0.125}


def test_stop_at_auto_meets_min_fidelity():
    r = onnxzip.zip_models(A, B, CALIB, params=PAPER, stop_at="auto", min_fidelity=0.8, tasks=["a", "b"])
    tried = {c["stop_at"]: c["score"] for c in r.selection["candidates"]}
    assert tried[r.stop_at] >= 0.8
    deeper = [d for d in tried if d > r.stop_at]
    assert all(tried[d] < 0.8 for d in deeper)  # it is the deepest that meets the target


def test_stop_at_auto_respects_max_flops():
    r = onnxzip.zip_models(A, B, CALIB, stop_at="auto", max_flops=0.7, tasks=["a", "b"])
    both = count_flops(str(A)).total + count_flops(str(B)).total
    assert count_flops(r.model).total <= 0.7 * both


def test_the_default_zip_chooses_alpha_and_beta_without_labels_and_says_why():
    r = onnxzip.zip_models(A, B, CALIB, tasks=["a", "b"])
    assert r.selection is not None and set(r.selection["alpha_beta"]) == {"alpha", "beta"}
    assert (r.params["alpha"], r.params["beta"]) == (r.selection["alpha_beta"]["alpha"], r.selection["alpha_beta"]["beta"])
    assert "highest joint agreement with the ensemble" in r.selection["reason"]
    paper = onnxzip.zip_models(A, B, CALIB, params=PAPER, tasks=["a", "b"])
    assert (paper.params["alpha"], paper.params["beta"]) == (0.3, 0.125)
    assert "alpha_beta" not in paper.selection and "correction" in paper.selection["reason"]  # refit or not: chosen too


def test_depth_search_never_settles_for_no_sharing_unless_allowed():
    """Sharing nothing always agrees with the ensemble: it is not a zip, so it is not a success."""
    with pytest.raises(OptionError, match="that shares a layer reaches fidelity 1.000.*--allow-no-sharing"):
        onnxzip.zip_models(A, B, CALIB, params=PAPER, stop_at="auto", min_fidelity=1.0, tasks=["a", "b"])
    r = onnxzip.zip_models(A, B, CALIB, params=PAPER, stop_at="auto", min_fidelity=1.0, tasks=["a", "b"],
                           allow_no_sharing=True)
    assert r.stop_at == 0
    r = onnxzip.zip_models(A, B, CALIB, params=PAPER, stop_at="auto", max_flops=1.0, tasks=["a", "b"])
    assert r.stop_at >= 1


def test_task_names_come_from_the_per_task_data_keys():
    r = onnxzip.zip_models(A, B, {"left": SAMPLES / "test_a.npz", "right": SAMPLES / "test_b.npz"}, params=PAPER)
    assert r.tasks == ["left", "right"] and set(r.layout.outputs) == {"left", "right"}


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(OptionError, match="no zip depth fits"):
        onnxzip.zip_models(A, B, CALIB, stop_at="auto", max_flops=0.1, tasks=["a", "b"])
    with pytest.raises(OptionError, match="exactly one target"):
        onnxzip.zip_models(A, B, CALIB, stop_at="auto", tasks=["a", "b"])


def test_sweep_collects_statistics_once(monkeypatch):
    calls = []
    real = pipeline.collect_stats
    monkeypatch.setattr(pipeline, "collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    pair = pipeline.prepare_pair(str(A), str(B), str(CALIB), tasks=["a", "b"], holdout=0.2)
    hold = make_holdout(pair)
    result = sweep(pair, hold, ["zipit", "permute"], None, {}, latency=False)
    assert len(calls) == 1
    cands = [r for r in result["rows"] if r["kind"] == "candidate"]
    assert len(cands) == 2 * pair.graphs[0].num_layers  # depths 0 .. m-1 for each method
    zero = [r for r in cands if r["stop_at"] == 0]
    assert all(r["joint_agreement"] == 1.0 for r in zero)  # sharing nothing is the ensemble
    assert all(abs(r["flops_rel"] - 1.0) < 1e-6 for r in zero)


def test_fidelity_of_the_sources_is_perfect():
    pair = pipeline.prepare_pair(str(A), str(B), str(CALIB), tasks=["a", "b"], holdout=0.2)
    hold = make_holdout(pair)
    z = pipeline.zip_prepared(pair, "zipit", {}, 0, ["a", "b"])
    f = fidelity(z.model, hold, ["a", "b"])
    assert f.joint == 1.0 and all(v == 1.0 for v in f.per_task.values())


def test_sweep_cli_json_csv(tmp_path):
    r = CliRunner().invoke(app, ["sweep", str(A), str(B), "-d", str(CALIB), "--tasks", "a,b", "--methods", "zipit",
                                 "--depths", "0,2", "--no-latency", "--json", "--csv", str(tmp_path / "s.csv"),
                                 "--task", f"a={SAMPLES / 'test_a.npz'}", "--task", f"b={SAMPLES / 'test_b.npz'}"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert [x["method"] for x in rows] == ["ensemble", "model A", "model B", "zipit", "zipit"]
    assert rows[3]["accuracy"]["joint"] == pytest.approx(rows[0]["accuracy"]["joint"])
    assert (tmp_path / "s.csv").read_text().count("\n") == 6


class RecordingProgress:
    def __init__(self):
        self.stages = []  # [name, total, advanced]

    def start(self, name, total):
        self.stages.append([name, total, 0])

    def advance(self, n=1):
        self.stages[-1][2] += n


def test_every_search_reports_progress_to_its_end():
    progress = RecordingProgress()
    onnxzip.zip_models(A, B, CALIB, params={"alpha": "auto", "beta": "auto"}, tasks=["a", "b"], stop_at="auto",
                       min_fidelity=0.0, progress=progress)
    names = [s[0] for s in progress.stages]
    assert names[0] == "statistics" and "alpha, beta" in names and "depth" in names
    assert progress.stages[-1] == ["refit or correction", 2, 2]  # the correction alone, then the refit
    search = progress.stages[names.index("alpha, beta")]
    assert search[1:] == [11, 11]  # the coordinate search's 11 candidates, each counted once
    pair = pipeline.prepare_pair(A, B, CALIB, tasks=["a", "b"], holdout=0.2)
    progress = RecordingProgress()
    rows = sweep(pair, make_holdout(pair), ["zipit", "average"], [0, 1], tasks=["a", "b"], progress=progress)["rows"]
    assert progress.stages == [["sweep", 4, 4]] and sum(r["kind"] == "candidate" for r in rows) == 4


def test_sweep_takes_task_names_from_the_task_keys(tmp_path):
    """Without --tasks, the keys of --task name the tasks (the labeled data then fits the heads)."""
    r = CliRunner().invoke(app, ["sweep", str(A), str(B), "-d", str(CALIB), "--methods", "zipit", "--depths", "1",
                                 "--task", f"first={SAMPLES / 'test_a.npz'}", "--task", f"second={SAMPLES / 'test_b.npz'}",
                                 "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    zipped = next(x for x in rows if x["kind"] == "candidate")
    assert set(zipped["accuracy"]["per_task"]) == {"first", "second"}
