"""The zoo benchmark runs end to end on two of its models (needs torch: marked exporter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.exporter
def test_zoo_rows_agree_with_themselves(tmp_path):
    from tests.tiny_models import require

    require("torch", "timm", "torchvision", "transformers")
    raw = tmp_path / "raw.json"
    cmd = [sys.executable, str(ROOT / "bench" / "zoo" / "run.py"), "--out", str(tmp_path / "out"), "--json", str(raw),
           "--only", "tv_shufflenet_v2", "--only", "torch_mha", "--exporter", "torchscript"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(raw.read_text())
    assert set(rows) == {"tv_shufflenet_v2/torchscript", "torch_mha/torchscript"}
    for name, r in rows.items():
        assert "export" not in r and "error" not in r, (name, r)
        assert r["inspect"] == "ok", (name, r)
        assert r["check_depth"] == r["inspect_depth"] <= r["layers"], (name, r)
        assert r["stop_at"] == min(r["check_depth"], r["layers"] - 1)
        if r["stop_at"] > 0:  # a zip at the depth check reports works
            assert isinstance(r["self_off"], float) and isinstance(r["self_on"], float), (name, r)
            assert r["pair"] == "ok" and 0.5 <= r["pair_params"] < 1.05, (name, r)  # unmerge indices may add a little
        else:
            assert r["check"] == "not zippable (depth 0)" and "limited_by" in r, (name, r)
    assert "| tv_shufflenet_v2 | torchscript |" in done.stdout
