"""Accuracy, parameters and FLOPs of every merge method on every bundled sample pair.

    python bench/samples_table.py [--pairs resnet20,vgg] [--json out.json] [--default-partial]

Prints a markdown table (the one in the README): per pair, model A, model B and their
ensemble, then the default zip (zipit with alpha and beta chosen without labels), average,
permute and zipit (the paper's alpha 0.3, beta 0.125, and alpha 0.5, beta 1) at full depth (all
layers but the heads shared), zipit (0.5, 1) at two partial depths, all with the statistics
correction, and each method without it. Every figure comes from `onnxzip.evaluate` on the test
splits, with exact statistics (every position, the correction on every row). Statistics are
collected once per pair and reused by every candidate (the default zip holds out 20% of the
calibration samples to score its candidates, so it collects its own). ``--default-partial`` adds the
default zip at the two partial depths too (each a zip of its own: label-free search and refit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxzip.cost import count_flops, count_params  # noqa: E402
from onnxzip.evaluate import EnsemblePredictor, ModelPredictor, evaluate, load_task_data  # noqa: E402
from onnxzip import zip_models  # noqa: E402
from onnxzip.pipeline import prepare_pair, zip_prepared  # noqa: E402

SAMPLES = ROOT / "samples" / "digits"


def partial_depths(m: int) -> list[int]:
    """Two partial depths: about a third and two thirds of the layers."""
    return sorted({max(1, round(m / 3)), max(1, round(2 * m / 3))} - {m - 1, m})


def rows_for_pair(name: str, entry: dict, default_partial: bool = False) -> list[dict]:
    a, b = SAMPLES / entry["a"], SAMPLES / entry["b"]
    tasks = {"a": load_task_data(SAMPLES / entry["test_a"]), "b": load_task_data(SAMPLES / entry["test_b"])}
    pa, pb = ModelPredictor(str(a), task="a"), ModelPredictor(str(b), task="b")
    cost_a = (count_params(str(a)), count_flops(str(a)).total)
    cost_b = (count_params(str(b)), count_flops(str(b)).total)
    both = (cost_a[0] + cost_b[0], cost_a[1] + cost_b[1])
    rows = []

    def add(label, predictor, cost, seconds=None):
        r = evaluate(predictor, tasks)
        rows.append({
            "pair": name, "model": label, "joint": r.joint, "task_avg": r.task_average,
            "a": r.per_task.get("a"), "b": r.per_task.get("b"),
            "params": cost[0], "flops": cost[1], "params_rel": cost[0] / both[0], "flops_rel": cost[1] / both[1],
            "seconds": seconds,
        })

    add("model A", pa, cost_a)
    add("model B", pb, cost_b)
    add("ensemble", EnsemblePredictor({"a": pa, "b": pb}), both)
    def add_default(stop_at=None):
        t = time.perf_counter()
        z = zip_models(str(a), str(b), str(SAMPLES / entry["calib"]), tasks=["a", "b"], stop_at=stop_at)
        chosen = ",".join(f"{k}={v}" for k, v in z.selection["alpha_beta"].items())
        fix = "refit" if z.refit is not None else "REPAIR"
        add(f"default: zipit label-free ({chosen}) + {fix} {z.stop_at}/{z.num_layers}", ModelPredictor(z.model),
            (count_params(z.model), count_flops(z.model).total), time.perf_counter() - t)

    add_default()
    t = time.perf_counter()
    pair = prepare_pair(str(a), str(b), str(SAMPLES / entry["calib"]), tasks=["a", "b"])
    stats_time = time.perf_counter() - t
    m = pair.graphs[0].num_layers
    configs = [
        ("average", {}, None, True), ("average", {}, None, False),
        ("permute", {}, None, True), ("permute", {}, None, False),
        ("zipit", {"alpha": 0.3, "beta": 0.125}, None, True), ("zipit", {"alpha": 0.3, "beta": 0.125}, None, False),
        ("zipit", {"alpha": 0.5, "beta": 1.0}, None, True),
    ] + [("zipit", {"alpha": 0.5, "beta": 1.0}, d, True) for d in partial_depths(m)]
    for method, params, depth, repair in configs:
        t = time.perf_counter()
        z = zip_prepared(pair, method, params, depth, ["a", "b"], do_repair=repair)
        elapsed = time.perf_counter() - t + stats_time
        label = method
        if params:
            label += " " + ",".join(f"{k}={v}" for k, v in params.items())
        label += f" {z.stop_at}/{m}" + ("" if repair else " no repair")
        add(label, ModelPredictor(z.model), (count_params(z.model), count_flops(z.model).total), elapsed)
    if default_partial:
        for d in partial_depths(m):
            add_default(d)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| pair | model | joint | task avg | task a | task b | params | FLOPs | params vs A+B | FLOPs vs A+B |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    for r in rows:
        lines.append(
            f"| {r['pair']} | {r['model']} | {pct(r['joint'])} | {pct(r['task_avg'])} | {pct(r['a'])} | {pct(r['b'])} | "
            f"{r['params'] / 1e3:.0f}k | {r['flops'] / 1e6:.1f}M | {r['params_rel']:.2f} | {r['flops_rel']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default=None, help="comma-separated pair names from samples/digits/manifest.json")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--default-partial", action="store_true",
                    help="also the default zip (label-free alpha/beta, refit) at the two partial depths")
    args = ap.parse_args()
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    names = args.pairs.split(",") if args.pairs else list(manifest)
    rows = []
    for name in names:
        t = time.perf_counter()
        rows += rows_for_pair(name, manifest[name], args.default_partial)
        print(f"[{name}: {time.perf_counter() - t:.0f}s]", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
