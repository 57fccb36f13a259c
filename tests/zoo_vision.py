"""Tiny vision transformers from the libraries people export them from (torchvision, timm, torch.nn),
for the ``exporter``-marked tests (tests/test_zoo_vision.py). Random weights; nothing is downloaded.

torchvision's PyPI wheel is a CUDA build whose compiled ops fail to load next to a CPU torch
("operator torchvision::nms does not exist"); its pure-Python model definitions are all these tests
need, so the two missing op schemas are declared before it is imported.
"""

from __future__ import annotations

import warnings
from pathlib import Path

KINDS = ["torchvision_vit", "timm_deit", "torch_encoder", "torch_encoder_masked", "torch_mha", "timm_mixer", "torchvision_swin", "torch_sdpa_masked",
         "torch_sdpa_causal", "torch_chunked",
         "timm_vit_avgpool_nobias", "timm_deit_distilled", "timm_vit_reg_tokens"]
_LIB = []


def _torch():
    import torch

    if not _LIB:
        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIB.append(lib)  # the schemas live as long as the library object
        except RuntimeError:  # a torchvision with working ops already defined them
            _LIB.append(None)
    return torch


def build(kind: str, seed: int):
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(seed)

    class Encoder(nn.Module):  # nn.TransformerEncoder on patch tokens, optionally with a float mask
        def __init__(self, masked: bool):
            super().__init__()
            self.embed = nn.Conv2d(3, 32, 8, 8)
            layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 5)
            self.masked = masked
            self.bias = nn.Parameter(torch.randn(16, 16) * 0.3)  # an additive attention bias

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            if self.masked:
                causal = torch.triu(torch.full((16, 16), float("-inf")), diagonal=1)
                t = self.enc(t, mask=causal + self.bias)
            else:
                t = self.enc(t)
            return self.head(t.mean(1))

    class MHA(nn.Module):  # nn.MultiheadAttention sequence-first and batch-first
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 32, 8, 8)
            self.attn = nn.MultiheadAttention(32, 4)
            self.attn2 = nn.MultiheadAttention(32, 2, batch_first=True)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            t = self.embed(x).flatten(2).permute(2, 0, 1)
            t = t + self.attn(t, t, t, need_weights=False)[0]
            t = t.transpose(0, 1)
            t = t + self.attn2(t, t, t)[0]
            return self.head(t.mean(1))

    class SDPA(nn.Module):  # fused qkv, scaled_dot_product_attention with a per-head masked bias or is_causal
        def __init__(self, causal: bool):
            super().__init__()
            self.embed = nn.Conv2d(3, 32, 8, 8)
            self.qkv, self.proj = nn.Linear(32, 96), nn.Linear(32, 32)
            self.bias = nn.Parameter(torch.randn(1, 4, 16, 16) * 0.3)
            self.register_buffer("mask", torch.triu(torch.ones(16, 16, dtype=torch.bool), 1))
            self.causal = causal
            self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 5)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            n = t.shape[0]
            q, k, v = self.qkv(t).reshape(n, 16, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
            sdpa = nn.functional.scaled_dot_product_attention
            if self.causal:
                a = sdpa(q, k, v, is_causal=True)
            else:
                a = sdpa(q, k, v, attn_mask=self.bias.masked_fill(self.mask, float("-inf")))
            t = t + self.proj(a.transpose(1, 2).contiguous().reshape(n, 16, 32))
            t = t + self.fc2(nn.functional.gelu(self.fc1(t)))
            return self.head(t.mean(1))

    class Chunked(nn.Module):  # q, k, v = c_attn(x).split(D) (GPT-2); gate, up = gate_up(x).chunk(2) (SwiGLU)
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 32, 8, 8)
            self.c_attn, self.c_proj = nn.Linear(32, 96), nn.Linear(32, 32)
            self.gate_up, self.down, self.head = nn.Linear(32, 128), nn.Linear(64, 32), nn.Linear(32, 5)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            n = t.shape[0]
            q, k, v = (z.reshape(n, 16, 4, 8).transpose(1, 2) for z in self.c_attn(t).split(32, dim=2))
            w = (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1)
            t = t + self.c_proj((w @ v).transpose(1, 2).reshape(n, 16, 32))
            g, u = self.gate_up(t).chunk(2, dim=-1)
            t = t + self.down(nn.functional.silu(g) * u)
            return self.head(t.mean(1))

    if kind == "torchvision_vit":
        from torchvision.models.vision_transformer import VisionTransformer

        m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    elif kind == "timm_deit":
        import timm

        m = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, num_classes=5)
    elif kind == "torchvision_swin":
        from torchvision.models.swin_transformer import SwinTransformer

        m = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                            num_classes=5)
    elif kind in ("timm_vit_avgpool_nobias", "timm_deit_distilled", "timm_vit_reg_tokens"):
        import timm

        name, extra = {
            "timm_vit_avgpool_nobias": ("vit_tiny_patch16_224", dict(qkv_bias=False, class_token=False, global_pool="avg")),
            "timm_deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
            "timm_vit_reg_tokens": ("vit_tiny_patch16_224", dict(reg_tokens=2, no_embed_class=True)),
        }[kind]
        m = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                              num_classes=5, **extra)
    elif kind == "timm_mixer":
        from timm.models.mlp_mixer import MlpMixer

        m = MlpMixer(img_size=32, patch_size=8, embed_dim=32, num_blocks=2, num_classes=5)
    elif kind in ("torch_encoder", "torch_encoder_masked"):
        m = Encoder(kind.endswith("masked"))
    elif kind.startswith("torch_sdpa"):
        m = SDPA(kind.endswith("causal"))
    elif kind == "torch_chunked":
        m = Chunked()
    elif kind == "torch_mha":
        m = MHA()
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial norms, biases, tokens and positions, as after training
        for name, p in m.named_parameters():
            if p.dim() == 1 or "pos" in name or "token" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.abs().max() == 0:  # zeros-initialized heads (torchvision, timm): outputs would not depend on the input
                p.normal_(0, 0.1)
    return m.eval()


def export(model, path: Path, exporter: str) -> Path:
    torch = _torch()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], output_names=["logits"],
                              dynamic_shapes={"x": {0: torch.export.Dim("n", min=1, max=1024)}}, verbose=False)
    return path
