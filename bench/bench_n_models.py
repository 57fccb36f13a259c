"""Time and peak memory of zipping N = 2, 3, 4, 5 ResNet-20-style models (issue 14).

    python bench/bench_n_models.py                 # N = 2..5, zipit alpha 0.5 beta 1, correction on
    options: --n 2,3,4,5  --json out.json

The sources are the bundled trained pair samples/digits/resnet20_{a,b}.onnx; for N > 2 the further
models are permuted copies of them (onnxzip.permutation, seeds 1, 2, ...): the timings and memory of a
zip do not depend on what the weights learned. Each N runs in a fresh subprocess on the bundled mixed
calibration set: wall time of ``onnxzip.zip_models`` end to end, its breakdown (``result.timings``)
and the peak RSS (VmHWM) of the process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "digits"

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import onnx
import onnxzip
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph

n, work = {n}, Path({work!r})
base = [Path({a!r}), Path({b!r})]
paths = list(base[:n])
for k in range(2, n):
    graph = load_layer_graph(base[k % 2])
    p = work / f"copy{{k}}.onnx"
    onnx.save(permute_model(graph, random_permutations(graph, seed=k - 1)), p)
    paths.append(p)
t = time.perf_counter()
r = onnxzip.zip_models(paths, {calib!r}, output=work / "zipped.onnx", method="zipit",
                       params={{"alpha": 0.5, "beta": 1.0}}, refit=False, tasks=[f"t{{k}}" for k in range(n)])
wall = time.perf_counter() - t
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"n": n, "seconds": wall, "peak_rss_mb": hwm / 1024,
                  "timings": {{k: round(v, 3) for k, v in r.timings.items()}}}}))
"""


def run(n: int, work: Path) -> dict:
    code = CHILD.format(root=str(ROOT), n=n, work=str(work), a=str(SAMPLES / "resnet20_a.onnx"),
                        b=str(SAMPLES / "resnet20_b.onnx"), calib=str(SAMPLES / "calib.npz"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="2,3,4,5")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.n.split(",")):
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            rows.append(run(n, work))
    print("| N | zip (s) | statistics (s) | matching (s) | repair (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t = r["timings"]
        print(f"| {r['n']} | {r['seconds']:.2f} | {t.get('statistics', 0):.2f} | {t.get('matching', 0):.2f} | "
              f"{t.get('repair', 0):.2f} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
