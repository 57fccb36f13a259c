"""Tiny instances of torchvision's convolutional families, exported with both torch exporters.

Grouped convolutions (RegNetY, ResNeXt), channel shuffle (ShuffleNetV2), a growing channel
Concat (DenseNet), MobileNetV2 and a VGG-11-BN with a 4096-wide classifier: random weights, 3x32x32
inputs. Only the ``exporter`` tests and the benchmarks import this module (it needs torch and
torchvision's pure-Python model definitions).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

ARCHS = ["regnet", "resnext", "shufflenet", "densenet", "mobilenet_v2", "vgg11_bn"]
EXPORTERS = ["torchscript", "dynamo"]

_lib = None  # keeps the stand-in torchvision operator library alive


def _torchvision():
    """torchvision.models, importable next to CPU torch.

    The PyPI wheel is a CUDA build whose compiled ops fail to register next to CPU torch
    ("operator torchvision::nms does not exist"); declaring the two ops it looks up first lets
    the pure-Python model definitions load.
    """
    global _lib
    import torch

    if _lib is None:
        try:
            import torchvision.models  # noqa: F401
        except Exception:
            _lib = torch.library.Library("torchvision", "DEF")
            _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        else:
            _lib = True
    import torchvision.models as models

    return models


def _randomize_batchnorm(model, seed: int) -> None:
    """Fresh BatchNorms are the identity; give them statistics and affine terms like a trained net."""
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))


def build(arch: str, seed: int = 0):
    """A small model of family ``arch`` (eval mode), 5 classes, for 3x32x32 inputs."""
    import torch

    models = _torchvision()
    torch.manual_seed(seed)
    if arch == "regnet":  # RegNetY: grouped 3x3 convs (group width 8) with squeeze-excitation
        from torchvision.models.regnet import BlockParams, RegNet

        params = BlockParams(depths=[1, 2], widths=[16, 32], group_widths=[8, 8], bottleneck_multipliers=[1.0, 1.0],
                             strides=[2, 2], se_ratio=0.25)
        model = RegNet(params, num_classes=5, stem_width=16)
    elif arch == "resnext":  # ResNeXt bottlenecks: groups=4, width 4 per group
        from torchvision.models.resnet import Bottleneck, ResNet

        model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, groups=4, width_per_group=4)
    elif arch == "shufflenet":  # channel split, channel shuffle
        model = models.shufflenet_v2_x0_5(num_classes=5)
    elif arch == "densenet":  # BatchNorm, ReLU and convs over a growing channel Concat
        from torchvision.models.densenet import DenseNet

        model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=5)
    elif arch == "mobilenet_v2":
        model = models.mobilenet_v2(num_classes=5, width_mult=0.25)
    elif arch == "vgg11_bn":  # VGG-11 with BatchNorm and a 4096-wide classifier on a 1x1 map
        from torchvision.models.vgg import VGG, cfgs, make_layers

        model = VGG(make_layers(cfgs["A"], batch_norm=True), num_classes=5, init_weights=True)
        model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        model.classifier[0] = torch.nn.Linear(512, 4096)
    else:
        raise ValueError(f"unknown arch {arch!r}: one of {ARCHS}")
    _randomize_batchnorm(model, seed)
    return model.eval()


def export(model, path: Path, exporter: str = "torchscript") -> Path:
    """TorchScript at opset 17 (dynamic batch) or dynamo at its default opset (batch fixed at 8)."""
    import torch

    torch.set_num_threads(1)
    x = torch.rand(8, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    return path


def images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random 3x32x32 images (n a multiple of 8: the dynamo exports have a fixed batch of 8)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3, 8, 8)).astype(np.float32)
    return np.kron(x, np.ones((1, 1, 4, 4), dtype=np.float32)) + 0.05 * rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
