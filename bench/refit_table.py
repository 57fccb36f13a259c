"""Accuracy of the least-squares refit against the statistics correction, on every bundled pair.

    python bench/refit_table.py [--pairs vgg,resnet20] [--out bench/results/refit_table.md]

Per pair of samples/digits/manifest.json: joint and task-average accuracy (%) on the test sets, at
full depth (all but the heads shared) and at a partial depth (half the layers), with the statistics
correction (REPAIR) and with the refit, at the paper's alpha/beta (0.3, 0.125) and at the label-free
choice (alpha/beta searched on 20% held-out calibration samples); permute and average with each; and
the default (the label-free alpha/beta, then refit or correction, whichever agrees better with the
ensemble on the held-out samples). "gap closed" is (refit - REPAIR) / (ensemble - REPAIR) at full
depth. The zips are deterministic (exact statistics, fixed row subsets, no seed), so each figure is
one run. Timings: the refit and the correction of the paper's full-depth zip, and the statistics pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxzip.evaluate import EnsemblePredictor, ModelPredictor, evaluate, load_task_data  # noqa: E402
from onnxzip.pipeline import prepare_pair, zip_prepared  # noqa: E402
from onnxzip.select import fidelity, make_holdout, search_alpha_beta  # noqa: E402

SAMPLES = ROOT / "samples" / "digits"
PAPER = {"alpha": 0.3, "beta": 0.125}


def accuracy(model, tasks) -> tuple[float, float]:
    r = evaluate(ModelPredictor(model), tasks)
    return 100 * r.joint, 100 * r.task_average


def run_pair(name: str, entry: dict) -> dict:
    files = [str(SAMPLES / entry[k]) for k in ("a", "b", "calib")]
    tasks = {t: load_task_data(SAMPLES / entry[f"test_{t}"], files[0]) for t in "ab"}
    ens = evaluate(EnsemblePredictor({t: ModelPredictor(files[k], task=t) for k, t in enumerate("ab")}), tasks)
    out = {"ensemble": (100 * ens.joint, 100 * ens.task_average)}
    pair = prepare_pair(*files, tasks=["a", "b"])
    m = pair.graphs[0].num_layers
    partial = max(1, m // 2)
    out["statistics_s"] = pair.timings.get("statistics", 0.0)
    for label, method, params, depth in (("paper", "zipit", PAPER, None), (f"paper, depth {partial}/{m}", "zipit", PAPER, partial),
                                         ("permute", "permute", {}, None), ("average", "average", {}, None)):
        for refit in (False, True):
            t = time.perf_counter()
            z = zip_prepared(pair, method, params, depth, ["a", "b"], refit=refit)
            seconds = time.perf_counter() - t
            out[(label, refit)] = accuracy(z.model, tasks)
            if label == "paper":
                out[("seconds", refit)] = z.timings.get("refit" if refit else "repair", seconds)
            print(f"{name}: {label} {'refit' if refit else 'REPAIR'}: {out[(label, refit)][0]:.1f} ({seconds:.1f}s)", flush=True)
    held = prepare_pair(*files, tasks=["a", "b"], holdout=0.2)
    hold = make_holdout(held)
    best, _ = search_alpha_beta(held, hold)
    fid = {}
    for refit in (False, True):
        z = zip_prepared(held, "zipit", best, None, ["a", "b"], refit=refit)
        out[("label-free", refit)] = accuracy(z.model, tasks)
        fid[refit] = fidelity(z.model, hold, ["a", "b"], held.providers).joint
    out["label-free params"] = best
    out["default"] = out[("label-free", fid[True] > fid[False])]
    out["default refit"] = fid[True] > fid[False]
    print(f"{name}: label-free {best}: REPAIR {out[('label-free', False)][0]:.1f}, refit {out[('label-free', True)][0]:.1f}; "
          f"default {'refit' if out['default refit'] else 'REPAIR'}", flush=True)
    return out


def table(results: dict) -> str:
    def cell(v):
        return f"{v[0]:.1f} / {v[1]:.1f}"

    lines = ["Joint / task-average accuracy (%) on the test sets.", "",
             "| pair | ensemble | paper REPAIR | paper refit | gap closed | partial REPAIR | partial refit | "
             "label-free REPAIR | label-free refit | default | permute REPAIR | permute refit | average REPAIR | "
             "average refit | REPAIR s | refit s | statistics s |",
             "|---|" + "---:|" * 16]
    for name, r in results.items():
        partial = next(k[0] for k in r if isinstance(k, tuple) and str(k[0]).startswith("paper, depth"))
        ens, rep, fit = r["ensemble"][0], r[("paper", False)][0], r[("paper", True)][0]
        closed = (fit - rep) / (ens - rep) if ens > rep else float("nan")
        default = cell(r["default"]) + (" (refit)" if r["default refit"] else " (REPAIR)")
        lines.append(
            f"| {name} | {cell(r['ensemble'])} | {cell(r[('paper', False)])} | {cell(r[('paper', True)])} | {closed:.0%} | "
            f"{cell(r[(partial, False)])} | {cell(r[(partial, True)])} ({partial.split('depth ')[1]}) | "
            f"{cell(r[('label-free', False)])} | {cell(r[('label-free', True)])} | {default} | "
            f"{cell(r[('permute', False)])} | {cell(r[('permute', True)])} | {cell(r[('average', False)])} | "
            f"{cell(r[('average', True)])} | {r[('seconds', False)]:.2f} | {r[('seconds', True)]:.2f} | "
            f"{r['statistics_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=None, help="comma-separated manifest keys (default: every pair)")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args()
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    names = args.pairs.split(",") if args.pairs else list(manifest)
    results = {name: run_pair(name, manifest[name]) for name in names}
    text = table(results)
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
