"""The CLI commands, and the README's and samples' commands as written."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "digits"
runner = CliRunner()


def test_methods_lists_the_registry():
    r = runner.invoke(app, ["methods", "--json"])
    assert r.exit_code == 0
    names = {m["name"] for m in json.loads(r.output)}
    assert {"zipit", "permute", "average"} <= names


def test_inspect_resnet20_numbers_layers_like_the_paper():
    r = runner.invoke(app, ["inspect", str(SAMPLES / "resnet20_a.onnx"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["num_layers"] == 20
    shortcuts = [l for l in info["layers"] if l["shortcut"]]
    assert [l["number"] for l in shortcuts] == [9, 15]  # counted with the block they bypass
    assert sum(1 for l in info["layers"] if not l["shortcut"]) == 20
    # the residual stream of each stage is one group read by several layers
    assert max(len(g["measured_at"]) for g in info["groups"]) >= 3
    text = runner.invoke(app, ["inspect", str(SAMPLES / "resnet20_a.onnx")])
    assert text.exit_code == 0 and "shortcut" in text.output


def test_check_across_exporters():
    r = runner.invoke(app, ["check", str(SAMPLES / "mlp_a.onnx"), str(SAMPLES / "mlp_b.dynamo.onnx"), "--json"])
    assert r.exit_code == 0
    assert json.loads(r.output)["zippable"] is True


def test_zip_json_report_and_eval(tmp_path):
    out = tmp_path / "z.onnx"
    rep = tmp_path / "r.json"
    r = runner.invoke(app, [
        "zip", str(SAMPLES / "mlp_a.onnx"), str(SAMPLES / "mlp_b.dynamo.onnx"), "--data", str(SAMPLES / "calib.npz"),
        "-o", str(out), "--tasks", "a,b", "--report", str(rep), "--json",
        "--eval", f"a={SAMPLES / 'test_a.npz'},b={SAMPLES / 'test_b.npz'}",
    ])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary == json.loads(rep.read_text())
    assert summary["outputs"] == {"a": ["a/logits"], "b": ["b/logits"]}
    assert set(summary["eval"]) == {"model A", "model B", "ensemble", "zipped"}
    assert summary["cost"]["zipped"]["params"] < summary["cost"]["model A"]["params"] * 1.1
    model = onnx.load(out)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["onnxzip.method"] == "zipit" and meta["onnxzip.stop_at"] == "2/3"
    assert len(json.loads(meta["onnxzip.sources"])) == 2


def test_eval_ensemble_equals_numpy(tmp_path):
    r = runner.invoke(app, ["eval", "--task", f"a={SAMPLES / 'test_a.npz'}", "--task", f"b={SAMPLES / 'test_b.npz'}",
                            "--ensemble", str(SAMPLES / "vgg_a.onnx"), "--ensemble", str(SAMPLES / "vgg_b.onnx"), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["ensemble"]["joint"]
    import onnxruntime as ort

    right = total = 0
    logits = {}
    for t in "ab":
        d = np.load(SAMPLES / f"test_{t}.npz")
        for m in "ab":
            s = ort.InferenceSession(str(SAMPLES / f"vgg_{m}.onnx"))
            logits[(t, m)] = s.run(None, {"input": d["input"]})[0]
    for t in "ab":
        labels = np.load(SAMPLES / f"test_{t}.npz")["labels"]
        p = [np.exp(logits[(t, m)] - logits[(t, m)].max(1, keepdims=True)) for m in "ab"]
        p = np.concatenate([q / q.sum(1, keepdims=True) for q in p], axis=1)
        want = labels + (0 if t == "a" else 5)
        right += int((p.argmax(1) == want).sum())
        total += len(labels)
    assert got == pytest.approx(right / total)


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    return [line for b in blocks for line in b.splitlines() if line.startswith("pip install -e")]


@pytest.mark.slow
def test_readme_main_job_runs_as_written(tmp_path):
    cmds = _readme_commands()
    main = next(c for c in cmds if "onnxzip zip" in c)
    zip_part = main.split("&&", 1)[1].strip()
    args = shlex.split(zip_part)
    exe = [sys.executable, "-m", "cli.main"]
    out = tmp_path / "zipped.onnx"
    args = [str(out) if a == "resnet20_zipped.onnx" else a for a in args[1:]]
    r = subprocess.run(exe + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "ensemble" in r.stdout and "zipped" in r.stdout
    assert out.exists()
    test_cmd = next(c for c in cmds if "pytest" in c)
    assert test_cmd.split("&&", 1)[1].strip() == "python -m pytest -q"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip install")]
    assert ci == [test_cmd, "pip install -e '.[export]' && python -m pytest -q -m exporter"]


@pytest.mark.slow
@pytest.mark.exporter  # samples/train_digits.py needs torch and scikit-learn
def test_samples_regenerate_command_runs(tmp_path):
    """samples/README's command, shortened (one pair, one epoch), then the result zips."""
    out = tmp_path / "digits"
    r = subprocess.run([sys.executable, "samples/train_digits.py", "--only", "mlp", "--epochs", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("mlp_a.onnx", "mlp_b.onnx", "calib.npz", "test_a.npz", "test_b.npz", "manifest.json"):
        assert (out / name).exists(), name
    z = runner.invoke(app, ["zip", str(out / "mlp_a.onnx"), str(out / "mlp_b.onnx"), "-d", str(out / "calib.npz"),
                            "-o", str(tmp_path / "z.onnx")])
    assert z.exit_code == 0, z.output


@pytest.mark.slow
@pytest.mark.exporter  # samples/train_transformers.py needs torch, transformers and scikit-learn
def test_transformer_samples_command_runs(tmp_path):
    """samples/train_transformers.py shortened (the BERT pair, one epoch, no dynamo): the token files it
    writes are the committed ones byte for byte, the manifest gets the pair, and the pair zips."""
    import shutil

    out = tmp_path / "digits"
    out.mkdir()
    for name in ("calib", "train_a", "train_b", "test_a", "test_b"):
        shutil.copy(SAMPLES / f"{name}.npz", out)
    r = subprocess.run([sys.executable, "samples/train_transformers.py", "--only", "bert", "--epochs", "1",
                        "--no-dynamo", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("calib", "train_a", "train_b", "test_a", "test_b"):
        assert (out / f"tokens_{name}.npz").read_bytes() == (SAMPLES / f"tokens_{name}.npz").read_bytes(), name
    entry = json.loads((out / "manifest.json").read_text())["bert"]
    assert entry == json.loads((SAMPLES / "manifest.json").read_text())["bert"]
    z = runner.invoke(app, ["zip", str(out / "bert_a.onnx"), str(out / "bert_b.onnx"), "-d", str(out / entry["calib"]),
                            "--tasks", "a,b", "-o", str(tmp_path / "z.onnx")])
    assert z.exit_code == 0, z.output


@pytest.mark.slow
def test_samples_table_command_runs():
    r = subprocess.run([sys.executable, "bench/samples_table.py", "--pairs", "mlp"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [l for l in r.stdout.splitlines() if l.startswith("| mlp |")]
    assert len(rows) >= 10 and any("ensemble" in l for l in rows)


def test_zip_nhwc_with_nchw_takes_the_chosen_layout_and_evaluates(tmp_path):
    """A Keras NHWC model zips with a torch NCHW one; --eval runs the sources as zipped."""
    nhwc = SAMPLES / "keras_mlp_a.nhwc.onnx"
    out = tmp_path / "z.onnx"
    r = runner.invoke(app, ["zip", str(nhwc), str(SAMPLES / "mlp_b.onnx"), "-d", str(SAMPLES / "calib.npz"), "-o", str(out),
                            "--tasks", "a,b", "--input-layout", "NCHW", "--json",
                            "--eval", f"a={SAMPLES / 'test_a.npz'},b={SAMPLES / 'test_b.npz'}"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert any("layout" in w for w in summary["warnings"])
    assert onnx.load(out).graph.input[0].type.tensor_type.shape.dim[1].dim_value == 1  # N, C=1, H, W
    assert summary["eval"]["model A"]["per_task"]["a"] > 0.9


def test_zip_sampling_options_reach_the_statistics(tiny, calib, tmp_path):
    """Exact by default (every position, the repair on every row); --sample-positions with a given
    --seed gives the same model; --repair-samples reaches the zip (the seed's effect on the
    statistics is tested in test_stats)."""
    a, b = tiny("resnet", seed=0), tiny("resnet", seed=1)

    def zip_with(name, *extra):
        out = tmp_path / f"{name}.onnx"
        r = runner.invoke(app, ["zip", str(a), str(b), "-d", str(calib), "-o", str(out), "--json", "--alpha", "0.3",
                                "--beta", "0.125", "--no-refit", *extra])
        assert r.exit_code == 0, r.output
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
        return json.loads(r.output), weights

    rows = len(np.load(calib)["input"])
    summary, _ = zip_with("default")
    _, sampled = zip_with("sampled", "--sample-positions", "--seed", "0")
    _, again = zip_with("again", "--sample-positions", "--seed", "0")
    fewer, _ = zip_with("fewer", "--repair-samples", str(rows // 3))
    assert all(np.array_equal(sampled[k], again[k]) for k in sampled)
    assert summary["repair"]["samples"] == rows
    # every 4th row: the smallest power-of-two step that leaves at most rows // 3
    assert fewer["repair"]["samples"] == -(-rows // 4)


@pytest.mark.parametrize("command", ["zip", "sweep", "eval", "inspect", "check", "methods"])
def test_help_fits_80_columns_and_cuts_nothing(command):
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in r.output
    if command == "zip":  # every option's whole help text is there
        text = " ".join(r.output.split())
        assert "a=test_a.npz,b=test_b.npz or repeated." in text
        assert len(lines) < 100


def test_inspect_shows_declared_inputs_whole_names_and_head_ties_between_groups():
    info = json.loads(runner.invoke(app, ["inspect", str(SAMPLES / "vit_a.onnx"), "--json"]).output)
    assert info["inputs"] == {"input": ["batch", 1, 16, 16]}
    r = runner.invoke(app, ["inspect", str(SAMPLES / "vit_a.onnx")], terminal_width=80)
    assert r.exit_code == 0 and "…" not in r.output
    ties = [g for g in info["groups"] if g["attention_heads"] > 1 and g["attention_tie"] not in (None, g["group"])]
    wide = runner.invoke(app, ["inspect", str(SAMPLES / "vit_a.onnx")], terminal_width=200).output
    assert ties and wide.count("(tied with") == len(ties)  # a group is never tied with itself
