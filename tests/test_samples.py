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
    # exact statistics (the default) are deterministic; the margins are about a third of the measured
    # gaps (ResNet-20: zipit 68.0, permute 58.9, average 23.3; VGG 75.8, 72.2, 34.9; without repair
    # every method is at 10-19), so floating-point differences between machines cannot flip them
    assert joint[("zipit", True)] > joint[("permute", True)] + 0.01
    assert joint[("permute", True)] > joint[("average", True)] + 0.1
    for method in ("average", "permute", "zipit"):
        assert joint[(method, True)] > joint[(method, False)] + 0.05


@pytest.mark.slow
def test_embedding_pair_zips_end_to_end_and_keeps_most_of_the_ensemble():
    """The trained embedding pair at --stop-at all, scored against its class embeddings (exact
    statistics: deterministic; bench/results/embedding_table.md has 86.0 joint against the ensemble's 81.3)."""
    from onnxzip import zip_models
    from onnxzip.evaluate import EmbeddingScorer
    from onnxzip.predictions import load_class_embeddings

    classes = {t: SAMPLES / f"classes_{t}.npy" for t in "ab"}
    models = [SAMPLES / f"vgg_emb_{t}.onnx" for t in "ab"]
    z = zip_models(*models, SAMPLES / "calib.npz", stop_at="all", tasks=["a", "b"], classes=classes)
    loaded = {t: load_class_embeddings(p) for t, p in classes.items()}
    tasks = {t: load_task_data(SAMPLES / f"test_{t}.npz") for t in "ab"}
    zipped = evaluate(EmbeddingScorer(ModelPredictor(z.model), loaded), tasks)
    average = zip_models(*models, SAMPLES / "calib.npz", method="average", stop_at="all", tasks=["a", "b"], classes=classes,
                         refit=False)
    assert z.stop_at == z.num_layers
    assert zipped.joint > 0.8 and zipped.task_average > 0.95
    assert zipped.joint > evaluate(EmbeddingScorer(ModelPredictor(average.model), loaded), tasks).joint + 0.3
