"""What exposing the measured tensors costs onnxruntime itself.

    python bench/bench_fetch.py [--rounds 5] [--pair a.onnx,b.onnx,calib.npz]

Runs both models of a pair (default: the bundled ResNet-20 pair) over the calibration data, batch
64, in sessions built the way the statistics pass builds them (all graph optimizations), three ways,
interleaved over rounds: plain (only the model outputs), with every measured tensor and
pre-activation as an extra output in its own layout, and with them transposed to channel-last (what
the statistics pass fetches). Prints the median seconds and the ratios to the plain run: the part of
the statistics pass that no accumulator work can remove.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxzip.pipeline import prepare_pair  # noqa: E402
from onnxzip.runtime import session  # noqa: E402
from onnxzip.stats.collect import _channel_axis, channels_last_model, fetch_model  # noqa: E402

SAMPLES = ROOT / "samples" / "digits"


def sessions(graphs, mode: str):
    out = []
    for g in graphs:
        if mode == "plain":
            out.append((session(g.model, optimization="all", spinning=False), None))
            continue
        wanted = [(p.tensor, p.axis) for p in g.measure_points()] + [(l.preact, _channel_axis(g, l)) for l in g.layers]
        if mode == "channel-last":
            model, where = channels_last_model(g.model, wanted, g.shapes, also=g.outputs[:1])
            names = list(dict.fromkeys([n for n, _ in where.values()] + g.outputs[:1]))
        else:
            names = list(dict.fromkeys([t for t, _ in wanted] + g.outputs[:1]))
            model = fetch_model(g.model, names)
        out.append((session(model, optimization="all", spinning=False), names))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default=None, help="a.onnx,b.onnx,calib.npz (default: the bundled ResNet-20 pair)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    if args.pair:
        a, b, data = args.pair.split(",")
    else:
        a, b, data = SAMPLES / "resnet20_a.onnx", SAMPLES / "resnet20_b.onnx", SAMPLES / "calib.npz"
    pair = prepare_pair(str(a), str(b), str(data), collect=False)
    arrays = np.load(data)
    x = arrays[arrays.files[0]]
    modes = ["plain", "own layout", "channel-last"]
    built = {m: sessions(pair.graphs, m) for m in modes}
    times = {m: [] for m in modes}
    for _ in range(args.rounds + 1):  # the first round warms every session up and is not counted
        for m in modes:
            t = time.perf_counter()
            for i in range(0, len(x), args.batch_size):
                for g, (sess, names) in zip(pair.graphs, built[m]):
                    sess.run(names, {g.inputs[0]: x[i:i + args.batch_size]})
            times[m].append(time.perf_counter() - t)
    med = {m: statistics.median(v[1:]) for m, v in times.items()}
    print(f"both models over {len(x)} samples, batch {args.batch_size}, median of {args.rounds} rounds:")
    for m in modes:
        print(f"  {m:13s} {med[m]:.3f} s   x{med[m] / med['plain']:.2f} of plain")


if __name__ == "__main__":
    main()
