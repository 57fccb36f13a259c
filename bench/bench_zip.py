"""End-to-end zip benchmark: time against the inference floor, memory against calibration size,
and the zipped model's latency.

    python bench/bench_zip.py                       # the bundled ResNet-20 pair (samples/digits)
    python bench/bench_zip.py --pair resnet50       # a ResNet-50 pair built with torch in a temp folder
    options: --repeat R (timing rounds, default 3), --batch-size B (default 64), --scale K (also time
             the zip on the calibration set repeated K times; default 4 for resnet20), --workdir DIR
             (keep the generated files there; default: a temp folder, removed), --skip-memory,
             --skip-latency, --json out.json

What it measures, each in a fresh subprocess (so one measurement does not warm or fill memory for the next):

(a) the inference floor: onnxruntime (default session options, CPU) loading both source models and
    running each over the same calibration data, with the same batch size as the zip;
(b) ``onnxzip.zip_models`` end to end (zipit, alpha 0.5, beta 1, saved to a temp file) with its
    breakdown (``result.timings``), and the ratio zip / floor (target <= 2). Floor and zip are measured
    in the same process, floor - zip - floor, and each round's ratio uses the mean of its two floors;
    the figures are medians over the rounds; with ``--scale K`` again on the calibration set
    repeated K times (fixed costs, such as parsing, matching and the repair on at most 128 rows,
    then weigh less);
(c) peak RSS (VmHWM) of a zip with the calibration set and with it repeated 10x (with fresh noise),
    and the ratio (target: < 1.10);
(d) latency (``onnxzip.cost.measure_latency``, one batch) of the full zip against one source model
    and against running both, and of a partial zip against running both.

With ``--pair resnet50`` the pair comes from ``bench/resnet50_pair.py`` (needs torch): targets are
under 5 minutes and under 6 GB peak RSS for 256 calibration images; the memory test then compares
128 and 256 images (10x would need 2560 images of 224x224).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PARAMS = {"alpha": 0.5, "beta": 1.0}


# ------------------------------------------------------------------------------------------ child


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vmrss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _floor(a: str, b: str, data: str, batch_size: int) -> dict:
    """onnxruntime alone: load both models, run each over the calibration data."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    arrays = np.load(data)
    x = arrays[arrays.files[0]]
    t_load = 0.0
    t_run = 0.0
    for path in (a, b):
        t = time.perf_counter()
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        t_load += time.perf_counter() - t
        t = time.perf_counter()
        for i in range(0, len(x), batch_size):
            sess.run(None, {name: x[i:i + batch_size]})
        t_run += time.perf_counter() - t
        del sess
    return {"floor_s": time.perf_counter() - t0, "floor_load_s": t_load, "floor_run_s": t_run}


def _zip(a: str, b: str, data: str, batch_size: int, out: str, stop_at=None) -> dict:
    import onnxzip

    t = time.perf_counter()
    r = onnxzip.zip_models(a, b, data, output=out, method="zipit", params=PARAMS, stop_at=stop_at,
                           tasks=["a", "b"], batch_size=batch_size)
    total = time.perf_counter() - t
    rep = r.repair
    return {"zip_s": total, "timings": r.timings, "shared": f"{r.stop_at}/{r.num_layers}", "samples": r.samples,
            "repair": None if rep is None else {"layers": rep.layers, "passes": rep.passes, "samples": rep.samples}}


def child(args: dict) -> dict:
    mode = args["mode"]
    if mode == "time":
        import onnxzip  # noqa: F401  (imports are not part of either figure)
        import onnxruntime  # noqa: F401

        f1 = _floor(args["a"], args["b"], args["data"], args["batch_size"])
        z = _zip(args["a"], args["b"], args["data"], args["batch_size"], args["out"], args.get("stop_at"))
        f2 = _floor(args["a"], args["b"], args["data"], args["batch_size"])
        return {"floor": [f1, f2], **z}
    if mode == "memory":
        import onnxzip  # noqa: F401

        base = _vmrss_mb()
        z = _zip(args["a"], args["b"], args["data"], args["batch_size"], args["out"], args.get("stop_at"))
        return {"rss_after_imports_mb": base, "peak_rss_mb": _vmhwm_mb(), **z}
    raise SystemExit(f"unknown child mode {mode}")


def run_child(args: dict, timeout: float = 3600) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if p.returncode != 0:
        raise SystemExit(f"benchmark child failed ({args['mode']}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- parent


def resnet20_pair(work: Path) -> dict:
    d = ROOT / "samples" / "digits"
    return {"a": str(d / "resnet20_a.onnx"), "b": str(d / "resnet20_b.onnx"), "data": str(d / "calib.npz"),
            "partial": 7, "latency_batch": 64}


def resnet50_pair(work: Path, samples: int) -> dict:
    from resnet50_pair import make_pair

    a, b, c = work / "resnet50_a.onnx", work / "resnet50_b.onnx", work / "calib.npz"
    if not (a.exists() and b.exists() and c.exists() and len(np.load(c)["input"]) == samples):
        make_pair(work, samples=samples, log=lambda s: print(s, flush=True))
    return {"a": str(a), "b": str(b), "data": str(c), "partial": 17, "latency_batch": 8}


def repeated_data(src: str, dst: Path, times: int, seed: int = 0) -> int:
    """The calibration set repeated ``times`` times, each copy with a little fresh noise."""
    arrays = np.load(src)
    x = arrays[arrays.files[0]]
    rng = np.random.default_rng(seed)
    sd = float(x.std()) or 1.0
    reps = [x] + [(x + rng.normal(0, 0.02 * sd, x.shape)).astype(x.dtype) for _ in range(times - 1)]
    np.savez(dst, **{arrays.files[0]: np.concatenate(reps)})
    return len(x) * times


def subset_data(src: str, dst: Path, n: int) -> int:
    arrays = np.load(src)
    x = arrays[arrays.files[0]][:n]
    np.savez(dst, **{arrays.files[0]: x})
    return len(x)


def fmt_breakdown(t: dict) -> str:
    keys = ["load_and_parse", "statistics", "matching", "rewrite", "repair", "validate", "save"]
    return ", ".join(f"{k} {t[k]:.2f}s" for k in keys if k in t)


def measure_latencies(pair: dict, full: str, partial: str, rounds: int) -> dict:
    from onnxzip.cost import measure_latency

    x = np.load(pair["data"])
    x = x[x.files[0]][: pair["latency_batch"]]
    models = {"A": pair["a"], "B": pair["b"], "full zip": full, "partial zip": partial}
    med = {k: [] for k in models}
    for _ in range(rounds):  # interleaved, so load changes hit every model alike
        for k, m in models.items():
            med[k].append(measure_latency(m, x, warmup=3, repeats=15)["median_ms"])
    ms = {k: statistics.median(v) for k, v in med.items()}
    both = ms["A"] + ms["B"]
    return {
        "batch": int(len(x)), "ms": ms, "both_ms": both,
        "full_vs_one": ms["full zip"] / ((ms["A"] + ms["B"]) / 2), "full_vs_both": ms["full zip"] / both,
        "partial_vs_both": ms["partial zip"] / both,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--pair", choices=["resnet20", "resnet50"], default="resnet20")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=256, help="calibration images for --pair resnet50")
    ap.add_argument("--workdir")
    ap.add_argument("--scale", type=int, default=None,
                    help="also time the zip on the calibration set repeated this many times (default 4 for resnet20, "
                         "1 = off for resnet50)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.scale is None:
        args.scale = 4 if args.pair == "resnet20" else 1
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="onnxzip_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def time_rounds(pair: dict, data: str, args, out: str) -> dict:
    """Floor and zip side by side, ``args.repeat`` rounds; the median round, with all rounds."""
    rounds = []
    for r in range(args.repeat):
        res = run_child({"mode": "time", "a": pair["a"], "b": pair["b"], "data": data,
                         "batch_size": args.batch_size, "out": out})
        floor = statistics.mean(f["floor_s"] for f in res["floor"])
        res["floor_s"] = floor
        res["ratio"] = res["zip_s"] / floor
        rounds.append(res)
        print(f"  round {r + 1}: floor {floor:.2f}s, zip {res['zip_s']:.2f}s ({fmt_breakdown(res['timings'])}), "
              f"ratio {res['ratio']:.2f}", flush=True)
    med = dict(sorted(rounds, key=lambda x: x["ratio"])[len(rounds) // 2])
    med["rounds"] = [{k: v for k, v in x.items() if k != "rounds"} for x in rounds]
    return med


def run(args, work: Path) -> dict:
    import onnxruntime as ort

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"numpy {np.__version__}, onnxruntime {ort.__version__} (shared machine: compare ratios, not seconds)")
    pair = resnet20_pair(work) if args.pair == "resnet20" else resnet50_pair(work, args.samples)
    n = int(len(np.load(pair["data"])["input"]))
    print(f"pair: {args.pair} ({Path(pair['a']).name}, {Path(pair['b']).name}), {n} calibration samples, batch {args.batch_size}")
    report = {"pair": args.pair, "samples": n, "batch_size": args.batch_size}

    # (a) + (b): floor and zip, side by side
    full_out, part_out = str(work / "zipped_full.onnx"), str(work / "zipped_partial.onnx")
    med = time_rounds(pair, pair["data"], args, full_out)
    floor_run = statistics.mean(f["floor_run_s"] for f in med["floor"])
    print(f"(a) inference floor (load both + run both over {n} samples): {med['floor_s']:.2f}s "
          f"(of which running {floor_run:.2f}s)")
    print(f"(b) zip end to end: {med['zip_s']:.2f}s ({fmt_breakdown(med['timings'])}); shared {med['shared']}, "
          f"repair {med['repair']}")
    print(f"    zip / floor = {med['ratio']:.2f} (median of {len(med['rounds'])} rounds: "
          f"{', '.join(format(x['ratio'], '.2f') for x in med['rounds'])}; target <= 2)")
    report["time"] = {"median": med}
    if args.scale > 1:
        big = work / f"calib_x{args.scale}.npz"
        n_big = repeated_data(pair["data"], big, args.scale)
        med_big = time_rounds(pair, str(big), args, full_out)
        print(f"(b') the same with the calibration set repeated {args.scale}x ({n_big} samples, fresh noise): floor "
              f"{med_big['floor_s']:.2f}s, zip {med_big['zip_s']:.2f}s ({fmt_breakdown(med_big['timings'])})")
        print(f"    zip / floor = {med_big['ratio']:.2f} (median of {len(med_big['rounds'])} rounds: "
              f"{', '.join(format(x['ratio'], '.2f') for x in med_big['rounds'])})")
        report["time_scaled"] = {"times": args.scale, "samples": n_big, "median": med_big}

    # (c) memory: 1x and 10x calibration data, fresh processes
    if not args.skip_memory:
        if args.pair == "resnet20":
            small, big = pair["data"], work / "calib_x10.npz"
            n_small, n_big = n, repeated_data(pair["data"], big, 10)
        else:
            small, big = work / "calib_half.npz", pair["data"]
            n_small, n_big = subset_data(pair["data"], small, n // 2), n
        mem = {}
        for label, d, cnt in (("1x", small, n_small), ("big", big, n_big)):
            mem[label] = run_child({"mode": "memory", "a": pair["a"], "b": pair["b"], "data": str(d),
                                    "batch_size": args.batch_size, "out": str(work / "zipped_mem.onnx")})
            mem[label]["samples"] = cnt
            print(f"  {cnt} samples: peak RSS {mem[label]['peak_rss_mb']:.0f} MB "
                  f"(after imports {mem[label]['rss_after_imports_mb']:.0f} MB), zip {mem[label]['zip_s']:.1f}s", flush=True)
        ratio = mem["big"]["peak_rss_mb"] / mem["1x"]["peak_rss_mb"]
        print(f"(c) peak RSS {n_small} -> {n_big} samples: {mem['1x']['peak_rss_mb']:.0f} -> {mem['big']['peak_rss_mb']:.0f} MB, "
              f"ratio {ratio:.3f} (target < 1.10)")
        report["memory"] = {**mem, "ratio": ratio}

    # (d) latency of the zipped models
    if not args.skip_latency:
        run_child({"mode": "memory", "a": pair["a"], "b": pair["b"], "data": pair["data"], "batch_size": args.batch_size,
                   "out": part_out, "stop_at": pair["partial"]})
        lat = measure_latencies(pair, full_out, part_out, rounds=max(3, args.repeat))
        ms = lat["ms"]
        print(f"(d) latency, batch {lat['batch']} (median ms): A {ms['A']:.2f}, B {ms['B']:.2f}, A+B {lat['both_ms']:.2f}, "
              f"full zip {ms['full zip']:.2f}, partial zip ({pair['partial']} layers shared) {ms['partial zip']:.2f}")
        print(f"    full zip / one source = {lat['full_vs_one']:.3f} (target <= 1.10); full zip / both = {lat['full_vs_both']:.3f}; "
              f"partial zip / both = {lat['partial_vs_both']:.3f}")
        report["latency"] = lat
    return report


if __name__ == "__main__":
    main()
