"""Accuracy with sampled and with full covariances, and with the repair on 128 rows or on all.

    python bench/stats_sampling.py [--pairs vgg,resnet20,mobilenet] [--seeds 4]

Per bundled pair (samples/digits), joint accuracy % on the test splits of permute, zipit at the
paper's defaults (alpha 0.3, beta 0.125) and zipit at alpha 0.5, beta 1, all but the heads shared,
for: every position in the covariances with the repair on all 512 calibration rows (onnxzip's
earlier defaults), every position with the repair on 128 rows, and the default (positions sampled,
repair on 128 rows) with several sampling seeds. Pairs whose feature maps are small enough to be
kept whole (mlp, vit) give the same figures with or without sampling and are left out by default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxzip.evaluate import ModelPredictor, evaluate, load_task_data  # noqa: E402
from onnxzip.pipeline import prepare_pair, zip_prepared  # noqa: E402

SAMPLES = ROOT / "samples" / "digits"
CANDIDATES = [("permute", {}), ("zipit", {}), ("zipit", {"alpha": 0.5, "beta": 1.0})]
LABELS = ["permute", "zipit (.3, .125)", "zipit (.5, 1)"]


def run_pair(name: str, entry: dict, seeds: int) -> list[tuple[str, list[float]]]:
    tasks = {t: load_task_data(SAMPLES / entry[f"test_{t}"]) for t in "ab"}
    configs = [("all positions, repair on all rows", True, 0, 0), ("all positions, repair on 128 rows", True, None, 0)]
    configs += [(f"sampled (seed {s}), repair on 128 rows", False, None, s) for s in range(seeds)]
    rows = []
    for label, all_positions, repair_samples, seed in configs:
        pair = prepare_pair(str(SAMPLES / entry["a"]), str(SAMPLES / entry["b"]), str(SAMPLES / entry["calib"]),
                            tasks=["a", "b"], all_positions=all_positions, repair_samples=repair_samples, seed=seed)
        joint = []
        for method, params in CANDIDATES:
            z = zip_prepared(pair, method, params, None, ["a", "b"], repair_samples=repair_samples)
            joint.append(100 * evaluate(ModelPredictor(z.model), tasks).joint)
        rows.append((label, joint))
        print(f"{name}: {label}: " + ", ".join(f"{lb} {j:.1f}" for lb, j in zip(LABELS, joint)), flush=True)
    sampled = [j for label, j in rows if label.startswith("sampled")]
    if sampled:
        rows.append((f"sampled, mean of {len(sampled)} seeds", [statistics.mean(c) for c in zip(*sampled)]))
        rows.append((f"sampled, min - max of {len(sampled)} seeds", [(min(c), max(c)) for c in zip(*sampled)]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="vgg,resnet20,mobilenet")
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    lines = ["| pair | statistics | " + " | ".join(LABELS) + " |", "|---|---|" + "---:|" * len(LABELS)]
    for name in args.pairs.split(","):
        for label, joint in run_pair(name, manifest[name], args.seeds):
            cells = [f"{v[0]:.1f} - {v[1]:.1f}" if isinstance(v, tuple) else f"{v:.1f}" for v in joint]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
