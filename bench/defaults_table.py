"""What the defaults give, and what each statistics approximation costs, on every bundled pair.

    python bench/defaults_table.py [--pairs vgg,resnet20] [--seeds 4] [--out bench/results/defaults_table.md]

Per pair of samples/digits/manifest.json, joint and task-average accuracy % on the test splits,
all but the heads shared, for:

- the default zip (label-free alpha/beta, exact statistics: every position, the correction on
  every calibration row), as `onnxzip zip A B --data calib.npz` makes it;
- zipit at the paper's alpha 0.3, beta 0.125 with exact statistics (`--alpha 0.3 --beta 0.125`);
- the same with each approximation: the correction measured on 128 rows (`--repair-samples 128`),
  covariances on sampled positions (`--sample-positions`, seeds 0..N-1), and both (the defaults
  before exact statistics), as mean and min-max over the seeds.

The last lines give, per approximation, the mean change in joint accuracy over every pair: an
approximation may only be a default where it loses under 0.5 points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxzip import zip_models  # noqa: E402
from onnxzip.evaluate import EnsemblePredictor, ModelPredictor, evaluate, load_task_data  # noqa: E402
from onnxzip.pipeline import prepare_pair, zip_prepared  # noqa: E402

SAMPLES = ROOT / "samples" / "digits"
PAPER = {"alpha": 0.3, "beta": 0.125}
# (label, every position, repair rows (0: all), seeded)
APPROXIMATIONS = [
    ("paper, exact statistics", True, 0, False),
    ("paper, repair on 128 rows", True, 128, False),
    ("paper, sampled positions", False, 0, True),
    ("paper, sampled positions + repair on 128 rows (old default)", False, 128, True),
]


def accuracy(model, tasks) -> tuple[float, float]:
    r = evaluate(ModelPredictor(model), tasks)
    return 100 * r.joint, 100 * r.task_average


def run_pair(name: str, entry: dict, seeds: int) -> list[tuple[str, list[tuple[float, float]]]]:
    files = [str(SAMPLES / entry[k]) for k in ("a", "b", "calib")]
    tasks = {t: load_task_data(SAMPLES / entry[f"test_{t}"], files[0]) for t in "ab"}
    members = {t: ModelPredictor(files[k], task=t) for k, t in enumerate("ab")}
    ens = evaluate(EnsemblePredictor(members), tasks)
    rows = [("ensemble of the two models", [(100 * ens.joint, 100 * ens.task_average)])]
    z = zip_models(files[0], files[1], files[2], tasks=["a", "b"])
    chosen = ", ".join(f"{k} {v}" for k, v in z.selection["alpha_beta"].items())
    rows.append((f"default (label-free: {chosen}), exact statistics", [accuracy(z.model, tasks)]))
    for label, every, repair_rows, seeded in APPROXIMATIONS:
        runs = []
        for seed in range(seeds if seeded else 1):
            pair = prepare_pair(*files, tasks=["a", "b"], all_positions=every, repair_samples=repair_rows, seed=seed)
            runs.append(accuracy(zip_prepared(pair, "zipit", PAPER, None, ["a", "b"], repair_samples=repair_rows).model,
                                 tasks))
        rows.append((label, runs))
        print(f"{name}: {label}: " + "; ".join(f"{j:.1f}/{t:.1f}" for j, t in runs), flush=True)
    return rows


def cell(runs: list[tuple[float, float]], k: int) -> str:
    values = [r[k] for r in runs]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=None, help="comma-separated manifest keys (default: every pair)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args()
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    names = args.pairs.split(",") if args.pairs else list(manifest)
    lines = ["| pair | zip | joint % | task avg % |", "|---|---|---:|---:|"]
    joint: dict[str, list[float]] = {}
    for name in names:
        for label, runs in run_pair(name, manifest[name], args.seeds):
            lines.append(f"| {name} | {label} | {cell(runs, 0)} | {cell(runs, 1)} |")
            joint.setdefault(label.split(" (")[0] if label.startswith("default") else label, []).append(
                statistics.mean(r[0] for r in runs))
    exact = joint["paper, exact statistics"]
    lines += ["", f"Mean change in joint accuracy against exact statistics over {len(names)} pairs "
              f"(sampled: mean of {args.seeds} seeds per pair):", ""]
    for label, _, _, _ in APPROXIMATIONS[1:]:
        diffs = [a - e for a, e in zip(joint[label], exact)]
        lines.append(f"- {label}: {statistics.mean(diffs):+.2f} points (worst pair {min(diffs):+.1f})")
    text = "\n".join(lines)
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
