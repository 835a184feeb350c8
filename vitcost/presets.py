"""Model names: the ViT size presets and timm-style model names, resolved to architecture fields.

Two kinds of name are understood:

* **Presets** ``vit-ti``, ``vit-s``, ``vit-m``, ``vit-b``, ``vit-l``, ``vit-h``, ``vit-g``, ``vit-G``
  (width, depth, heads and MLP hidden: ViT paper Table 1, AugReg/big_vision, and Zhai et al.
  "Scaling Vision Transformers" Table 2 for g and G). Lookup is
  case-insensitive and takes ``_`` for ``-`` (``VIT_B`` is ``vit-b``), except for the one pair
  that differs only by case: ``vit-g`` (giant, 1408 wide) and ``vit-G`` (gigantic, 1664 wide).
  The paper notation ``vit-b/16`` adds a patch size.
* **timm names** such as ``vit_base_patch16_384``, ``deit_small_distilled_patch16_224`` or
  ``vit_large_patch14_reg4_dinov2`` (case-insensitive, ``-`` accepted for ``_``, a pretrained
  tag after a dot such as ``.augreg_in21k`` ignored). The fields follow timm's model
  definitions:

  - ``distilled``: a distillation token (2 prefix tokens, a second head).
  - ``regN``: N register tokens; timm's register models use ``no_embed_class``, so the
    position embedding covers only the patch grid (``pos_embed_prefix=False``).
  - ``dinov2``: image 518 unless the name says otherwise, no classification head
    (``classes=0``); non-register DINOv2 gives the class token a position; LayerScale on
    both residual branches (two D-vectors per block). DINOv2's *giant* is not ViT-g (it is
    wider and uses a SwiGLU MLP) and is rejected rather than guessed.
  - ``deit3``: DeiT III (``deit3_base_patch16_224``): LayerScale, and no position for the
    class token (``no_embed_class``).
  - ``clip``: the extra pre-norm LayerNorm of timm's CLIP towers is not modelled; the tower
    is treated as the plain ViT of that size.
  - no image size in the name: 224 (518 for DINOv2).

Fields a name does not determine stay ``None`` in :class:`ModelDefaults`, so that
:func:`build_spec` can tell them from values the name fixes. Unknown names raise
:class:`~vitcost.errors.UnknownNameError` with near matches; impossible combinations raise
:class:`~vitcost.errors.ConfigError` (from :func:`~vitcost.specs.make_spec`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from difflib import SequenceMatcher
from functools import lru_cache
from typing import Any, Optional

from vitcost.errors import ConfigError, UnknownNameError
from vitcost.specs import MAX_DIM, ViTSpec, make_spec

# preset key -> (dim, depth, heads, mlp_hidden); see vit-variants.md.
_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "vit-ti": (192, 12, 3, 768),
    "vit-s": (384, 12, 6, 1536),
    "vit-m": (512, 12, 8, 2048),
    "vit-b": (768, 12, 12, 3072),
    "vit-l": (1024, 24, 16, 4096),
    "vit-h": (1280, 32, 16, 5120),
    "vit-g": (1408, 40, 16, 6144),
    "vit-G": (1664, 48, 16, 8192),
}

# timm size word -> preset key.
_SIZE_WORDS: dict[str, str] = {
    "tiny": "vit-ti",
    "small": "vit-s",
    "medium": "vit-m",
    "base": "vit-b",
    "large": "vit-l",
    "huge": "vit-h",
    "giant": "vit-g",
    "gigantic": "vit-G",
}

# Real timm names, offered as suggestions for a mistyped name (each one resolves).
_TIMM_EXAMPLES: tuple[str, ...] = (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_medium_patch16_224",
    "vit_base_patch16_224",
    "vit_base_patch16_384",
    "vit_base_patch32_224",
    "vit_base_patch16_clip_224",
    "vit_large_patch16_224",
    "vit_large_patch14_clip_224",
    "vit_huge_patch14_224",
    "vit_giant_patch14_224",
    "vit_gigantic_patch14_224",
    "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2",
    "vit_large_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_base_patch16_384",
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_384",
    "deit3_small_patch16_224",
    "deit3_base_patch16_224",
    "deit3_large_patch16_384",
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
    "swin_base_patch4_window12_384",
    "swin_large_patch4_window12_384",
)

_PRESET_RE = re.compile(r"(?i:vit)[-_]([A-Za-z]+)(?:/([1-9][0-9]*))?")
_TIMM_RE = re.compile(
    r"(?P<family>vit|deit3|deit)"
    r"_(?P<size>tiny|small|medium|base|large|huge|giant|gigantic)"
    r"(?P<distilled>_distilled)?"
    r"_patch(?P<patch>[1-9][0-9]*)"
    r"(?:_reg(?P<registers>[1-9][0-9]*))?"
    r"(?:_clip(?:_quickgelu)?)?"
    r"(?:_(?P<image>[1-9][0-9]*))?"
    r"(?P<dinov2>_dinov2)?"
)
_DINOV2_IMAGE = 518
# The image and patch sizes timm publishes plain ViT/DeiT weights at: a name with another
# trailing number is far more likely a typo (vit_base_patch16_38 for _384) than a model.
TIMM_IMAGE_SIZES = (160, 192, 224, 240, 256, 280, 288, 320, 336, 378, 384, 392, 448, 512, 518, 560, 1024)
TIMM_PATCH_SIZES = (8, 14, 16, 32)
_DEFAULT_PATCH = 16
_DEFAULT_IMAGE = 224
_DEFAULT_MLP_RATIO = 4  # timm's default: MLP hidden = 4 * dim
_HINT = (
    "use a preset (" + ", ".join(_PRESETS) + "; swin-t, swin-s, swin-b, swin-l) or a timm name such as "
    "vit_base_patch16_224"
)


@dataclass(frozen=True)
class ModelDefaults:
    """What a model name fixes; ``None`` where the name says nothing."""

    name: str
    dim: int
    depth: int
    heads: int
    mlp_hidden: int
    patch: Optional[int] = None
    image: Optional[int] = None
    class_token: Optional[bool] = None
    dist_token: Optional[bool] = None
    registers: Optional[int] = None
    pos_embed_prefix: Optional[bool] = None
    classes: Optional[int] = None
    layer_scale: Optional[bool] = None
    mlp: Optional[str] = None
    impl: Optional[str] = None
    pooling: Optional[str] = None
    pos_embed: Optional[str] = None
    swin: Optional[dict] = None

    def spec_fields(self) -> dict[str, Any]:
        """The non-None fields, keyed by :class:`~vitcost.specs.ViTSpec` field names."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "image":
                out["image_h"] = out["image_w"] = value
            else:
                out[f.name] = value
        return out


# Swin (Liu et al. 2021, Table 1; timm's and Hugging Face's configs): embed dim, blocks and
# heads per stage. Patch 4, window 7 at 224 (12 for timm's *_window12_384), MLP ratio 4.
_SWIN: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "swin-t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin-s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin-b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin-l": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
_SWIN_WORDS = {"tiny": "swin-t", "small": "swin-s", "base": "swin-b", "large": "swin-l"}
# timm's names and Hugging Face's hub names (microsoft/swin-tiny-patch4-window7-224) alike
_SWIN_RE = re.compile(r"(?:microsoft/)?swin_(?P<size>tiny|small|base|large)_patch4_window(?P<window>[1-9][0-9]*)"
                      r"(?:_(?P<image>[1-9][0-9]*))?")


def _swin(name: str, key: str, window: int = 7, image: int = 224) -> ModelDefaults:
    dim, depths, heads = _SWIN[key]
    return ModelDefaults(name, dim, sum(depths), heads[0], 4 * dim, patch=4, image=image, class_token=False,
                         dist_token=False, registers=0, impl="hf", pooling="avg", pos_embed="none",
                         swin={"depths": depths, "heads": heads, "window": window})


def preset_names() -> list[str]:
    """The ViT preset keys, smallest to largest (the Swins are ``swin_names()``)."""
    return list(_PRESETS)


def swin_names() -> list[str]:
    """The Swin preset keys, smallest to largest."""
    return list(_SWIN)


def known_names() -> list[str]:
    """Every name ``vitcost models`` lists: the presets, then the published timm names."""
    return preset_names() + swin_names() + list(_TIMM_EXAMPLES)


@lru_cache(maxsize=512)
def resolve_model(name: str) -> ModelDefaults:
    """Resolve a preset or timm-style name; raises :class:`UnknownNameError` with suggestions."""
    text = name.strip()
    if text.lower().replace("_", "-") in _SWIN:
        return _swin(text.lower().replace("_", "-"), text.lower().replace("_", "-"))
    swin = _SWIN_RE.fullmatch(text.split(".", 1)[0].lower().replace("-", "_"))
    if swin is not None:
        return _swin(text, _SWIN_WORDS[swin["size"]], int(swin["window"]), int(swin["image"] or 224))
    preset = _resolve_preset(text)
    if preset is not None:
        return preset
    timm = _resolve_timm(text)
    if timm is not None:
        return timm
    if text.lower().startswith("eva"):
        raise UnknownNameError(f"unknown model {name!r}: EVA and EVA-02 (rotary position embedding, SwiGLU, "
                               "their own attention) are not modelled yet")
    raise UnknownNameError(f"unknown model {name!r}{_suggestion(text)} ({_HINT})")


MAX_MLP_RATIO = 64  # the widest MLP of any published ViT is under 8 x D


def build_spec(model: Optional[str] = "vit-b", *, overrides: Optional[dict[str, Any]] = None) -> ViTSpec:
    """A :class:`ViTSpec` from a model name, then ``overrides`` (explicit user values) on top.

    ``overrides`` are keyed by ViTSpec field names; ``None`` values are ignored. Also accepted:
    ``mlp_ratio`` (MLP hidden = int(dim * ratio), with the final dim) and ``image`` (both
    ``image_h`` and ``image_w``, unless those are given). When ``dim`` is overridden but the
    MLP is not, the model's MLP ratio is kept (vit-b at dim 1024 gets mlp_hidden 4096).
    Patch 16 and image 224 when neither the model nor the overrides say. ``model=None``
    builds a custom model (named "custom") and needs ``dim``, ``depth`` and ``heads``; its
    MLP hidden defaults to 4 * dim. Raises :class:`ConfigError` for impossible combinations.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    window = given.pop("window", None)
    mlp_ratio = given.pop("mlp_ratio", None)
    image = given.pop("image", None)
    if image is not None:
        given.setdefault("image_h", image)
        given.setdefault("image_w", image)
    if mlp_ratio is not None and "mlp_hidden" in given:
        raise ConfigError("give --mlp-ratio or --mlp-hidden, not both")
    if mlp_ratio is not None and not (isinstance(mlp_ratio, (int, float)) and 0 < mlp_ratio <= MAX_MLP_RATIO):
        raise ConfigError(f"--mlp-ratio must be greater than 0 and at most {MAX_MLP_RATIO}, got {mlp_ratio}")

    if model is None:
        missing = [k for k in ("dim", "depth", "heads") if k not in given]
        if missing:
            flags = ", ".join("--" + k for k in missing)
            raise ConfigError(f"a custom model needs {flags}; or name a model (e.g. vit-b)")
        base: dict[str, Any] = {"name": "custom"}
        mlp_hidden = _DEFAULT_MLP_RATIO * given["dim"]
    else:
        defaults = resolve_model(model)
        base = defaults.spec_fields()
        mlp_hidden = None
        if "dim" in given and isinstance(given["dim"], int) and given["dim"] != defaults.dim:
            mlp_hidden = given["dim"] * defaults.mlp_hidden // defaults.dim

    spec = {**base, **given}
    if window is not None:
        if not isinstance(spec.get("swin"), dict):
            raise ConfigError(f"--window {window}: only a Swin model (swin-t, swin_base_patch4_window12_384, ...) "
                              "has attention windows")
        spec["swin"] = {**spec["swin"], "window": window}
    sw = spec.get("swin")
    if isinstance(sw, dict) and "swin" in given:  # stages given: the depth, first heads and MLP follow them
        try:
            spec.setdefault("depth", 0)
            if "depth" not in given:
                spec["depth"] = sum(int(x) for x in sw["depths"])
            if "heads" not in given:
                spec["heads"] = int(sw["heads"][0])
            if "mlp_hidden" not in given and mlp_ratio is None and isinstance(spec.get("dim"), int):
                spec["mlp_hidden"] = int(float(sw.get("mlp_ratio", 4.0)) * spec["dim"])
        except (KeyError, TypeError, ValueError, IndexError):
            pass  # (the spec's validation says what is wrong)
    if mlp_ratio is not None and isinstance(spec.get("dim"), int) and 0 < spec["dim"] <= MAX_DIM:
        spec["mlp_hidden"] = max(1, int(spec["dim"] * mlp_ratio))
    elif "mlp_hidden" not in given and mlp_hidden is not None:
        spec["mlp_hidden"] = mlp_hidden
    spec.setdefault("patch", _DEFAULT_PATCH)
    spec.setdefault("image_h", _DEFAULT_IMAGE)
    spec.setdefault("image_w", _DEFAULT_IMAGE)
    return make_spec(**spec)


def _resolve_preset(text: str) -> Optional[ModelDefaults]:
    match = _PRESET_RE.fullmatch(text)
    if match is None:
        return None
    size = match[1] if match[1] in ("g", "G") else match[1].lower()
    key = f"vit-{size}"
    if key not in _PRESETS:
        return None
    dim, depth, heads, mlp_hidden = _PRESETS[key]
    patch = int(match[2]) if match[2] else None
    name = f"{key}/{patch}" if patch else key
    return ModelDefaults(name, dim, depth, heads, mlp_hidden, patch=patch)


def _resolve_timm(text: str) -> Optional[ModelDefaults]:
    arch = text.split(".", 1)[0].lower().replace("-", "_")
    match = _TIMM_RE.fullmatch(arch)
    if match is None:
        return None
    dinov2 = match["dinov2"] is not None
    deit3 = match["family"] == "deit3"
    giant = dinov2 and match["size"] == "giant"  # not ViT-g: wider, with a SwiGLU MLP
    for what, value, known in (("image", match["image"], TIMM_IMAGE_SIZES), ("patch", match["patch"], TIMM_PATCH_SIZES)):
        if value and int(value) not in known:
            raise UnknownNameError(
                f"unknown model {text!r}: timm publishes no ViT with {what} {value}"
                f" ({', '.join(map(str, known))}){_suggestion(text)} (for another size, name the model "
                f"at a published one and pass --{what} {value})")
    dim, depth, heads, mlp_hidden = _PRESETS[_SIZE_WORDS[match["size"]]]
    if giant:  # 1536 wide, 40 blocks of 24 heads; SwiGLU at two thirds of 4 x 1536, rounded to 8
        dim, depth, heads, mlp_hidden = 1536, 40, 24, 4096
    registers = int(match["registers"] or 0)
    if match["image"]:
        image = int(match["image"])
    else:
        image = _DINOV2_IMAGE if dinov2 else _DEFAULT_IMAGE
    return ModelDefaults(
        name=text,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_hidden=mlp_hidden,
        patch=int(match["patch"]),
        image=image,
        class_token=True,
        dist_token=match["distilled"] is not None,
        registers=registers,
        # timm's register models and DeiT III set no_embed_class: no position for the prefix
        pos_embed_prefix=registers == 0 and not deit3,
        classes=0 if dinov2 else None,
        layer_scale=True if dinov2 or deit3 else None,  # init_values: LayerScale on both branches
        mlp="swiglu" if giant else None,
    )


def _suggestion(text: str) -> str:
    """'; did you mean ...?' for up to three near names, or '' when none is near."""
    as_preset = text.replace("_", "-")
    as_timm = text.lower().replace("-", "_")
    scored = [(SequenceMatcher(None, as_preset, k).ratio(), k) for k in (*_PRESETS, *_SWIN)]
    scored += [(SequenceMatcher(None, as_timm, k).ratio(), k) for k in _TIMM_EXAMPLES]
    close = [k for score, k in sorted(scored, key=lambda s: -s[0]) if score >= 0.6][:3]
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
