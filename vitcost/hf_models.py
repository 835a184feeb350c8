"""Hugging Face models for a spec (``impl: hf``), built from a config with random weights,
to measure what their code allocates. Needs torch and transformers (the ``test`` extra);
``plan`` never imports this.
"""

from __future__ import annotations

from vitcost.errors import MeasurementError
from vitcost.specs import Pooling, ViTSpec


def hf_config(spec: ViTSpec, attention: str = "sdpa"):
    """The ``transformers`` config of the model class ``spec`` describes, and that class."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - the test extra installs it
        raise MeasurementError("measuring a Hugging Face model needs transformers: "
                               "pip install -e '.[test]'") from None
    if spec.swin is not None:
        sw = spec.swin
        cfg = transformers.SwinConfig(
            image_size=[spec.image_h, spec.image_w], patch_size=spec.patch, num_channels=spec.channels,
            embed_dim=spec.dim, depths=list(sw.depths), num_heads=list(sw.heads), window_size=sw.window,
            mlp_ratio=sw.mlp_ratio, qkv_bias=spec.qkv_bias, num_labels=max(spec.classes, 1),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
            use_absolute_embeddings=False)
        cfg._attn_implementation = "sdpa" if attention == "sdpa" else "eager"
        cfg.architectures = ["SwinForImageClassification"]
        return cfg, transformers.SwinForImageClassification
    if not spec.video and (spec.pos_embed.value != "learned" or not spec.class_token or not spec.pos_embed_prefix):
        raise MeasurementError("Hugging Face's ViT, DeiT and DINOv2 have a class token and a learned "
                               "position embedding on it")
    if spec.video:
        cfg = transformers.VideoMAEConfig(
            hidden_size=spec.dim, num_hidden_layers=spec.depth, num_attention_heads=spec.heads,
            intermediate_size=spec.mlp_hidden, image_size=spec.image_h, patch_size=spec.patch,
            num_channels=spec.channels, num_frames=spec.frames, tubelet_size=spec.tubelet, qv_bias=spec.qkv_bias,
            num_labels=max(spec.classes, 1), use_mean_pooling=True, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
        if spec.image_h != spec.image_w:
            raise MeasurementError("Hugging Face's VideoMAE takes square frames")
        cfg._attn_implementation = "sdpa" if attention == "sdpa" else "eager"
        cfg.architectures = ["VideoMAEForVideoClassification"]
        return cfg, transformers.VideoMAEForVideoClassification
    if spec.mae is not None:
        m = spec.mae
        cfg = transformers.ViTMAEConfig(
            hidden_size=spec.dim, num_hidden_layers=spec.depth, num_attention_heads=spec.heads,
            intermediate_size=spec.mlp_hidden, image_size=[spec.image_h, spec.image_w], patch_size=spec.patch,
            num_channels=spec.channels, qkv_bias=spec.qkv_bias, mask_ratio=m.mask_ratio,
            decoder_hidden_size=m.decoder_dim, decoder_num_hidden_layers=m.decoder_depth,
            decoder_num_attention_heads=m.decoder_heads, decoder_intermediate_size=m.decoder_mlp_hidden,
            norm_pix_loss=m.norm_pix_loss, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cfg._attn_implementation = "sdpa" if attention == "sdpa" else "eager"
        cfg.architectures = ["ViTMAEForPreTraining"]
        return cfg, transformers.ViTMAEForPreTraining
    # (a DINOv2 or ViT built for another image: its square grid, interpolated to the image's)
    built_for = [spec.pos_grid * spec.patch] * 2 if spec.pos_grid else [spec.image_h, spec.image_w]
    common = dict(hidden_size=spec.dim, num_hidden_layers=spec.depth, num_attention_heads=spec.heads,
                  image_size=built_for, patch_size=spec.patch, num_channels=spec.channels,
                  qkv_bias=spec.qkv_bias, num_labels=max(spec.classes, 1),
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if spec.layer_scale:  # DINOv2
        if spec.dist_token or spec.pooling != Pooling.token_avg:
            raise MeasurementError("DINOv2 (LayerScale under --impl hf) has no distillation token and its "
                                   "head reads the class token and the patch tokens' mean (--pool token+avg)")
        common.update(mlp_ratio=_mlp_ratio(spec), drop_path_rate=0.0, use_swiglu_ffn=spec.mlp.value == "swiglu")
        if spec.registers:
            if not spec.mask_token:
                raise MeasurementError("Hugging Face's DINOv2 with registers always has a mask token")
            cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=spec.registers, **common)
            cls = (transformers.Dinov2WithRegistersForImageClassification if spec.classes
                   else transformers.Dinov2WithRegistersModel)
        else:
            cfg = transformers.Dinov2Config(use_mask_token=spec.mask_token, **common)
            cls = transformers.Dinov2ForImageClassification if spec.classes else transformers.Dinov2Model
    else:
        if spec.registers or spec.mask_token or spec.pooling != Pooling.token or not spec.classes:
            raise MeasurementError("Hugging Face's ViT and DeiT classifiers have no registers or mask token, "
                                   "and a head on the class token")
        common["intermediate_size"] = spec.mlp_hidden
        if spec.dist_token:
            cfg = transformers.DeiTConfig(**common)
            cls = transformers.DeiTForImageClassificationWithTeacher
        else:
            cfg = transformers.ViTConfig(**common)
            cls = transformers.ViTForImageClassification
    cfg._attn_implementation = "sdpa" if attention == "sdpa" else "eager"
    cfg.architectures = [cls.__name__]
    return cfg, cls


def _mlp_ratio(spec: ViTSpec) -> int:
    """The whole ``mlp_ratio`` Hugging Face's DINOv2 config takes for the spec's MLP width."""
    from vitcost.hf_config import swiglu_hidden

    for ratio in range(1, 65):
        width = swiglu_hidden(spec.dim, ratio) if spec.mlp.value == "swiglu" else spec.dim * ratio
        if width == spec.mlp_hidden:
            return ratio
    raise MeasurementError(f"no whole mlp_ratio gives Hugging Face's DINOv2 an MLP {spec.mlp_hidden} wide at "
                           f"width {spec.dim}")


def build_hf(spec: ViTSpec, attention: str = "sdpa", checkpointing: str = "none"):
    """The Hugging Face model ``spec`` describes (random weights); ``eager-postscale`` is
    what Hugging Face's eager attention is, so ``eager`` and it build the same model."""
    cfg, cls = hf_config(spec, attention)
    model = cls(cfg)
    if spec.pos_grid and not spec.layer_scale:
        # Hugging Face's ViT built for another image interpolates its table only when asked
        import functools

        model.forward = functools.partial(model.forward, interpolate_pos_encoding=True)
    if checkpointing == "full":
        model.activation_checkpointing_enable()  # non-reentrant, as gradient_checkpointing_enable
    return model
