"""Tiny torch models exported to ONNX the ways users export them (TorchScript and dynamo).

tests/make_models.py exports them into tests/models/ (committed); the tests read those files, so
only that script and the ``exporter`` tests need torch. Change a model here, then rerun the script."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

torch = None


def _torch():
    global torch
    if torch is None:
        import torch as _t

        torch = _t
        torch.set_num_threads(1)
    return torch


# Hugging Face language models (random weights): token ids in, logits out.
LANGUAGE_MODELS = ("bert", "llama", "llama-gqa", "llama-mqa", "phi")
# grouped-query attention: 4 query heads over this many key/value heads
KV_HEADS = {"llama-gqa": 2, "llama-mqa": 1}
TOKENS = 16  # sequence length of the example inputs
VOCAB = 32


def _transformers():
    """transformers, importable next to a CPU torch: its vision helpers import torchvision, whose
    PyPI build fails to load its C++ ops there; declaring them first is enough to import it."""
    t = _torch()
    global _TORCHVISION_OPS
    if "_TORCHVISION_OPS" not in globals():
        try:
            lib = t.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # a working torchvision is already loaded
            lib = None
        _TORCHVISION_OPS = lib
    import transformers

    return transformers


def build_language_model(arch: str, seed: int, hidden: int = 16, layers: int = 2, heads: int = 2,
                         vocab: int = VOCAB, intermediate: int = 32, kv_heads: int | None = None, tie: bool = True,
                         mask: bool | None = None):
    """A tiny Hugging Face model with random weights: "bert" (BertForSequenceClassification, 3
    labels; inputs input_ids and attention_mask), "llama" (LlamaForCausalLM without a KV cache;
    input input_ids, and attention_mask with ``mask``: TorchScript can export LLaMA only with one) or
    "phi" (PhiForCausalLM: partial rotary, parallel attention and MLP) or "neox" (GPTNeoXForCausalLM:
    q/k/v fused side by side in each head). Norm scales and all biases are made non-trivial, as after training (a Hugging
    Face model starts with zero biases, and the dynamo exporter drops a zero bias)."""
    t = _torch()
    tf = _transformers()
    t.manual_seed(seed)
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=intermediate, max_position_embeddings=2 * TOKENS, num_labels=3)
        inner = tf.BertForSequenceClassification(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads or heads, intermediate_size=intermediate,
                             max_position_embeddings=2 * TOKENS, tie_word_embeddings=tie, use_cache=False)
        inner = tf.LlamaForCausalLM(cfg)
    elif arch == "neox":  # q/k/v fused side by side in each head, a quarter of each head rotated
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=intermediate, max_position_embeddings=2 * TOKENS, rotary_pct=0.25,
                               use_cache=False, tie_word_embeddings=False)
        inner = tf.GPTNeoXForCausalLM(cfg)
    elif arch == "phi":  # partial rotary: half of each head's channels rotated, the rest passed
        cfg = tf.PhiConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=intermediate, max_position_embeddings=2 * TOKENS,
                           partial_rotary_factor=0.5, use_cache=False)
        inner = tf.PhiForCausalLM(cfg)
    else:
        raise ValueError(f"unknown language model {arch!r}: one of {LANGUAGE_MODELS}")
    g = t.Generator().manual_seed(seed + 2000)
    for name, p in inner.named_parameters():
        if "norm" in name.lower() and name.endswith("weight"):
            p.data.copy_(t.rand(p.shape, generator=g) + 0.5)
        elif name.endswith("bias"):
            p.data.copy_(t.randn(p.shape, generator=g) * 0.1)

    class LanguageModel(t.nn.Module):
        token_inputs = ("input_ids", "attention_mask") if (arch == "bert" if mask is None else mask) else ("input_ids",)

        def __init__(self):
            super().__init__()
            self.m = inner

        def forward(self, input_ids, attention_mask=None):
            extra = {"attention_mask": attention_mask} if attention_mask is not None else {}
            return self.m(input_ids=input_ids, use_cache=False, return_dict=False, **extra)[0]

    model = LanguageModel().eval()
    model.vocab = vocab
    return model


def tokens(n: int, seed: int = 0, names=("input_ids",), vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """Random token ids [n, TOKENS] (int64); an attention mask, if asked for, pads the last
    quarter of every other row."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, vocab, (n, TOKENS)).astype(np.int64)}
    if "attention_mask" in names:
        mask = np.ones((n, TOKENS), dtype=np.int64)
        mask[::2, 3 * TOKENS // 4:] = 0
        feeds["attention_mask"] = mask
    return feeds


def example_feeds(arch: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a model of ``arch`` by input name: images, or token ids (and a mask)."""
    if arch in LANGUAGE_MODELS:
        return tokens(n, seed, ("input_ids", "attention_mask") if arch == "bert" else ("input_ids",))
    return {"input": images(n, seed)}


def build(arch: str, seed: int):
    if arch in LANGUAGE_MODELS:  # one block keeps the committed files small
        kv = KV_HEADS.get(arch)
        return build_language_model(arch.split("-")[0], seed, layers=1, heads=4 if kv else 2, kv_heads=kv)
    t = _torch()
    nn = t.nn
    t.manual_seed(seed)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 24), nn.Linear(24, 16), nn.Linear(16, 5)

        def forward(self, x):
            x = x.flatten(1)
            return self.fc3(t.relu(self.fc2(t.relu(self.fc1(x)))))

    class CNN(nn.Module):  # VGG-style with BatchNorm, flatten of a CxHxW map into a dense layer
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
            self.fc1, self.fc2 = nn.Linear(12 * 4 * 4, 16), nn.Linear(16, 5)

        def forward(self, x):
            x = t.relu(self.b1(self.c1(x)))
            x = t.nn.functional.max_pool2d(t.relu(self.b2(self.c2(x))), 2)
            return self.fc2(t.relu(self.fc1(x.view(x.size(0), -1))))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(t.relu(self.bn1(self.conv1(x)))))
            return t.relu(y + (x if self.short is None else self.short(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.l1, self.l2 = Block(8, 8, 1), Block(8, 16, 2)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            x = self.l2(self.l1(t.relu(self.bn(self.stem(x)))))
            return self.fc(x.mean(dim=(2, 3)))

    class DW(nn.Module):  # MobileNet-style: depthwise convs and ReLU6
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6())
            self.pw = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            return self.fc(t.flatten(self.pool(self.pw(self.dw(self.stem(x)))), 1))

    class Cat(nn.Module):  # channel Concat of two branches
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(1, 4, 1)
            self.c = nn.Conv2d(10, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = t.cat([t.relu(self.a(x)), t.sigmoid(self.b(x))], dim=1)
            return self.fc(t.relu(self.c(x)).mean(dim=(2, 3)))

    class Attention(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.h, self.dh = heads, d // heads
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x):
            n, t, d = x.shape
            q, k, v = (f(x).reshape(n, t, self.h, self.dh).transpose(1, 2) for f in (self.q, self.k, self.v))
            w = (q @ k.transpose(-2, -1) * self.dh ** -0.5).softmax(dim=-1)
            return self.o((w @ v).transpose(1, 2).reshape(n, t, d))

    class ViT(nn.Module):  # pre-norm encoder: patch embedding, cls token, position embedding
        def __init__(self, d=8, heads=2, blocks=2):
            super().__init__()
            self.patch = nn.Conv2d(1, d, 2, 2)
            self.cls = nn.Parameter(t.randn(1, 1, d) * 0.5)
            self.pos = nn.Parameter(t.randn(1, 17, d) * 0.5)
            self.blocks = nn.ModuleList()
            for _ in range(blocks):
                self.blocks.append(nn.ModuleDict({
                    "ln1": nn.LayerNorm(d), "attn": Attention(d, heads), "ln2": nn.LayerNorm(d),
                    "fc1": nn.Linear(d, 2 * d), "fc2": nn.Linear(2 * d, d),
                }))
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 5)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = t.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            for b in self.blocks:
                x = x + b["attn"](b["ln1"](x))
                x = x + b["fc2"](nn.functional.gelu(b["fc1"](b["ln2"](x))))
            return self.head(self.ln(x)[:, 0])

    class FusedQKV(nn.Module):  # timm-style: one Linear to 3*d, cut by reshape/permute/unbind
        def __init__(self, d, heads):
            super().__init__()
            self.h, self.dh = heads, d // heads
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x):
            n, tokens, d = x.shape
            q, k, v = self.qkv(x).reshape(n, tokens, 3, self.h, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
            w = (q @ k.transpose(-2, -1) * self.dh ** -0.5).softmax(dim=-1)
            return self.proj((w @ v).transpose(1, 2).reshape(n, tokens, d))

    class MHA(nn.Module):  # torch's nn.MultiheadAttention (fused in_proj, sequence-first inside)
        def __init__(self, d, heads):
            super().__init__()
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    class FusedViT(ViT):  # the ViT with nn.MultiheadAttention in block 1 and a fused qkv in block 2
        def __init__(self, d=8, heads=2):
            super().__init__(d, heads, blocks=2)
            self.blocks[0]["attn"], self.blocks[1]["attn"] = MHA(d, heads), FusedQKV(d, heads)

    class Mixer(nn.Module):  # MLP-Mixer: token-mixing MLPs on the token axis, channel MLPs on the channels
        def __init__(self, d=8, tokens=16, blocks=2):
            super().__init__()
            self.patch = nn.Conv2d(1, d, 2, 2)
            self.blocks = nn.ModuleList(nn.ModuleDict({
                "ln1": nn.LayerNorm(d), "tok1": nn.Linear(tokens, 8), "tok2": nn.Linear(8, tokens),
                "ln2": nn.LayerNorm(d), "fc1": nn.Linear(d, 2 * d), "fc2": nn.Linear(2 * d, d),
            }) for _ in range(blocks))
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 5)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            for b in self.blocks:
                x = x + b["tok2"](nn.functional.gelu(b["tok1"](b["ln1"](x).transpose(1, 2)))).transpose(1, 2)
                x = x + b["fc2"](nn.functional.gelu(b["fc1"](b["ln2"](x))))
            return self.head(self.ln(x).mean(1))

    model = {"mlp": MLP, "cnn": CNN, "resnet": ResNet, "dw": DW, "cat": Cat, "vit": ViT, "mha": FusedViT,
             "mixer": Mixer}[arch]()
    if arch in ("vit", "mha", "mixer"):  # non-trivial LayerNorm parameters, as after training
        g = t.Generator().manual_seed(seed + 2000)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.data.copy_(t.rand(m.normalized_shape, generator=g) + 0.5)
                m.bias.data.copy_(t.randn(m.normalized_shape, generator=g) * 0.1)
    # non-trivial BatchNorm statistics, as after training
    g = t.Generator().manual_seed(seed + 1000)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(t.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(t.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(t.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(t.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def export(model, path: Path, exporter: str = "torchscript", fold: bool = True, opset: int = 17,
           batch: int = 0) -> Path:
    """Export ``model`` to ``path``; ``batch`` > 0 fixes the batch axis to that size (dynamic otherwise)."""
    t = _torch()
    names = getattr(model, "token_inputs", None)
    if names is not None:
        return _export_tokens(model, path, names, exporter, fold, opset, batch)
    x = t.rand(batch or 2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = None if batch else {"input": {0: "batch"}, "logits": {0: "batch"}}
            t.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes, do_constant_folding=fold)
        else:
            shapes = None if batch else ({0: t.export.Dim("batch", min=1, max=1024)},)
            t.onnx.export(model, (x,), str(path), dynamo=True, opset_version=max(opset, 18),
                          dynamic_shapes=shapes, optimize=fold, verbose=False)
    return path


def _export_tokens(model, path: Path, names, exporter: str, fold: bool, opset: int, batch: int = 0) -> Path:
    t = _torch()
    args = tuple(t.from_numpy(v) for v in tokens(batch or 2, seed=0, names=names, vocab=model.vocab).values())
    with warnings.catch_warnings(), t.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = None if batch else {n: {0: "batch"} for n in (*names, "logits")}
            t.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, input_names=list(names),
                          output_names=["logits"], dynamic_axes=axes, do_constant_folding=fold)
        else:
            dim = t.export.Dim("batch", min=1, max=1024)
            shapes = None if batch else tuple({0: dim} for _ in names)
            t.onnx.export(model, args, str(path), dynamo=True, opset_version=max(opset, 18), input_names=list(names),
                          output_names=["logits"], dynamic_shapes=shapes, optimize=fold, verbose=False)
    return path


def images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random 1x8x8 images (correlated pixels, like real ones)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 4, 4)).astype(np.float32)
    return np.kron(x, np.ones((1, 1, 2, 2), dtype=np.float32)) + 0.05 * rng.standard_normal((n, 1, 8, 8)).astype(np.float32)


def require(*modules: str) -> None:
    """Skip the calling test unless every module can be imported (the zoo and language-model
    exporter tests need timm, transformers or torchvision besides torch: pip install -e '.[zoo]')."""
    import importlib.util

    import pytest

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: pip install -e '.[zoo]'")
