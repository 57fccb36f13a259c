"""Accuracy, parameters and FLOPs of zipping three models (and two of them) on the three-task digits
sample (samples/digits3, samples/train_digits3.py).

    python bench/n_models_table.py [--archs resnet20w1,vgg] [--json out.json]

Per architecture and for N = 3 (tasks t0, t1, t2) and N = 2 (t0, t1): each model, the ensemble of the
N models, average, permute, zipit at the paper's alpha 0.3, beta 0.125 (statistics correction) and the
default zip (alpha, beta and refit-or-correction chosen without labels) at full depth (all layers but
the heads shared) and zipit (0.3, 0.125) at two partial depths. Joint accuracy is the argmax over all N
tasks' classes (each head's softmax, concatenated); params and FLOPs relative to running all N models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from onnxzip import zip_models  # noqa: E402
from onnxzip.cost import count_flops, count_params  # noqa: E402
from onnxzip.evaluate import EnsemblePredictor, ModelPredictor, evaluate, load_task_data  # noqa: E402
from onnxzip.pipeline import prepare_models, zip_prepared  # noqa: E402
from samples_table import partial_depths  # noqa: E402

SAMPLES = ROOT / "samples" / "digits3"
PAPER = {"alpha": 0.3, "beta": 0.125}


def _cost(model) -> tuple[int, float]:
    return count_params(model), count_flops(model).total


def rows_for(arch: str, tasks: list[str]) -> list[dict]:
    paths = [str(SAMPLES / f"{arch}_{t}.onnx") for t in tasks]
    calib = str(SAMPLES / "calib.npz")
    data = {t: load_task_data(SAMPLES / f"test_{t}.npz") for t in tasks}
    members = {t: ModelPredictor(p, task=t) for t, p in zip(tasks, paths)}
    costs = [_cost(p) for p in paths]
    every = (sum(c[0] for c in costs), sum(c[1] for c in costs))
    rows = []

    def add(label, predictor, cost):
        r = evaluate(predictor, data)
        rows.append({"arch": arch, "n": len(tasks), "model": label, "joint": r.joint, "task_avg": r.task_average,
                     **{t: r.per_task.get(t) for t in tasks}, "params_rel": cost[0] / every[0],
                     "flops_rel": cost[1] / every[1]})

    for k, t in enumerate(tasks):
        add(f"model {t}", members[t], costs[k])
    add(f"ensemble of {len(tasks)}", EnsemblePredictor(members), every)
    z = zip_models(paths, calib, tasks=tasks)
    chosen = ",".join(f"{k}={v}" for k, v in z.selection["alpha_beta"].items())
    add(f"default: zipit label-free ({chosen}) {z.stop_at}/{z.num_layers}", ModelPredictor(z.model), _cost(z.model))
    pair = prepare_models(paths, calib, tasks=tasks)
    m = pair.graphs[0].num_layers
    configs = [("average", {}, None), ("permute", {}, None), ("zipit", PAPER, None)]
    configs += [("zipit", PAPER, d) for d in partial_depths(m)]
    for method, params, depth in configs:
        z = zip_prepared(pair, method, params, depth, tasks, refit=False)
        label = f"{method}{' 0.3/0.125' if params else ''} {z.stop_at}/{m}"
        add(label, ModelPredictor(z.model), _cost(z.model))
    return rows


def markdown(rows: list[dict]) -> str:
    tasks = ["t0", "t1", "t2"]
    lines = ["| model | N | " + " | ".join(tasks) + " | task avg | joint | params | FLOPs |",
             "|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['arch']}: {r['model']} | {r['n']} | " + " | ".join(pct(r.get(t)) for t in tasks)
                     + f" | {pct(r['task_avg'])} | {pct(r['joint'])} | {r['params_rel']:.0%} | {r['flops_rel']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="resnet20w1,vgg")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for arch in args.archs.split(","):
        for tasks in (["t0", "t1", "t2"], ["t0", "t1"]):
            rows += rows_for(arch, tasks)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
