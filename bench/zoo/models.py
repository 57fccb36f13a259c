"""Tiny instances of the model families people export, built from the real libraries.

Each builder takes a seed and returns ``(module, example)``: a torch module in eval mode with
random weights and a dict of example inputs (batch ``BATCH``; the keys are the ONNX input names).
Sizes are the smallest the constructors allow (few layers, narrow widths, 3x32x32 images or
16-token sequences) so that every export and zip takes seconds.

torchvision's PyPI wheel is a CUDA build whose compiled ops fail to load next to CPU torch; its
model definitions are pure Python, so the two ops its import registers are declared here first
(:func:`_torchvision_ops`). timm imports torchvision, so it needs the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

BATCH = 8  # the example batch: dynamo bakes it into Reshape constants, so calibration runs in batches of it
IMAGE = (3, 32, 32)
TOKENS = 16
VOCAB = 64
CLASSES = 5

_TORCHVISION_LIB = None


def _torchvision_ops() -> None:
    """Declare torchvision's compiled ops (before its first import) so its model definitions import."""
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is None:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIB = lib


@dataclass(frozen=True)
class ZooModel:
    name: str
    library: str  # torchvision, timm, transformers, torch
    family: str  # what the instance stands for
    kind: str  # "image" or "tokens"
    build: Callable[[], nn.Module]
    takes_mask: bool = False  # token models: an attention_mask input beside input_ids


def _image(seed: int) -> dict:
    g = torch.Generator().manual_seed(10_000 + seed)
    return {"input": torch.randn((BATCH,) + IMAGE, generator=g)}


def _tokens(seed: int, mask: bool) -> dict:
    g = torch.Generator().manual_seed(10_000 + seed)
    feeds = {"input_ids": torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g, dtype=torch.int64)}
    if mask:
        feeds["attention_mask"] = torch.ones((BATCH, TOKENS), dtype=torch.int64)
    return feeds


# --- torchvision -------------------------------------------------------------------------------

def _tv_resnet18():
    from torchvision.models import resnet18

    return resnet18(num_classes=CLASSES)


def _tv_resnet50_style():
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=CLASSES, width_per_group=16)


def _tv_resnext():
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=CLASSES, groups=4, width_per_group=4)


def _tv_mobilenet_v2():
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(num_classes=CLASSES, width_mult=0.25)


def _tv_mobilenet_v3_small():
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(num_classes=CLASSES, width_mult=0.25)


def _tv_efficientnet_b0():
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return EfficientNet(setting, dropout=0.2, num_classes=CLASSES, last_channel=last)


def _tv_squeezenet():
    from torchvision.models import squeezenet1_1

    return squeezenet1_1(num_classes=CLASSES)


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=CLASSES)


def _tv_densenet():
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=CLASSES)


def _tv_regnet_y():
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return RegNet(params, num_classes=CLASSES)


def _tv_shufflenet_v2():
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    return ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=CLASSES)


def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=CLASSES)


def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=CLASSES)


# --- timm --------------------------------------------------------------------------------------

def _timm(name: str, **kwargs):
    """timm.create_model for a registered name whose defaults the kwargs may override."""
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)
    return build


def _timm_mixer():
    from timm.models.mlp_mixer import MlpMixer  # its registered names fix patch_size and widths

    return MlpMixer(num_classes=CLASSES, img_size=32, patch_size=8, embed_dim=32, num_blocks=2)


def _timm_convnext():
    from timm.models.convnext import ConvNeXt  # its registered names fix depths and dims

    return ConvNeXt(num_classes=CLASSES, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))


# --- transformers ------------------------------------------------------------------------------

class _BertLogits(nn.Module):
    """A Hugging Face classifier called with ids and mask, returning only its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).logits


class _CausalLogits(nn.Module):
    """A Hugging Face causal LM called with ids and mask (no KV cache), returning only its logits.

    Without a mask, transformers looks for packed sequences with ``torch.diff``, which the
    TorchScript exporter cannot export; callers pass one anyway."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits


def _hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=CLASSES,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _BertLogits(BertForSequenceClassification(cfg))


def _hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, n_inner=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    return _CausalLogits(GPT2LMHeadModel(cfg))


def _hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True, use_cache=False)
    return _CausalLogits(LlamaForCausalLM(cfg))


def _hf_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # grouped-query attention (4 query heads over 2 key/value heads), q/k/v biases, untied head
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False, use_cache=False)
    return _CausalLogits(Qwen2ForCausalLM(cfg))


def _hf_mistral_mqa():
    from transformers import MistralConfig, MistralForCausalLM

    # multi-query attention (one key/value head), tied embeddings
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32,
                        tie_word_embeddings=True, use_cache=False, sliding_window=None)
    return _CausalLogits(MistralForCausalLM(cfg))


def _hf_gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    # fused q/k/v interleaved per head ([heads, 3, d]), partial rotary (a quarter of each head), parallel residual
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32, rotary_pct=0.25, use_cache=False,
                        tie_word_embeddings=False)
    return _CausalLogits(GPTNeoXForCausalLM(cfg))


def _hf_phi():
    from transformers import PhiConfig, PhiForCausalLM

    # partial rotary (half of each head), parallel attention and MLP, LayerNorm with biases
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=32, partial_rotary_factor=0.5, use_cache=False)
    return _CausalLogits(PhiForCausalLM(cfg))


# --- torch -------------------------------------------------------------------------------------

class _TinyEncoder(nn.Module):
    """Token embedding, one nn.TransformerEncoderLayer (nn.MultiheadAttention inside), mean pool, head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, 32) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, input_ids):
        x = self.encoder(self.embed(input_ids) + self.pos)
        return self.head(x.mean(dim=1))


MODELS: list[ZooModel] = [
    ZooModel("tv_resnet18", "torchvision", "ResNet-18", "image", _tv_resnet18),
    ZooModel("tv_resnet50", "torchvision", "ResNet-50-style bottleneck [1,1,1,1]", "image", _tv_resnet50_style),
    ZooModel("tv_mobilenet_v2", "torchvision", "MobileNetV2 x0.25", "image", _tv_mobilenet_v2),
    ZooModel("tv_mobilenet_v3", "torchvision", "MobileNetV3-Small x0.25", "image", _tv_mobilenet_v3_small),
    ZooModel("tv_efficientnet", "torchvision", "EfficientNet-B0 x0.25", "image", _tv_efficientnet_b0),
    ZooModel("tv_squeezenet", "torchvision", "SqueezeNet 1.1", "image", _tv_squeezenet),
    ZooModel("tv_convnext", "torchvision", "ConvNeXt (2 stages, 16/32)", "image", _tv_convnext),
    ZooModel("tv_densenet", "torchvision", "DenseNet (growth 8, 2+2)", "image", _tv_densenet),
    ZooModel("tv_regnet_y", "torchvision", "RegNetY (group width 8, SE)", "image", _tv_regnet_y),
    ZooModel("tv_resnext", "torchvision", "ResNeXt-style bottleneck (groups 4)", "image", _tv_resnext),
    ZooModel("tv_shufflenet_v2", "torchvision", "ShuffleNetV2 (8/16/32/64/128)", "image", _tv_shufflenet_v2),
    ZooModel("tv_vit", "torchvision", "VisionTransformer (patch 8, 2x32)", "image", _tv_vit),
    ZooModel("tv_swin", "torchvision", "Swin (embed 16, depths 2,2, window 4)", "image", _tv_swin),
    ZooModel("timm_deit", "timm", "DeiT (fused qkv, patch 8, 2x32)", "image",
             _timm("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    ZooModel("timm_mixer", "timm", "MLP-Mixer (patch 8, 2x32)", "image",
             _timm_mixer),
    ZooModel("timm_convnext", "timm", "ConvNeXt (depths 1,1,1,1, dims 8-64)", "image",
             _timm_convnext),
    ZooModel("timm_resnet", "timm", "ResNet-10-T", "image", _timm("resnet10t")),
    ZooModel("hf_bert", "transformers", "BertForSequenceClassification (2x32)", "tokens", _hf_bert, takes_mask=True),
    ZooModel("hf_gpt2", "transformers", "GPT2LMHeadModel (2x32)", "tokens", _hf_gpt2, takes_mask=True),
    ZooModel("hf_llama", "transformers", "LlamaForCausalLM (2x32, tied embeddings)", "tokens", _hf_llama, takes_mask=True),
    ZooModel("hf_qwen2", "transformers", "Qwen2ForCausalLM (2x32, 4 query heads over 2 key/value heads)", "tokens",
             _hf_qwen2, takes_mask=True),
    ZooModel("hf_gpt_neox", "transformers", "GPTNeoXForCausalLM (2x32, fused q/k/v per head, partial rotary)",
             "tokens", _hf_gpt_neox, takes_mask=True),
    ZooModel("hf_phi", "transformers", "PhiForCausalLM (2x32, partial rotary, parallel blocks)", "tokens", _hf_phi,
             takes_mask=True),
    ZooModel("hf_mistral_mqa", "transformers", "MistralForCausalLM (2x32, 4 query heads over 1 key/value head)", "tokens",
             _hf_mistral_mqa, takes_mask=True),
    ZooModel("torch_mha", "torch", "nn.TransformerEncoderLayer (nn.MultiheadAttention)", "tokens",
             lambda: _TinyEncoder()),
]


def build(model: ZooModel, seed: int) -> tuple[nn.Module, dict]:
    """One instance with seed-dependent random weights, in eval mode, and its example inputs."""
    if model.library in ("torchvision", "timm", "transformers"):  # some transformers models import torchvision
        _torchvision_ops()
    torch.manual_seed(seed)
    module = _as_if_trained(model.build().eval(), seed)
    example = _image(seed) if model.kind == "image" else _tokens(seed, model.takes_mask)
    return module, example


def _as_if_trained(module: nn.Module, seed: int) -> nn.Module:
    """Give the parameters a fresh initialization leaves trivial the spread training gives them:
    norm scales around 1 (not exactly 1), biases and BatchNorm statistics off zero. Exporters treat
    the trivial values specially (the dynamo exporter drops an all-zero bias and a scale of ones),
    which trained models never show."""
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for m in module.modules():
            is_norm = isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(m).__name__
            for name, p in m.named_parameters(recurse=False):
                if name == "bias":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif is_norm and name == "weight":
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module
