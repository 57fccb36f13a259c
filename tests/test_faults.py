"""Nothing lost: a failed or killed run leaves no output and never touches the inputs;
the same inputs give a byte-identical output."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxzip
from tests.onnx_builders import mlp, random_mlp_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(mlp(random_mlp_weights([10, 16, 12, 3], 0)), a)
    onnx.save(mlp(random_mlp_weights([10, 16, 12, 3], 1)), b)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(100, 10)).astype(np.float32))
    return a, b, data


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_failure_while_saving_leaves_the_old_output_and_no_temporary_files(pair, tmp_path, monkeypatch):
    a, b, data = pair
    before = digest(a), digest(b)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"an earlier result the user keeps")
    calls = []

    def broken(model, path, *args, **kwargs):  # the disk fills up half-way through the file
        calls.append(path)
        Path(path).write_bytes(model.SerializeToString()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        onnxzip.zip_models(a, b, data, output=out)
    assert calls and Path(calls[0]).parent != out.parent  # the save itself failed, in a temporary folder
    assert out.read_bytes() == b"an earlier result the user keeps"
    assert not list(tmp_path.glob(".onnxzip-*"))
    assert (digest(a), digest(b)) == before


def test_killed_run_leaves_the_old_output(pair, tmp_path):
    a, b, data = pair
    before = digest(a), digest(b)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"an earlier result the user keeps")
    marker = tmp_path / "writing"
    script = f"""
import time, onnx
from pathlib import Path
def slow(model, path, *a, **k):  # killed while the file is half written
    Path(path).write_bytes(model.SerializeToString()[:100])
    open({str(marker)!r}, "w").close()
    time.sleep(60)
onnx.save_model = slow
import onnxzip
onnxzip.zip_models({str(a)!r}, {str(b)!r}, {str(data)!r}, output={str(out)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached the save"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.read_bytes() == b"an earlier result the user keeps"
    assert (digest(a), digest(b)) == before


def test_same_inputs_give_a_byte_identical_file(pair, tmp_path):
    a, b, data = pair
    outs = []
    for seed in ("1", "2"):  # different hash seeds: no dependence on set or dict ordering
        out = tmp_path / f"out{seed}.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-m", "cli.main", "zip", str(a), str(b), "-d", str(data), "-o", str(out),
                            "--stop-at", "1"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_models_over_the_protobuf_limit_go_through_external_data(pair, tmp_path, monkeypatch):
    """Above the limit, sessions read a temporary copy with external data and the output is saved
    with external data (the limit is lowered here to exercise the same code on a small model)."""
    import onnxzip.io as io

    _, _, data = pair
    a, b = tmp_path / "wide_a.onnx", tmp_path / "wide_b.onnx"
    onnx.save(mlp(random_mlp_weights([10, 64, 32, 3], 0)), a)
    onnx.save(mlp(random_mlp_weights([10, 64, 32, 3], 1)), b)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    assert io.is_large(onnx.load(a))
    out = tmp_path / "big.onnx"
    onnxzip.zip_models(a, b, data, output=out)
    assert (tmp_path / "big.onnx.data").exists()
    loaded = io.load_model(out)
    assert any(t.HasField("raw_data") for t in loaded.graph.initializer)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out))
    x = np.random.default_rng(1).normal(size=(3, 10)).astype(np.float32)
    assert all(np.isfinite(o).all() for o in sess.run(None, {"x": x}))
