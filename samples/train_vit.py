"""A small Vision Transformer pair on the digits tasks (0-4 vs 5-9), exported with both torch exporters.

Same data as the other torch samples: ``samples/digits/{train,test}_{a,b}.npz`` written by
``samples/train_digits.py`` (this script only reads them). Model ``a`` is trained on task a
(digits 0-4) only, model ``b`` on task b (digits 5-9, label = digit - 5) only, each from its own
random initialization.

Architecture (hand-written, no timm), D = 64, 4 heads (dh = 16), 2 pre-norm encoder blocks:

    patch embedding  Conv2d(1, D, kernel 4, stride 4): 16x16 -> 4x4 = 16 tokens,
                     .flatten(2).transpose(1, 2) -> [N, 16, D]
    cls token        learned [1, 1, D], expanded to [N, 1, D], concatenated in front -> [N, 17, D]
    position emb.    learned [1, 17, D], added
    block x 2        x = x + Attn(LN(x));  x = x + MLP(LN(x))
      Attn           separate q, k, v Linear(D, D); heads by reshape(N, T, H, dh).transpose(1, 2);
                     softmax(q @ k^T * dh**-0.5) @ v; merge by transpose(1, 2).reshape(N, T, D);
                     output projection Linear(D, D)
      MLP            Linear(D, 2D) -> GELU (exact, erf) -> Linear(2D, D)
    final LayerNorm, cls token x[:, 0], head Linear(D, 5)

Exports, input ``input`` [batch, 1, 16, 16] float32, output ``logits`` [batch, 5], dynamic batch:

- ``vit_{a,b}.onnx``: TorchScript exporter (``dynamo=False``), opset 17, constant folding;
- ``vit_{a,b}.dynamo.onnx`` (+ ``.onnx.data``): dynamo exporter (``dynamo=True``), opset 18,
  ``dynamic_shapes`` with a ``batch`` dim, weights in external data.

Usage::

    pip install -e .[samples]                 # torch==2.13.0
    python samples/train_vit.py               # train both, export, verify, update manifest.json
    python samples/train_vit.py --describe    # only print the op sequence of the committed files
    python samples/train_vit.py --epochs 3 --out /tmp/digits   # smoke run (copies nothing: --out
                                              # must already hold the npz files)

Seeds: model a 5000, model b 5001 (init, shuffling, augmentation), with
``torch.use_deterministic_algorithms(True)``; the weights (and so the ONNX files) are reproducible
for the same torch version, CPU kind and thread count (1 by default, see --threads). About 2 minutes
on 2 CPU cores (1 thread).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
# shared with the CNN samples: augmentation, accuracy, the two exporters (same opsets), file sizes
from train_digits import SIZE, accuracy, export_dynamo, export_torchscript, file_size, shift_batch, verify

# --------------------------------------------------------------------------------------------
# Settings (changing any of these changes the committed samples)
# --------------------------------------------------------------------------------------------
SEEDS = {"a": 5000, "b": 5001}
PATCH = 4
DIM = 64
HEADS = 4
DEPTH = 2
MLP_RATIO = 2
NUM_CLASSES = 5
# AdamW (weight decay on the matrices only, not on biases, LayerNorm, cls token or position embeddings),
# one-cycle learning rate with 10% warmup.
RECIPE = dict(epochs=200, lr=2e-3, wd=0.05, warmup=0.1)
BATCH = 64


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.scale = self.dh ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q = self.q(x).reshape(n, t, self.heads, self.dh).transpose(1, 2)   # [N, H, T, dh]
        k = self.k(x).reshape(n, t, self.heads, self.dh).transpose(1, 2)
        v = self.v(x).reshape(n, t, self.heads, self.dh).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale                       # [N, H, T, T]
        attn = attn.softmax(dim=-1)
        ctx = (attn @ v).transpose(1, 2).reshape(n, t, d)                   # [N, T, D]
        return self.proj(ctx)


class MLP(nn.Module):
    def __init__(self, dim: int = DIM, hidden: int = DIM * MLP_RATIO):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int = DIM):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = DIM, depth: int = DEPTH):
        super().__init__()
        tokens = (SIZE // PATCH) ** 2
        self.patch_embed = nn.Conv2d(1, dim, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)          # [N, 16, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)              # [N, 1, D]
        x = torch.cat([cls, x], dim=1) + self.pos_embed              # [N, 17, D]
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


# --------------------------------------------------------------------------------------------
# Data and training
# --------------------------------------------------------------------------------------------
def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as d:
        return d["input"], d["labels"]


def train(task: str, data: dict, epochs: int) -> tuple[nn.Module, dict]:
    seed = SEEDS[task]
    torch.manual_seed(seed)
    model = ViT()
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = (torch.from_numpy(a) for a in data[f"train_{task}"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": RECIPE["wd"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=RECIPE["lr"])
    steps_per_epoch = (len(x_train) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=RECIPE["lr"], total_steps=epochs * steps_per_epoch, pct_start=RECIPE["warmup"])
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for k in range(steps_per_epoch):
            b = perm[k * BATCH:(k + 1) * BATCH]
            xb = shift_batch(x_train[b], gen)
            loss = F.cross_entropy(model(xb), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    info = dict(
        seed=seed, epochs=epochs, train_seconds=round(time.perf_counter() - t0, 1),
        train_acc=accuracy(model, *data[f"train_{task}"]),
        test_acc=accuracy(model, *data[f"test_{task}"]),
        params=sum(p.numel() for p in model.parameters()),
    )
    return model, info


# --------------------------------------------------------------------------------------------
# Inspection (export and verification: train_digits.py)
# --------------------------------------------------------------------------------------------
def describe(path: Path, x: np.ndarray) -> None:
    """Print every node (op type, inputs, attributes, output shapes from an ORT run of batch len(x))."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    g = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    outputs = [o for n in g.node for o in n.output if o]
    known = {o.name for o in g.output}
    for o in outputs:
        if o not in known:
            g.output.append(onnx.ValueInfoProto(name=o))
            known.add(o)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    vals = dict(zip(names, sess.run(names, {"input": x})))

    def show_in(name: str) -> str:
        if name in inits:
            a = inits[name]
            return f"W{list(a.shape)}" if a.size > 8 else f"W={a.tolist()}"
        if name in consts:
            a = consts[name]
            return f"C{list(a.shape)}" if a.size > 8 else f"C={a.tolist()}"
        return "in" if name == "input" else "x"

    print(f"== {path.name}: {len(g.node)} nodes, batch {len(x)}")
    for n in g.node:
        if n.op_type == "Constant":
            continue
        attrs = []
        for a in n.attribute:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, onnx.TensorProto):
                v = numpy_helper.to_array(v).tolist()
            attrs.append(f"{a.name}={v}")
        shapes = [list(vals[o].shape) if o in vals else "?" for o in n.output]
        print(f"  {n.op_type:<20} ({', '.join(show_in(i) for i in n.input)})"
              f"{' [' + ', '.join(attrs) + ']' if attrs else ''} -> {shapes}  {n.name}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def update_manifest(out: Path) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    for key, suffix in (("vit", ".onnx"), ("vit-dynamo", ".dynamo.onnx")):
        if (out / f"vit_a{suffix}").exists() and (out / f"vit_b{suffix}").exists():
            manifest[key] = {"a": f"vit_a{suffix}", "b": f"vit_b{suffix}",
                             "test_a": "test_a.npz", "test_b": "test_b.npz", "calib": "calib.npz"}
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "digits"),
                    help="folder with {train,test}_{a,b}.npz; the ONNX files are written there")
    ap.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: this model's small matmuls gain nothing from a second "
                         "thread, and on a busy 2-core machine 2 threads ran a step 35x slower)")
    ap.add_argument("--no-dynamo", action="store_true", help="skip the dynamo exports")
    ap.add_argument("--describe", action="store_true",
                    help="only print the node sequence of the vit files in --out (no training)")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    data = {f"{s}_{t}": load(out / f"{s}_{t}.npz") for s in ("train", "test") for t in "ab"}
    x_eval = np.concatenate([data["test_a"][0], data["test_b"][0]])

    if args.describe:
        for name in ("vit_a.onnx", "vit_a.dynamo.onnx"):
            if (out / name).exists():
                describe(out / name, x_eval[:3])
        return

    t_start = time.perf_counter()
    rows = {}
    for task in "ab":
        model, minfo = train(task, data, args.epochs)
        print(f"vit_{task}: seed {minfo['seed']} epochs {minfo['epochs']} train {minfo['train_acc']:.4f} "
              f"test {minfo['test_acc']:.4f} params {minfo['params']} ({minfo['train_seconds']}s)", flush=True)
        exports = [("vit", f"vit_{task}.onnx", export_torchscript)]
        if not args.no_dynamo:
            exports.append(("vit-dynamo", f"vit_{task}.dynamo.onnx", export_dynamo))
        for key, name, fn in exports:
            fn(model, out / name)
            v = verify(out / name, model, x_eval, batch1_rows=len(x_eval))
            rows.setdefault(key, {})[task] = dict(minfo, bytes=file_size(out / name), **v)
            print(f"  {name}: checker ok, opset {v['opset']} IR {v['ir_version']}, input {v['input_shape']} "
                  f"output {v['output_shape']}, ORT vs torch max|diff| {v['max_abs_diff']:.2e} "
                  f"(batch 1: {v['max_abs_diff_batch1']:.2e}), {file_size(out / name)} bytes, ops {v['ops']}",
                  flush=True)
    update_manifest(out)

    print("\n| pair | exporter | opset | params (each) | a: test acc | b: test acc | a: bytes | b: bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in rows.items():
        a, b = r["a"], r["b"]
        exporter = "dynamo" if key.endswith("dynamo") else "torchscript"
        print(f"| {key} | {exporter} | {a['opset']} | {a['params']:,} | {100 * a['test_acc']:.2f}% | "
              f"{100 * b['test_acc']:.2f}% | {a['bytes']:,} | {b['bytes']:,} |")
    print(f"\nwall time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
