"""Three-task digits sample for zipping more than two models (issue 14).

The digits of samples/train_digits.py (the same 16x16 images, train/test split and augmentation) split
into three tasks with unequal class counts: ``t0`` = digits {0, 1, 2} (3 classes), ``t1`` = {3, 4, 5, 6}
(4 classes), ``t2`` = {7, 8, 9} (3 classes); labels are the digit minus the task's lowest digit. For each
architecture, one model per task from its own seed, trained on its own task only: a ResNet-20-style
network at width 1 (``resnet20w1``, kept small for the repository) and the VGG of the two-task sample.

    pip install -e .[samples]
    python samples/train_digits3.py                  # into samples/digits3
    python samples/train_digits3.py --epochs 3 --out /tmp/d3   # quick smoke run

Written: calib.npz (unlabeled training images, 170 per task, shuffled), test_<task>.npz (input, labels),
<arch>_<task>.onnx (TorchScript exporter, opset 17) and info.json (seeds, epochs, accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_digits as td  # noqa: E402

TASKS = {"t0": (0, 1, 2), "t1": (3, 4, 5, 6), "t2": (7, 8, 9)}
CALIB_PER_TASK = 170
CALIB_SEED = 3
EPOCHS = 12  # fewer than the two-task sample's 30: digits are learned by then, and it keeps the run short
ARCHS = {"resnet20w1": ("resnet20", lambda: td.ResNet20(w=1), 5000), "vgg": ("vgg", td.VGG, 6000)}


def make_data() -> tuple[dict, np.ndarray]:
    """{split_task: (x, y)} for the three tasks, and the calibration images."""
    two, _ = td.make_data()  # tasks a (digits 0-4) and b (5-9), labels relative to 0 and 5
    x = {s: np.concatenate([two[f"{s}_a"][0], two[f"{s}_b"][0]]) for s in ("train", "test")}
    y = {s: np.concatenate([two[f"{s}_a"][1], two[f"{s}_b"][1] + 5]) for s in ("train", "test")}
    data = {}
    for task, digits in TASKS.items():
        for s in ("train", "test"):
            sel = np.isin(y[s], digits)
            data[f"{s}_{task}"] = (x[s][sel], y[s][sel] - digits[0])
    rng = np.random.default_rng(CALIB_SEED)
    parts = [data[f"train_{t}"][0][rng.choice(len(data[f"train_{t}"][0]), CALIB_PER_TASK, replace=False)] for t in TASKS]
    calib = np.concatenate(parts)
    return data, calib[rng.permutation(len(calib))]


def train_one(arch: str, k: int, task: str, data: dict, epochs: int | None):
    """One model of ``arch`` on ``task``: the recipe of the two-task sample, a head of the task's size."""
    recipe_arch, build, seed_base = ARCHS[arch]
    td.NUM_CLASSES = len(TASKS[task])  # the builders read it when they make the head
    renamed = {"train_a": data[f"train_{task}"], "test_a": data[f"test_{task}"]}
    return td.train(recipe_arch, "a", renamed, epochs, build=build, seed_base=seed_base + 10 * k)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "digits3"))
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--only", action="append", choices=list(ARCHS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, calib = make_data()
    td.save_npz(out / "calib.npz", input=calib)
    for t in TASKS:
        td.save_npz(out / f"test_{t}.npz", input=data[f"test_{t}"][0], labels=data[f"test_{t}"][1])
    info_path = out / "info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["_data"] = {"tasks": {t: list(d) for t, d in TASKS.items()}, "calib": int(len(calib)),
                     "test": {t: int(len(data[f"test_{t}"][1])) for t in TASKS}}
    for arch in args.only or ARCHS:
        for k, task in enumerate(TASKS):
            t0 = time.perf_counter()
            model, minfo = train_one(arch, k, task, data, args.epochs)
            path = out / f"{arch}_{task}.onnx"
            td.export_torchscript(model, path)
            info.setdefault(arch, {})[task] = {key: minfo[key] for key in ("seed", "epochs", "params", "train_acc", "test_acc")}
            print(f"{arch}_{task}: test {minfo['test_acc']:.4f} params {minfo['params']} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    info_path.write_text(json.dumps(dict(sorted(info.items())), indent=1) + "\n")


if __name__ == "__main__":
    main()
