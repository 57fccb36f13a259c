"""Embedding models zipped end to end: accuracy of every method at --stop-at all.

    python bench/embedding_table.py [--archs mlp,vgg] [--out bench/results/embedding_table.md]

The embedding pairs of samples/train_embedding.py (a final Linear to 32 features, L2-normalised;
classes scored by cosine against samples/digits/classes_{a,b}.npy). Every layer is shared, the
final one included: the zipped model has one embedding output serving both tasks, scored against
each task's class embeddings. Joint and task-average accuracy % on the test splits, for the
ensemble, average, permute, zipit at the paper's alpha/beta and zipit with the label-free choice
(the default), with the correction; also the default at the default depth (all but the final layer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxzip import zip_models  # noqa: E402
from onnxzip.evaluate import EmbeddingScorer, EnsemblePredictor, ModelPredictor, evaluate, load_task_data  # noqa: E402
from onnxzip.predictions import load_class_embeddings  # noqa: E402

SAMPLES = ROOT / "samples" / "digits"
CANDIDATES = [
    ("average", "average", {}, "all"),
    ("permute", "permute", {}, "all"),
    ("zipit (0.3, 0.125)", "zipit", {"alpha": 0.3, "beta": 0.125}, "all"),
    ("zipit, label-free (default)", "zipit", {}, "all"),
    ("zipit, label-free, all but the final layer", "zipit", {}, None),
]


def run_arch(arch: str) -> list[str]:
    models = [str(SAMPLES / f"{arch}_emb_{t}.onnx") for t in "ab"]
    classes = {t: load_class_embeddings(SAMPLES / f"classes_{t}.npy") for t in "ab"}
    tasks = {t: load_task_data(SAMPLES / f"test_{t}.npz", models[0]) for t in "ab"}
    members = {t: EmbeddingScorer(ModelPredictor(m, task=t), classes) for m, t in zip(models, "ab")}
    ens = evaluate(EnsemblePredictor(members), tasks)
    rows = [f"| {arch} | ensemble | - | {100 * ens.joint:.1f} | {100 * ens.task_average:.1f} |"]
    for label, method, params, stop_at in CANDIDATES:
        z = zip_models(*models, SAMPLES / "calib.npz", method=method, params=params, stop_at=stop_at, tasks=["a", "b"],
                       classes=classes)
        r = evaluate(EmbeddingScorer(ModelPredictor(z.model), classes), tasks)
        chosen = "" if not z.selection else " " + ", ".join(f"{k} {v}" for k, v in z.selection["alpha_beta"].items())
        rows.append(f"| {arch} | {label}{chosen} | {z.stop_at}/{z.num_layers} | {100 * r.joint:.1f} | "
                    f"{100 * r.task_average:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="mlp,vgg")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args()
    lines = ["| pair | zip | shared | joint % | task avg % |", "|---|---|---|---:|---:|"]
    for arch in args.archs.split(","):
        lines += run_arch(arch)
    text = "\n".join(lines)
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
