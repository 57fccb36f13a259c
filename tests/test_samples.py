"""On the real sample pairs: the paper's ordering of methods, and what repair buys (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxzip.evaluate import ModelPredictor, evaluate, load_task_data
from onnxzip.pipeline import prepare_pair, zip_prepared

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "digits"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet20", "vgg"])
def test_zipit_beats_permute_beats_average_and_repair_helps(arch):
    tasks = {t: load_task_data(SAMPLES / f"test_{t}.npz") for t in "ab"}
    pair = prepare_pair(SAMPLES / f"{arch}_a.onnx", SAMPLES / f"{arch}_b.onnx", SAMPLES / "calib.npz",
                        tasks=["a", "b"])
    joint = {}
    for method in ("average", "permute", "zipit"):
        for repair in (True, False):
            z = zip_prepared(pair, method, {}, None, ["a", "b"], do_repair=repair)
            joint[(method, repair)] = evaluate(ModelPredictor(z.model), tasks).joint
    assert joint[("zipit", True)] > joint[("permute", True)] > joint[("average", True)]
    for method in ("average", "permute", "zipit"):
        assert joint[(method, True)] > joint[(method, False)] - 0.03
    assert joint[("zipit", True)] > joint[("zipit", False)] + 0.2
