"""Label-free alpha/beta choice against the paper's defaults and the best grid point by test labels.

    python bench/select_table.py [--pairs resnet20,vgg] [--search coordinate|grid]

For every bundled sample pair (full depth: all layers but the heads shared, with repair), prints
joint accuracy on the test splits for: the paper's default alpha=0.3 beta=0.125; the label-free
auto choice (fidelity to the source models on 20% of the calibration data held out of the
statistics); and the best point of the paper's 6 x 6 grid chosen with the test labels (an upper
bound no user has). All candidates use the same statistics (collected once per pair).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxzip.evaluate import load_task_data  # noqa: E402
from onnxzip.pipeline import prepare_pair  # noqa: E402
from onnxzip.select import ALPHA_GRID, BETA_GRID, make_holdout, search_alpha_beta  # noqa: E402

SAMPLES = ROOT / "samples" / "digits"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="mlp,vgg,resnet20,mobilenet")
    ap.add_argument("--search", default="coordinate")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    rows = []
    print("| pair | paper default (0.3, 0.125) | label-free auto (alpha, beta) | search time | best grid point by test labels |")
    print("|---|---:|---:|---:|---:|")
    for name in args.pairs.split(","):
        e = manifest[name]
        labeled = {t: load_task_data(SAMPLES / e[f"test_{t}"]) for t in "ab"}
        pair = prepare_pair(str(SAMPLES / e["a"]), str(SAMPLES / e["b"]), str(SAMPLES / e["calib"]), tasks=["a", "b"], holdout=0.2)
        hold = make_holdout(pair)
        t = time.perf_counter()
        # the full grid, scored both ways: the label-free choice must not see the labels, so it
        # is made by the same search the CLI runs, on fidelity only
        best, tried = search_alpha_beta(pair, hold, search=args.search, labeled=labeled)
        search_s = time.perf_counter() - t
        auto = next(c for c in tried if c.params == best)
        grid_best, grid = search_alpha_beta(pair, hold, search="grid", labeled=labeled, select_by="accuracy")
        g = next(c for c in grid if c.params == grid_best)
        default = next(c for c in grid if c.params == {"alpha": 0.3, "beta": 0.125})
        row = {
            "pair": name, "default_joint": default.accuracy["joint"], "auto": best, "auto_joint": auto.accuracy["joint"],
            "auto_candidates": len(tried), "search_seconds": search_s, "grid_best": grid_best, "grid_best_joint": g.accuracy["joint"],
        }
        rows.append(row)
        print(f"| {name} | {100 * row['default_joint']:.1f} | {100 * row['auto_joint']:.1f} ({best['alpha']}, {best['beta']}) | "
              f"{search_s:.0f}s, {len(tried)} candidates | {100 * row['grid_best_joint']:.1f} ({grid_best['alpha']}, {grid_best['beta']}) |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    assert ALPHA_GRID and BETA_GRID
    main()
