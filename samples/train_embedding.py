"""Train the embedding sample pair: the digits models with an L2-normalised embedding output,
classes scored by cosine against a fixed class-embedding matrix (the ZipIt! paper's CIFAR
protocol scores classes against CLIP text embeddings; here a fixed random matrix plays that part).

Usage::

    pip install -e .[samples]
    python samples/train_embedding.py                  # mlp and vgg pairs into samples/digits
    python samples/train_embedding.py --only mlp --epochs 2 --out /tmp/digits   # quick run

Per architecture (the mlp and vgg of train_digits.py, their final Linear widened to ``DIM``
outputs and followed by ``F.normalize``), model ``a`` is trained on digits 0-4 and model ``b``
on digits 5-9, from their own seeds, with cross-entropy on ``SCALE * cos(embedding, class)``
over their own task's 5 classes. Written next to the other samples:

- ``<arch>_emb_{a,b}.onnx``: input ``input`` [batch, 1, 16, 16], output ``embedding`` [batch, DIM]
  (unit length); TorchScript exporter, opset 17, as train_digits.py exports;
- ``classes_{a,b}.npy``: each task's class embeddings, [5, DIM] float32 (rows of one fixed
  10 x DIM Gaussian matrix, seed ``CLASS_SEED``: digits 0-4, then 5-9);
- ``embedding_info.json``: seeds, epochs and each model's test accuracy on its own task.

The data files (calib.npz, test_{a,b}.npz) are train_digits.py's; they are not rewritten here.
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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_digits as td  # noqa: E402

DIM = 32          # embedding width
SCALE = 16.0      # cosine logit scale while training
CLASS_SEED = 7    # the fixed class-embedding matrix
SEED_OFFSET = 500  # model seeds: train_digits' per-architecture seed + this (+1 for task b)
ARCHS = ["mlp", "vgg"]


class Embedder(nn.Module):
    """A train_digits backbone whose final Linear gives DIM features, L2-normalised."""

    def __init__(self, arch: str):
        super().__init__()
        self.backbone = td.BUILDERS[arch]()
        last = "fc3" if arch == "mlp" else "fc2"
        setattr(self.backbone, last, nn.Linear(getattr(self.backbone, last).in_features, DIM))

    def forward(self, x):
        return F.normalize(self.backbone(x), dim=-1)


class CosineClassifier(nn.Module):
    """What is trained: the embedder's cosine scores against its task's fixed class embeddings."""

    def __init__(self, arch: str, classes: np.ndarray):
        super().__init__()
        self.embedder = Embedder(arch)
        self.register_buffer("classes", F.normalize(torch.from_numpy(classes), dim=-1))

    def forward(self, x):
        return SCALE * self.embedder(x) @ self.classes.T


def class_embeddings() -> dict[str, np.ndarray]:
    all_classes = np.random.default_rng(CLASS_SEED).standard_normal((10, DIM)).astype(np.float32)
    return {"a": all_classes[:5], "b": all_classes[5:]}


def export(model: nn.Module, path: Path) -> None:
    torch.onnx.export(
        model, (torch.zeros(2, 1, td.SIZE, td.SIZE),), str(path), dynamo=False, opset_version=td.OPSET,
        do_constant_folding=True, input_names=["input"], output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})


def check_export(path: Path, model: nn.Module, x: np.ndarray) -> float:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - want).max())
    assert diff < 1e-4, (path, diff)
    return diff


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "digits"))
    ap.add_argument("--epochs", type=int, default=None, help="override every recipe's epoch count")
    ap.add_argument("--only", action="append", choices=ARCHS, help="train only this arch (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, _ = td.make_data()
    classes = class_embeddings()
    for t in "ab":
        np.save(out / f"classes_{t}.npy", classes[t])
    x_eval = np.concatenate([data["test_a"][0], data["test_b"][0]])
    info = {"dim": DIM, "scale": SCALE, "class_seed": CLASS_SEED}
    for arch in args.only or ARCHS:
        for task in "ab":
            model, minfo = td.train(arch, task, data, args.epochs, build=lambda: CosineClassifier(arch, classes[task]),
                                    seed_base=td.ARCH_SEEDS[arch] + SEED_OFFSET)
            path = out / f"{arch}_emb_{task}.onnx"
            export(model.embedder, path)
            diff = check_export(path, model.embedder, x_eval)
            info[f"{arch}_{task}"] = {k: minfo[k] for k in ("seed", "epochs", "params", "test_acc")}
            print(f"{path.name}: test {minfo['test_acc']:.4f} ({minfo['train_seconds']}s), ORT vs torch {diff:.1e}",
                  flush=True)
    (out / "embedding_info.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"wall time {time.perf_counter() - t0:.0f}s")
