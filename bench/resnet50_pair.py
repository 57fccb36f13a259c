"""A ResNet-50-sized model pair for the scale benchmark, built with plain torch (no torchvision).

    python bench/resnet50_pair.py OUT_DIR [--samples 256] [--classes 1000] [--size 224]

Writes ``resnet50_a.onnx``, ``resnet50_b.onnx`` (two random-ish ResNet-50s: different seeds) and
``calib.npz`` (random-ish calibration images) into OUT_DIR, which must be outside the repository
(the files are about 100 MB each). torch is an optional extra (``pip install -e '.[samples]'``,
``torch==2.13.0``); onnxzip itself never imports it.

The network is torchvision's ResNet-50 (v1.5): a 7x7/2 stem conv @64 + BN + ReLU + 3x3/2 max pool,
bottleneck blocks [3, 4, 6, 3] (1x1 reduce, 3x3 with the stride, 1x1 expand x4, BatchNorm after each
conv, ReLU after the residual Add) at widths 64/128/256/512 (outputs 256..2048), a 1x1 conv + BN
projection shortcut at the first block of each stage, global average pool and a linear head. Weights
are random (Kaiming init, random BatchNorm affine parameters), then each BatchNorm's running
statistics are set by a few forward passes in training mode on the calibration-like images, so
activations keep a sensible scale through all 16 blocks, as in a trained network. Export: the
TorchScript exporter (``dynamo=False``), opset 17, dynamic batch axis, eval mode with constant
folding (BatchNorm folded into the convs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - optional extra
        raise SystemExit("this benchmark needs torch: pip install 'torch==2.13.0' (or pip install -e '.[samples]')") from e
    return torch


def build_resnet50(num_classes: int = 1000):
    torch = _torch()
    nn = torch.nn

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            cout = width * self.expansion
            self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            layers, cin = [], 64
            for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                stage = []
                for k in range(blocks):
                    stage.append(Bottleneck(cin, width, stride if k == 0 else 1))
                    cin = width * 4
                layers.append(nn.Sequential(*stage))
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2048, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet50()


def calibration_images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """Random-ish images: smooth colour blobs (upsampled low-resolution noise) plus fine noise,
    normalized like ImageNet inputs (about zero mean, unit std per channel)."""
    rng = np.random.default_rng(seed)
    low = size // 16
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        coarse = rng.standard_normal((3, low, low)).astype(np.float32)
        img = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)
        # soften the blocks a little: average with shifted copies
        img = (img + np.roll(img, 8, axis=1) + np.roll(img, 8, axis=2) + np.roll(img, (8, 8), axis=(1, 2))) / 4
        out[i] = img + 0.3 * rng.standard_normal((3, size, size)).astype(np.float32)
    return out


def make_model(seed: int, calib: np.ndarray, num_classes: int = 1000, bn_batches: int = 2, bn_batch: int = 16):
    """A random-ish ResNet-50: seeded init, random BN affine parameters, running statistics set
    by ``bn_batches`` training-mode passes (cumulative average) on calibration-like images."""
    torch = _torch()
    torch.manual_seed(seed)
    model = build_resnet50(num_classes)
    g = torch.Generator().manual_seed(seed + 1000)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.momentum = None  # cumulative average of the batches seen
            m.reset_running_stats()
    model.train()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _ in range(bn_batches):
            idx = rng.choice(len(calib), size=min(bn_batch, len(calib)), replace=False)
            model(torch.from_numpy(calib[idx]))
    return model.eval()


def export(model, path: Path, size: int = 224) -> None:
    torch = _torch()
    x = torch.zeros(1, 3, size, size)
    torch.onnx.export(
        model, (x,), str(path), dynamo=False, opset_version=17, do_constant_folding=True,
        input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def make_pair(out_dir, samples: int = 256, num_classes: int = 1000, size: int = 224, seeds=(0, 1), log=print) -> dict:
    """Write the pair and calibration data into ``out_dir``; returns their paths."""
    torch = _torch()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    calib = calibration_images(samples, size, seed=123)
    calib_path = out / "calib.npz"
    np.savez(calib_path, input=calib)
    bn_data = calibration_images(32, size, seed=456)
    paths = {}
    for name, seed in zip("ab", seeds):
        model = make_model(seed, bn_data, num_classes)
        p = out / f"resnet50_{name}.onnx"
        export(model, p, size)
        paths[name] = p
    log(f"built the ResNet-50 pair ({samples} calibration images, {num_classes} classes) in {time.perf_counter() - t:.1f}s -> {out}")
    return {"a": paths["a"], "b": paths["b"], "calib": calib_path}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    if Path(args.out_dir).resolve().is_relative_to(root):
        raise SystemExit(f"{args.out_dir}: write the pair outside the repository (e.g. /tmp/resnet50)")
    make_pair(args.out_dir, args.samples, args.classes, args.size)


if __name__ == "__main__":
    main()
