"""Trained transformer pairs built from the libraries people use: timm's DeiT, Hugging Face's BERT and LLaMA.

Same tasks and split as the other digits samples (``samples/train_digits.py``): task ``a`` = digits
0-4 (label = digit), task ``b`` = digits 5-9 (label = digit - 5). Model ``a`` is trained on task a
only, model ``b`` on task b only, each from its own seed and random initialization.

- ``deit``: timm's own ``timm.models.vision_transformer.VisionTransformer`` (the class behind timm's
  ``deit_*`` models, non-distilled) at a tiny config: ``img_size=16, patch_size=4, in_chans=1,
  embed_dim=64, depth=3, num_heads=4, mlp_ratio=2, num_classes=5``, a class token, timm's fused
  ``qkv`` Linear (64 -> 192), timm's default init. Input ``input`` [batch, 1, 16, 16] (the image
  npz files), output ``logits`` [batch, 5].
- ``bert``: ``transformers.BertForSequenceClassification`` with ``BertConfig(hidden_size=64,
  num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=5)``, dropout 0.
- ``llama``: ``transformers.LlamaForSequenceClassification`` with ``LlamaConfig(hidden_size=64,
  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
  num_labels=5)`` (RMSNorm, rotary position embeddings, SwiGLU, causal attention, the head read at
  the last token).

The text models read the 8x8 digit as text: each of the 64 pixel intensities of sklearn's
``load_digits`` (0..16, row-major) is one token, id = intensity, after a ``[CLS]`` token (id 17): 65
tokens, vocabulary 19 (id 18 is ``[PAD]``, the configs' ``pad_token_id``, never used: every
sequence is 65 long). Inputs ``input_ids`` and ``attention_mask`` (all ones), both [batch, 65] int64;
output ``logits`` [batch, 5].

The token files are the same images as the image npz files, row for row (same split, same order,
same calibration images; the script checks that upsampling its 8x8 images gives the image files
exactly): ``tokens_{train,test}_{a,b}.npz`` (``input_ids``, ``attention_mask``, ``labels``) and
``tokens_calib.npz`` (``input_ids``, ``attention_mask``), written with fixed zip timestamps.

Exports, both with a dynamic batch axis: TorchScript (``dynamo=False``, opset 17, constant
folding) to ``<arch>_{a,b}.onnx`` and dynamo (``dynamo=True``, opset 18, ``dynamic_shapes``) to
``<arch>_{a,b}.dynamo.onnx`` (+ ``.onnx.data``), without the exporter's stack-trace node metadata.
Every file is checked with ``onnx.checker.check_model(full_check=True)`` and onnxruntime against
torch (full batch and batch 1). The manifest gets ``<arch>`` and ``<arch>-dynamo`` entries (the text
ones name the token files); ``transformers_info.json`` records seeds, epochs, accuracies, sizes and
op types.

Usage::

    pip install -e .[samples,zoo]                 # torch==2.13.0, timm, transformers, scikit-learn
    python samples/train_transformers.py          # train, export, verify, update manifest.json
    python samples/train_transformers.py --only bert --epochs 2 --out /tmp/digits   # smoke run
                                                  # (--out must hold the image npz files)
    python bench/samples_table.py --pairs deit,bert,llama --default-partial   # their zip table

timm and transformers import torchvision, whose PyPI wheel is a CUDA build that fails to load its
ops next to CPU torch; the script declares those two ops first when that happens (``_torchvision_ops``).

Seeds: deit 7000/7001, bert 8000/8001, llama 9000/9001 (init, shuffling, augmentation), with
``torch.use_deterministic_algorithms(True)`` and 1 torch thread by default (``--threads``); the
weights are reproducible for the same torch/timm/transformers versions, CPU kind and thread count.
About 12 minutes for all three pairs on a shared 2-core machine (DeiT 1 minute, BERT and LLaMA about
4 and 5).
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
# shared with the other torch samples: the split, augmentation, npz writer, file sizes
from train_digits import (  # noqa: E402
    DYNAMO_OPSET, NUM_CLASSES, OPSET, SIZE, file_size, save_npz, shift_batch, split_tasks, upsample,
)

# --------------------------------------------------------------------------------------------
# Settings (changing any of these changes the committed samples)
# --------------------------------------------------------------------------------------------
SEEDS = {"deit": 7000, "bert": 8000, "llama": 9000}  # model a: base, model b: base + 1
DEIT = dict(img_size=SIZE, patch_size=4, in_chans=1, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0,
            num_classes=NUM_CLASSES)
CLS_ID, PAD_ID = 17, 18               # pixel intensities 0..16 are ids 0..16
SEQ = 1 + 64                          # [CLS] + 8x8 pixels
BERT = dict(vocab_size=19, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=SEQ, num_labels=NUM_CLASSES, pad_token_id=PAD_ID,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LLAMA = dict(vocab_size=19, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=128, max_position_embeddings=SEQ, num_labels=NUM_CLASSES, pad_token_id=PAD_ID,
             use_cache=False)
# AdamW (weight decay on the matrices only), one-cycle learning rate with 10% warmup, batch 64,
# random shifts (deit: up to 2 pixels of 16; bert: up to 1 pixel of the 8x8 grid).
RECIPES = {"deit": dict(epochs=120, lr=2e-3, wd=0.05), "bert": dict(epochs=150, lr=3e-3, wd=0.05),
           "llama": dict(epochs=150, lr=3e-3, wd=0.05)}
BATCH = 64
WARMUP = 0.1
ARCHS = list(SEEDS)

_TORCHVISION_LIB = None


def _torchvision_ops() -> None:
    """Declare torchvision's two compiled ops before timm imports torchvision (CPU torch + CUDA wheel)."""
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is None:
        try:
            import torchvision  # noqa: F401  # a working install needs nothing
            return
        except RuntimeError:
            pass
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIB = lib


# --------------------------------------------------------------------------------------------
# Data: the 8x8 digits as tokens, the same images as the image npz files
# --------------------------------------------------------------------------------------------
def token_data(out: Path) -> tuple[dict, np.ndarray]:
    """The split of ``train_digits.make_data`` on the raw 8x8 images: ``{split_task: (grid, labels)}``
    with grid [N, 8, 8] int64 in 0..16, and the calibration grids; checked against the image files."""
    data, calib = split_tasks(lambda images: images.astype(np.int64))
    # the same images as the image files, row for row
    for name, grid in [(k, v[0]) for k, v in data.items()] + [("calib", calib)]:
        with np.load(out / f"{name}.npz") as f:
            assert np.array_equal(upsample(grid), f["input"]), f"{name}: token images differ from {name}.npz"
            if "labels" in f.files:
                assert np.array_equal(data[name][1], f["labels"]), name
    return data, calib


def to_tokens(grid: np.ndarray) -> dict[str, np.ndarray]:
    """[N, 8, 8] intensities -> input_ids [N, 65] ([CLS] first) and attention_mask [N, 65] of ones."""
    n = len(grid)
    ids = np.concatenate([np.full((n, 1), CLS_ID, np.int64), grid.reshape(n, 64).astype(np.int64)], axis=1)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def shift_grid(grid: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation of [N, 8, 8] grids by up to 1 pixel (zero fill = intensity 0)."""
    n = grid.shape[0]
    pad = F.pad(grid, (1, 1, 1, 1))
    offs = torch.randint(0, 3, (n, 2), generator=gen)
    return torch.stack([pad[i, int(offs[i, 0]):int(offs[i, 0]) + 8, int(offs[i, 1]):int(offs[i, 1]) + 8]
                        for i in range(n)])


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class Logits(nn.Module):
    """A Hugging Face sequence classifier called with ids and mask, returning only its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).logits


def build(arch: str) -> nn.Module:
    _torchvision_ops()  # timm and transformers both import torchvision
    if arch == "deit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**DEIT)
    if arch == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        return Logits(BertForSequenceClassification(BertConfig(**BERT)))
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return Logits(LlamaForSequenceClassification(LlamaConfig(**LLAMA)))


def feeds(arch: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The model's inputs for images [N,1,16,16] (deit) or grids [N,8,8] (bert, llama)."""
    return {"input": x} if arch == "deit" else to_tokens(x)


def predict(model: nn.Module, arch: str, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(*(torch.from_numpy(v) for v in feeds(arch, x).values())).numpy()


def accuracy(model: nn.Module, arch: str, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, arch, x).argmax(1) == y).mean())


def train(arch: str, task: str, data: dict, epochs: int) -> tuple[nn.Module, dict]:
    seed = SEEDS[arch] + (0 if task == "a" else 1)
    recipe = RECIPES[arch]
    torch.manual_seed(seed)
    model = build(arch)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = (torch.from_numpy(a) for a in data[f"train_{task}"])
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n and "token" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["wd"]},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe["lr"])
    steps_per_epoch = (len(x_train) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe["lr"], total_steps=epochs * steps_per_epoch, pct_start=WARMUP)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for k in range(steps_per_epoch):
            b = perm[k * BATCH:(k + 1) * BATCH]
            if arch == "deit":
                logits = model(shift_batch(x_train[b], gen))
            else:
                tok = to_tokens(shift_grid(x_train[b], gen).numpy())
                logits = model(torch.from_numpy(tok["input_ids"]), torch.from_numpy(tok["attention_mask"]))
            loss = F.cross_entropy(logits, y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    info = dict(
        seed=seed, epochs=epochs, train_seconds=round(time.perf_counter() - t0, 1),
        train_acc=accuracy(model, arch, *data[f"train_{task}"]),
        test_acc=accuracy(model, arch, *data[f"test_{task}"]),
        params=sum(p.numel() for p in model.parameters()),
    )
    return model, info


# --------------------------------------------------------------------------------------------
# Export and verification
# --------------------------------------------------------------------------------------------
def example(arch: str) -> dict[str, torch.Tensor]:
    x = np.zeros((2, 1, SIZE, SIZE), np.float32) if arch == "deit" else np.zeros((2, 8, 8), np.int64)
    return {k: torch.from_numpy(v) for k, v in feeds(arch, x).items()}


def export(model: nn.Module, arch: str, path: Path, exporter: str) -> None:
    ex = example(arch)
    names = list(ex)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                model, tuple(ex.values()), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                input_names=names, output_names=["logits"],
                dynamic_axes={n: {0: "batch"} for n in names + ["logits"]})
            return
        data_file = path.with_name(path.name + ".data")
        for p in (path, data_file):
            if p.exists():
                p.unlink()
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(
            model, tuple(ex.values()), str(path), dynamo=True, opset_version=DYNAMO_OPSET, input_names=names,
            output_names=["logits"], dynamic_shapes=tuple({0: batch} for _ in names), external_data=True)
    drop_stack_traces(path)


def drop_stack_traces(path: Path) -> None:
    """Remove the dynamo exporter's ``pkg.torch.onnx.stack_trace`` node metadata (130-200 KB of Python
    stack traces holding this script's absolute path); the other metadata (name scopes, class
    hierarchy, fx node) stays. The weights stay in the external data file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(model, str(path))


def verify(path: Path, model: nn.Module, arch: str, x_eval: np.ndarray, batch1_rows: int = 50) -> dict:
    """onnx.checker, then onnxruntime vs torch on ``x_eval`` at full batch and on its first
    ``batch1_rows`` rows at batch 1: same outputs (1e-3) and the same argmax."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    f = feeds(arch, x_eval)
    assert [i.name for i in sess.get_inputs()] == list(f), sess.get_inputs()
    ref = predict(model, arch, x_eval)
    got = sess.run(["logits"], f)[0]
    got1 = np.concatenate([sess.run(["logits"], {k: v[i:i + 1] for k, v in f.items()})[0]
                           for i in range(batch1_rows)])
    diff_full = float(np.abs(got - ref).max())
    diff_b1 = float(np.abs(got1 - ref[:batch1_rows]).max())
    assert diff_full < 1e-3 and diff_b1 < 1e-3, (path, diff_full, diff_b1)
    assert (got.argmax(1) == ref.argmax(1)).all() and (got1.argmax(1) == ref[:batch1_rows].argmax(1)).all(), path
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return dict(max_abs_diff=diff_full, max_abs_diff_batch1=diff_b1, opset=opset, ir_version=proto.ir_version,
                ops=sorted({n.op_type for n in proto.graph.node}),
                inputs={i.name: str(i.shape) for i in sess.get_inputs()})


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def manifest_entry(arch: str, suffix: str) -> dict:
    data = "" if arch == "deit" else "tokens_"
    return {"a": f"{arch}_a{suffix}", "b": f"{arch}_b{suffix}", "test_a": f"{data}test_a.npz",
            "test_b": f"{data}test_b.npz", "calib": f"{data}calib.npz"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "digits"),
                    help="folder with the image npz files of train_digits.py; everything is written there")
    ap.add_argument("--only", action="append", choices=ARCHS, help="train/export only this arch (repeatable)")
    ap.add_argument("--epochs", type=int, default=None, help="override every recipe's epoch count")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--no-dynamo", action="store_true", help="skip the dynamo exports")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    t_start = time.perf_counter()

    grids, calib_grids = token_data(out)
    for name, (grid, labels) in grids.items():
        save_npz(out / f"tokens_{name}.npz", **to_tokens(grid), labels=labels)
    save_npz(out / "tokens_calib.npz", **to_tokens(calib_grids))
    images = {}
    for name in grids:
        with np.load(out / f"{name}.npz") as f:
            images[name] = (f["input"], f["labels"])

    info_path = out / "transformers_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["_tokens"] = {
        "source": "sklearn.datasets.load_digits 8x8 intensities 0..16, the split and calibration images of "
                  "train_digits.py (same rows as the image npz files)",
        "ids": f"intensity v -> id v (0..16), [CLS] = {CLS_ID} at position 0, [PAD] = {PAD_ID} (unused)",
        "length": SEQ, "attention_mask": "all ones",
    }
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for arch in args.only or ARCHS:
        data = images if arch == "deit" else grids
        x_eval = np.concatenate([data["test_a"][0], data["test_b"][0]])
        exports = [("torchscript", ".onnx")] + ([] if args.no_dynamo else [("dynamo", ".dynamo.onnx")])
        epochs = args.epochs if args.epochs is not None else RECIPES[arch]["epochs"]
        for task in "ab":
            model, minfo = train(arch, task, data, epochs)
            print(f"{arch}_{task}: seed {minfo['seed']} epochs {minfo['epochs']} train {minfo['train_acc']:.4f} "
                  f"test {minfo['test_acc']:.4f} params {minfo['params']} ({minfo['train_seconds']}s)", flush=True)
            for exporter, suffix in exports:
                name = f"{arch}_{task}{suffix}"
                export(model, arch, out / name, exporter)
                v = verify(out / name, model, arch, x_eval)
                key = arch if exporter == "torchscript" else f"{arch}-dynamo"
                info.setdefault(key, {})[task] = dict(file=name, exporter=exporter, bytes=file_size(out / name),
                                                      **minfo, **v)
                print(f"  {name}: checker ok, opset {v['opset']} IR {v['ir_version']}, inputs {v['inputs']}, "
                      f"ORT vs torch max|diff| {v['max_abs_diff']:.2e} (batch 1: {v['max_abs_diff_batch1']:.2e}), "
                      f"{file_size(out / name):,} bytes", flush=True)
        for exporter, suffix in exports:
            manifest[arch if exporter == "torchscript" else f"{arch}-dynamo"] = manifest_entry(arch, suffix)
    info_path.write_text(json.dumps(dict(sorted(info.items())), indent=1) + "\n")
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")

    print("\n| pair | exporter | opset | params (each) | a: test acc | b: test acc | a: bytes | b: bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for key in (k for k in info if not k.startswith("_")):
        a, b = info[key]["a"], info[key]["b"]
        print(f"| {key} | {a['exporter']} | {a['opset']} | {a['params']:,} | {100 * a['test_acc']:.2f}% | "
              f"{100 * b['test_acc']:.2f}% | {a['bytes']:,} | {b['bytes']:,} |")
    print(f"\nwall time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
