"""Export the zoo's tiny models with both torch exporters (the only part of the zoo that needs torch).

    python bench/zoo/export.py --out bench/zoo/out [--only NAME ...] [--exporter torchscript|dynamo]

Writes ``<out>/<model>/<exporter>-<seed>.onnx`` for seeds 0 and 1 (a pair: same architecture,
different random weights) and ``<out>/<model>/<exporter>.json``: ``{"status": "ok"}`` or
``{"status": "export failed", "error": "<one line>"}``. Files already exported are kept (delete the
folder to re-export). TorchScript: opset 17, batch axis dynamic. Dynamo: its default opset, static
batch (it bakes the example batch into Reshape constants).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import models as zoo  # noqa: E402

EXPORTERS = ("torchscript", "dynamo")
SEEDS = (0, 1)


class ExportTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise ExportTimeout("export ran past the time limit")


def export_one(module: torch.nn.Module, example: dict, exporter: str, path: Path) -> None:
    args = tuple(example.values())
    names = list(example)
    # Not under torch.no_grad(): there, nn.MultiheadAttention and nn.TransformerEncoderLayer take
    # their fused fast paths, which the TorchScript exporter cannot export.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {n: {0: "batch"} for n in names + ["logits"]}
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                              output_names=["logits"], dynamic_axes=axes)
        else:
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=["logits"])


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def export_model(model: zoo.ZooModel, exporter: str, out: Path, limit: int) -> dict:
    folder = out / model.name
    folder.mkdir(parents=True, exist_ok=True)
    status_file = folder / f"{exporter}.json"
    paths = [folder / f"{exporter}-{s}.onnx" for s in SEEDS]
    if status_file.exists() and all(p.exists() for p in paths):
        return json.loads(status_file.read_text())
    t = time.perf_counter()
    status = {"status": "ok"}
    log = io.StringIO()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(limit)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            for seed, path in zip(SEEDS, paths):
                module, example = zoo.build(model, seed)
                export_one(module, example, exporter, path)
    except Exception as e:  # noqa: BLE001 - any exporter failure is recorded, not raised
        status = {"status": "export failed", "error": one_line(e)}
        for p in paths:
            for f in (p, p.with_name(p.name + ".data")):
                f.unlink(missing_ok=True)
    finally:
        signal.alarm(0)
    status["seconds"] = round(time.perf_counter() - t, 2)
    status_file.write_text(json.dumps(status))
    return status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--exporter", choices=EXPORTERS, action="append")
    ap.add_argument("--time-limit", type=int, default=120, help="seconds per model and exporter (both seeds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    chosen = [m for m in zoo.MODELS if not args.only or m.name in args.only]
    for model in chosen:
        for exporter in args.exporter or EXPORTERS:
            status = export_model(model, exporter, args.out, args.time_limit)
            print(f"{model.name:18s} {exporter:12s} {status['status']} {status.get('error', '')}", flush=True)


if __name__ == "__main__":
    main()
