"""Regenerate the digits sample pairs used by onnxzip's tests, benchmarks and docs.

Two tasks from sklearn's 8x8 digits (upsampled to 16x16): task ``a`` = digits 0-4 (labels 0-4),
task ``b`` = digits 5-9 (labels digit-5). For each architecture (mlp, vgg, resnet20, mobilenet) one
model per task is trained from its own random initialization on its own task only, then exported to
ONNX (TorchScript exporter, opset 17, BatchNorm folded; the mlp pair also with the dynamo exporter).

Usage::

    pip install -e .[samples]
    python samples/train_digits.py                 # everything, into samples/digits
    python samples/train_digits.py --only mlp      # one pair (data files are always rewritten)
    python samples/train_digits.py --epochs 5 --out /tmp/digits   # quick smoke run

Everything is seeded: the data files (npz) are byte-identical across reruns, and so are the
trained weights on the same torch version, CPU and thread count (2 threads by default).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Seeds and settings (changing any of these changes the committed samples)
# --------------------------------------------------------------------------------------------
SPLIT_SEED = 0          # stratified train/test split of the 1797 images
CALIB_SEED = 1          # which training images go into calib.npz, and their order
CALIB_PER_TASK = 256    # calib.npz holds 2 * CALIB_PER_TASK unlabeled training images
TEST_FRACTION = 0.25
SIZE = 16               # model input is 1 x SIZE x SIZE
NUM_CLASSES = 5
OPSET = 17              # TorchScript exporter
DYNAMO_OPSET = 18       # the dynamo exporter's minimum
# Per-architecture seed base; model a uses base + 0, model b uses base + 1 (init, shuffling, augmentation).
ARCH_SEEDS = {"mlp": 1000, "vgg": 2000, "resnet20": 3000, "mobilenet": 4000}
# Per-architecture training recipe: epochs, Adam learning rate, weight decay.
RECIPES = {
    "mlp": dict(epochs=40, lr=1e-3, wd=1e-4),
    "vgg": dict(epochs=30, lr=1e-3, wd=5e-4),
    "resnet20": dict(epochs=30, lr=1e-3, wd=5e-4),
    "mobilenet": dict(epochs=25, lr=2e-3, wd=5e-4),
}
BATCH = 64
MAX_SHIFT = 2           # augmentation: random translation by up to this many pixels (16x16 grid)
ARCHS = list(ARCH_SEEDS)
DYNAMO_ARCHS = ["mlp"]  # also exported with dynamo=True (external data); see --dynamo


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, hidden: int = 128):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(SIZE * SIZE, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x):
        x = self.flatten(x)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class VGG(nn.Module):
    """[conv-BN-ReLU]x2 @32, maxpool, x2 @64, maxpool, conv @128, GAP, Linear-ReLU-Linear."""

    def __init__(self, widths=(32, 64, 128), hidden: int = 128):
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            conv_bn_relu(1, w1), conv_bn_relu(w1, w1), nn.MaxPool2d(2),
            conv_bn_relu(w1, w2), conv_bn_relu(w2, w2), nn.MaxPool2d(2),
            conv_bn_relu(w2, w3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(w3, hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016), width multiplier w: stages 16w/32w/64w."""

    def __init__(self, w: int = 2, blocks_per_stage: int = 3):
        super().__init__()
        widths = [16 * w, 32 * w, 64 * w]
        self.conv1 = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[2], NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.pool(x).flatten(1))


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn_dw = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu6(self.bn_dw(self.dw(x)))
        return F.relu6(self.bn_pw(self.pw(x)))


class MobileNet(nn.Module):
    """Stem conv3x3-BN-ReLU6 @32, depthwise-separable blocks 32->64->64(s2)->128(s2)->128, GAP, Linear."""

    def __init__(self, cfg=((64, 1), (64, 2), (128, 2), (128, 1)), stem: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(1, stem, 3, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(stem)
        blocks, cin = [], stem
        for cout, stride in cfg:
            blocks.append(DepthwiseSeparable(cin, cout, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x):
        x = F.relu6(self.bn_stem(self.stem(x)))
        x = self.blocks(x)
        return self.linear(self.pool(x).flatten(1))


BUILDERS = {"mlp": MLP, "vgg": VGG, "resnet20": ResNet20, "mobilenet": MobileNet}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed without the wall-clock timestamps, so reruns are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, val in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(val), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def upsample(images8: np.ndarray) -> np.ndarray:
    """[N, 8, 8] in 0..16 -> [N, 1, 16, 16] float32 in [0, 1], bilinear (align_corners=False)."""
    x = torch.from_numpy(images8.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).numpy().astype(np.float32)


def make_data():
    """The images upsampled to 16x16: ``{split_task: (images, labels)}`` and the calibration images."""
    return split_tasks(lambda images: upsample(images))


def split_tasks(prepare):
    """The digits split into tasks a (0-4) and b (5-9), train and test (stratified), and the
    calibration rows (CALIB_PER_TASK training images of each task, shuffled together), on the images
    ``prepare`` makes of the raw 8x8 grids (0..16): ``({split_task: (images, labels)}, calib)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, target = digits.images, digits.target.astype(np.int64)
    idx = np.arange(len(target))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=target, random_state=SPLIT_SEED, shuffle=True)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    x_all = prepare(images)
    data = {}
    for task, lo in (("a", 0), ("b", 5)):
        for split, sel in (("train", train_idx), ("test", test_idx)):
            s = sel[(target[sel] >= lo) & (target[sel] < lo + NUM_CLASSES)]
            data[f"{split}_{task}"] = (x_all[s], target[s] - lo)
    rng = np.random.default_rng(CALIB_SEED)
    parts = [rng.choice(len(data[f"train_{t}"][0]), CALIB_PER_TASK, replace=False) for t in "ab"]
    calib = np.concatenate([data["train_a"][0][parts[0]], data["train_b"][0][parts[1]]])
    calib = calib[rng.permutation(len(calib))]
    # Sanity: no calib image is a test image (compare raw bytes).
    test_keys = {im.tobytes() for t in "ab" for im in data[f"test_{t}"][0]}
    assert not any(im.tobytes() in test_keys for im in calib), "calibration overlaps the test set"
    return data, calib


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def shift_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to MAX_SHIFT pixels per image (zero fill)."""
    n = x.shape[0]
    pad = F.pad(x, (MAX_SHIFT,) * 4)
    offs = torch.randint(0, 2 * MAX_SHIFT + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = pad[i, :, dy:dy + SIZE, dx:dx + SIZE]
    return out


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def train(arch: str, task: str, data, epochs: int | None, build=None, seed_base: int | None = None) -> tuple[nn.Module, dict]:
    """Train one model with ``arch``'s recipe; ``build`` (default: ``BUILDERS[arch]``) makes the module
    after seeding, ``seed_base`` (default: ``ARCH_SEEDS[arch]``) sets the seeds."""
    seed = (ARCH_SEEDS[arch] if seed_base is None else seed_base) + (0 if task == "a" else 1)
    recipe = dict(RECIPES[arch])
    if epochs is not None:
        recipe["epochs"] = epochs
    torch.manual_seed(seed)
    model = (build or BUILDERS[arch])()
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = (torch.from_numpy(a) for a in data[f"train_{task}"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["wd"])
    steps_per_epoch = (len(x_train) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe["lr"], total_steps=recipe["epochs"] * steps_per_epoch, pct_start=0.15)
    t0 = time.perf_counter()
    for _ in range(recipe["epochs"]):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for k in range(steps_per_epoch):
            b = perm[k * BATCH:(k + 1) * BATCH]
            if len(b) < 2:  # BatchNorm needs more than one sample
                continue
            xb = shift_batch(x_train[b], gen)
            loss = F.cross_entropy(model(xb), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    info = dict(
        seed=seed, epochs=recipe["epochs"], train_seconds=round(time.perf_counter() - t0, 1),
        train_acc=accuracy(model, *data[f"train_{task}"]),
        test_acc=accuracy(model, *data[f"test_{task}"]),
        params=sum(p.numel() for p in model.parameters()),
    )
    return model, info


# --------------------------------------------------------------------------------------------
# Export and verification
# --------------------------------------------------------------------------------------------
def export_torchscript(model: nn.Module, path: Path) -> None:
    torch.onnx.export(
        model, (torch.zeros(2, 1, SIZE, SIZE),), str(path), dynamo=False, opset_version=OPSET,
        do_constant_folding=True, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def export_dynamo(model: nn.Module, path: Path) -> None:
    data_file = path.with_name(path.name + ".data")
    for p in (path, data_file):
        if p.exists():
            p.unlink()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model, (torch.zeros(2, 1, SIZE, SIZE),), str(path), dynamo=True, opset_version=DYNAMO_OPSET,
        input_names=["input"], output_names=["logits"], dynamic_shapes={"x": {0: batch}},
        external_data=True)


def verify(path: Path, model: nn.Module, x_eval: np.ndarray, batch1_rows: int = 7) -> dict:
    """onnx.checker, then onnxruntime vs torch on ``x_eval`` at full batch and on its first
    ``batch1_rows`` rows at batch 1: same outputs (1e-3) and the same argmax."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins, outs = sess.get_inputs(), sess.get_outputs()
    assert [i.name for i in ins] == ["input"] and [o.name for o in outs] == ["logits"], (ins, outs)
    with torch.no_grad():
        ref = model(torch.from_numpy(x_eval)).numpy()
    got = sess.run(["logits"], {"input": x_eval})[0]
    diff_full = float(np.abs(got - ref).max())
    got1 = np.concatenate([sess.run(["logits"], {"input": x_eval[i:i + 1]})[0] for i in range(batch1_rows)])
    diff_b1 = float(np.abs(got1 - ref[:batch1_rows]).max())
    assert diff_full < 1e-3 and diff_b1 < 1e-3, (path, diff_full, diff_b1)
    assert (got.argmax(1) == ref.argmax(1)).all() and (got1.argmax(1) == ref[:batch1_rows].argmax(1)).all(), path
    ops = sorted({n.op_type for n in proto.graph.node})
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return dict(max_abs_diff=diff_full, max_abs_diff_batch1=diff_b1, opset=opset,
                ir_version=proto.ir_version, ops=ops, input_shape=str(ins[0].shape),
                output_shape=str(outs[0].shape))


def file_size(path: Path) -> int:
    size = path.stat().st_size
    data_file = path.with_name(path.name + ".data")
    return size + (data_file.stat().st_size if data_file.exists() else 0)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "digits"))
    ap.add_argument("--epochs", type=int, default=None, help="override every recipe's epoch count")
    ap.add_argument("--only", action="append", choices=ARCHS, help="train/export only this arch (repeatable)")
    ap.add_argument("--dynamo", action="append", choices=ARCHS, default=None,
                    help=f"archs also exported with dynamo=True (default: {DYNAMO_ARCHS}); "
                         "resnet20 is left out of the committed samples for size")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dynamo_archs = args.dynamo if args.dynamo is not None else DYNAMO_ARCHS
    archs = args.only or ARCHS

    t_start = time.perf_counter()
    data, calib = make_data()
    save_npz(out / "calib.npz", input=calib)
    for t in "ab":
        for split in ("train", "test"):
            x, y = data[f"{split}_{t}"]
            save_npz(out / f"{split}_{t}.npz", input=x, labels=y)
    print("data:", {k: (v[0].shape, np.bincount(v[1]).tolist()) for k, v in data.items()},
          "calib:", calib.shape, flush=True)

    info_path = out / "info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["_data"] = {
        "source": "sklearn.datasets.load_digits (8x8, 0..16) -> /16 -> bilinear 16x16 (align_corners=False)",
        "split": f"train_test_split(test_size={TEST_FRACTION}, stratify=digit, random_state={SPLIT_SEED})",
        "tasks": {"a": "digits 0-4, label = digit", "b": "digits 5-9, label = digit - 5"},
        "calib": f"{CALIB_PER_TASK} training images per task, shuffled (seed {CALIB_SEED}), no labels",
        "sizes": {k: int(v[0].shape[0]) for k, v in data.items()} | {"calib": int(calib.shape[0])},
    }
    x_eval = np.concatenate([data["test_a"][0], data["test_b"][0]])

    for arch in archs:
        for task in "ab":
            t0 = time.perf_counter()
            model, minfo = train(arch, task, data, args.epochs)
            print(f"{arch}_{task}: seed {minfo['seed']} epochs {minfo['epochs']} "
                  f"train {minfo['train_acc']:.4f} test {minfo['test_acc']:.4f} "
                  f"params {minfo['params']} ({time.perf_counter() - t0:.1f}s)", flush=True)
            exports = [("torchscript", f"{arch}_{task}.onnx", export_torchscript)]
            if arch in dynamo_archs:
                exports.append(("dynamo", f"{arch}_{task}.dynamo.onnx", export_dynamo))
            for exporter, name, fn in exports:
                fn(model, out / name)
                v = verify(out / name, model, x_eval)
                key = arch if exporter == "torchscript" else f"{arch}-dynamo"
                info.setdefault(key, {})[task] = dict(
                    file=name, exporter=exporter, bytes=file_size(out / name),
                    **{k: minfo[k] for k in ("seed", "epochs", "params", "train_acc", "test_acc")},
                    **{k: v[k] for k in ("opset", "ir_version", "ops", "max_abs_diff")})
                print(f"  {name}: checker ok, opset {v['opset']} IR {v['ir_version']}, "
                      f"input {v['input_shape']} output {v['output_shape']}, ORT vs torch max|diff| "
                      f"{v['max_abs_diff']:.2e} (batch 1: {v['max_abs_diff_batch1']:.2e}), "
                      f"{file_size(out / name)} bytes, ops {v['ops']}", flush=True)

    # Drop entries whose files are gone (e.g. a dynamo variant no longer exported).
    for key in [k for k in info if not k.startswith("_")]:
        if not all((out / info[key][t]["file"]).exists() for t in "ab" if t in info[key]):
            del info[key]
    info_path.write_text(json.dumps(dict(sorted(info.items())), indent=1) + "\n")

    manifest = {}
    for key in sorted((k for k in info if not k.startswith("_")), key=lambda k: (ARCHS.index(k.split("-")[0]), k)):
        if {"a", "b"} <= set(info[key]):
            manifest[key] = {"a": info[key]["a"]["file"], "b": info[key]["b"]["file"],
                             "test_a": "test_a.npz", "test_b": "test_b.npz", "calib": "calib.npz"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    print("\n| pair | exporter | opset | params (each) | a: test acc | b: test acc | a: bytes | b: bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for key, e in manifest.items():
        a, b = info[key]["a"], info[key]["b"]
        print(f"| {key} | {a['exporter']} | {a['opset']} | {a['params']:,} | {100 * a['test_acc']:.2f}% | "
              f"{100 * b['test_acc']:.2f}% | {a['bytes']:,} | {b['bytes']:,} |")
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"\ntotal size of {out}: {total:,} bytes; wall time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
