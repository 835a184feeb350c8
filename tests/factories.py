"""Model factories for ``vitcost calibrate --model-factory tests.factories:NAME``.

timm and transformers are not dependencies of vitcost, so the models that follow their
conventions are built here from the reference ViT's modules: the same operators (so a
correct prediction is exact), under the attribute names vitcost reads.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from vitcost.reference_vit import build
from vitcost.specs import make_spec

TINY = dict(dim=64, depth=2, heads=2, mlp_hidden=256, patch=16, image_h=64, image_w=64, classes=10)


def _spec(**kw):
    fields = {**TINY, **kw}
    return make_spec(**fields)


def reference(attention: str = "sdpa", **kw) -> nn.Module:
    """vitcost's own reference ViT: the architecture is read from its ``.spec``."""
    return build(_spec(**kw), attention=attention)


class LayerScale(nn.Module):
    """timm's LayerScale (``init_values``): ``x * gamma``, one parameter of width D."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class TimmLikeViT(nn.Module):
    """The attribute names and forward of timm's ``VisionTransformer`` (class token, learned
    position embedding after the prefix, token pooling). ``init_values`` adds timm's
    layer-scale; ``norm_pre`` the LayerNorm before the blocks of timm's CLIP towers, which
    vitcost does not model."""

    def __init__(self, attention: str = "sdpa", init_values: float | None = None, norm_pre: bool = False,
                 **kw) -> None:
        super().__init__()
        spec = _spec(**kw)
        inner = build(spec, attention=attention)
        self.patch_embed = inner.patch_embed
        self.patch_embed.img_size = (spec.image_h, spec.image_w)
        self.patch_embed.patch_size = (spec.patch, spec.patch)
        self.cls_token = inner.cls_token
        self.reg_token = None
        self.pos_embed = inner.pos_embed
        self.blocks = inner.blocks
        for blk in self.blocks:
            blk.attn.num_heads = blk.attn.heads
            blk.ls1 = LayerScale(spec.dim, init_values) if init_values else nn.Identity()
            blk.ls2 = LayerScale(spec.dim, init_values) if init_values else nn.Identity()
        self.norm_pre = nn.LayerNorm(spec.dim) if norm_pre else nn.Identity()
        self.norm = inner.norm
        self.head = inner.head
        self.embed_dim = spec.dim
        self.num_prefix_tokens = 1
        self.no_embed_class = False
        self.global_pool = "token"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        for blk in self.blocks:
            x = x + blk.ls1(blk.attn(blk.norm1(x)))
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        x = self.norm(x)
        return self.head(x[:, 0])


def timm_like(**kw) -> nn.Module:
    return TimmLikeViT(**kw)


def timm_like_layerscale(**kw) -> nn.Module:
    """A timm ViT with layer-scale (DINOv2, DeiT III): read from its blocks' ``ls1.gamma``."""
    return TimmLikeViT(init_values=1e-5, **kw)


def timm_like_norm_pre(**kw) -> nn.Module:
    """A timm ViT with a LayerNorm before the blocks (CLIP towers): not modelled, so the
    prediction is off."""
    return TimmLikeViT(norm_pre=True, **kw)


class HFLikeViT(nn.Module):
    """Hugging Face's ``ViTForImageClassification`` conventions: a ``config`` and an output
    object with ``.logits``."""

    def __init__(self, attention: str = "sdpa", **kw) -> None:
        super().__init__()
        spec = _spec(**kw)
        self.vit = build(spec, attention=attention)
        self.vit.head = None  # the classifier lives outside, as in transformers
        self.classifier = nn.Linear(spec.dim, spec.classes)
        self.config = SimpleNamespace(
            hidden_size=spec.dim, num_hidden_layers=spec.depth, num_attention_heads=spec.heads,
            intermediate_size=spec.mlp_hidden, patch_size=spec.patch, image_size=spec.image_h,
            num_channels=spec.channels, qkv_bias=spec.qkv_bias,
        )

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.classifier(self.vit.forward_features(pixel_values)[:, 0]))


def hf_like(**kw) -> nn.Module:
    return HFLikeViT(**kw)


def opaque(**kw) -> nn.Module:
    """The reference ViT inside an ``nn.Sequential``: no attribute says what it is."""
    return nn.Sequential(build(_spec(**kw)))


class _AllocatesTooMuch(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.spec = inner.spec  # the architecture, as vitcost's reference model gives it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.empty(2**60, dtype=torch.uint8)  # an exabyte: every allocator refuses it at once
        return self.inner(x)


def out_of_memory(**kw) -> nn.Module:
    """A ViT whose forward asks for an exabyte: a real allocation failure, at any batch."""
    return _AllocatesTooMuch(reference(**kw))


def broken(**kw) -> nn.Module:
    raise ValueError(f"no such model: {kw.get('model_name', '?')}\n(second line of the message)")


def not_a_model(**kw):
    return 42
