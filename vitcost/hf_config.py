"""``--hf-config``: a Hugging Face ``config.json`` (what ``config.save_pretrained()`` writes)
as vitcost's architecture, run by Hugging Face's code (``impl: hf``).

The ``architectures`` field picks the model class, and with it the head: ViT and DeiT
(distilled) classifiers, DINOv2 with and without registers (classifier or backbone).
Every key read is checked: a missing key or a value of the wrong kind is a one-line
:class:`~vitcost.errors.ConfigError` naming the file and the key. Pure: no torch, no
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from vitcost.errors import ConfigError, shorten
from vitcost.files import load_json, read_text
from vitcost.specs import MAX_CLASSES, MAX_DEPTH, MAX_DIM, MAX_MLP_HIDDEN, MAX_PIXELS, MAX_STAGES, MAX_TOKENS_EXTRA

# architecture -> (family, has a classification head)
ARCHITECTURES = {
    "ViTForImageClassification": ("vit", True),
    "DeiTForImageClassificationWithTeacher": ("deit", True),
    "Dinov2ForImageClassification": ("dinov2", True),
    "Dinov2Model": ("dinov2", False),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", True),
    "Dinov2WithRegistersModel": ("dinov2_with_registers", False),
    "ViTMAEForPreTraining": ("vit_mae", False),
    "VideoMAEForVideoClassification": ("videomae", True),
    "SwinForImageClassification": ("swin", True),
}
# classes that exist but whose code vitcost does not model, and why
NOT_MODELLED = {
    "ViTModel": "its pooler (a dense layer and tanh on the class token) is not modelled; "
                "use ViTForImageClassification, or Dinov2Model for a backbone",
    "DeiTModel": "its pooler is not modelled; use DeiTForImageClassificationWithTeacher",
    "DeiTForImageClassification": "its single head beside a distillation token is not modelled; "
                                  "use DeiTForImageClassificationWithTeacher",
    "ViTMAEModel": "its random masking without the decoder is not modelled; use ViTMAEForPreTraining",
    "VideoMAEForPreTraining": "VideoMAE pretraining is not modelled yet; use VideoMAEForVideoClassification",
    "VideoMAEModel": "VideoMAE's backbone is not modelled yet; use VideoMAEForVideoClassification",
    "SwinModel": "Swin's backbone alone is not modelled yet; use SwinForImageClassification",
    "SwinForMaskedImageModeling": "SimMIM pretraining is not modelled; use SwinForImageClassification",
    "SwinBackbone": "Swin's feature maps for detection are not modelled; use SwinForImageClassification",
    "Swinv2ForImageClassification": "Swin V2 (scaled cosine attention, a continuous bias MLP) is not modelled yet; "
                                    "use SwinForImageClassification",
}
_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate")
_HF_DEFAULT_LABELS = 2  # PretrainedConfig's num_labels when a config names none


@dataclass(frozen=True)
class HFModel:
    """What a config file says: the architecture class, ``plan``'s model options, notes."""

    architecture: str
    arch: dict[str, Any]  # make_model_spec's keyword arguments (image as (h, w), patch)
    notes: tuple[str, ...]


def read_hf_config(path: Union[str, Path]) -> HFModel:
    where = f"--hf-config {path}"
    data = load_json(read_text(path, ConfigError, where + ": "), where, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object (a config.json), got {type(data).__name__}")
    return parse_hf_config(data, where)


def parse_hf_config(data: dict, where: str) -> HFModel:
    get = _Reader(data, where)
    archs = get.value("architectures", list)
    if not archs or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: 'architectures' should name the model class, e.g. [\"ViTForImageClassification\"]")
    name = archs[0]
    if name in NOT_MODELLED:
        raise ConfigError(f"{where}: architectures {name}: {NOT_MODELLED[name]}")
    if name not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise ConfigError(f"{where}: architectures {shorten(name, quote=True)} is not one vitcost models ({known})")
    family, head = ARCHITECTURES[name]
    if family == "swin":
        return _swin(get, name, where)
    dim = get.int("hidden_size", MAX_DIM)
    heads = get.int("num_attention_heads", MAX_DIM)
    arch: dict[str, Any] = {
        "dim": dim,
        "depth": get.int("num_hidden_layers", MAX_DEPTH),
        "heads": heads,
        "channels": get.int("num_channels", 1024),
        "qkv_bias": get.bool("qv_bias" if family == "videomae" else "qkv_bias"),
        "impl": "hf",
        "image": _pair(get, "image_size"),
        "patch": _patch(get),
        "classes": _classes(get) if head else 0,  # (MAE: no head, its own loss)
        "pos_embed": "learned",
        "pos_embed_prefix": True,
        "class_token": True,
    }  # (VideoMAE's are set below)
    _gelu(get)
    if family == "videomae":
        if not get.bool("use_mean_pooling", default=True):
            raise ConfigError(f"{where}: use_mean_pooling false: VideoMAE's head on the first token is not modelled")
        arch.update(class_token=False, pos_embed="sincos", pooling="avg", frames=get.int("num_frames", 4096),
                    tubelet=get.int("tubelet_size", 4096))
        if arch["frames"] < arch["tubelet"]:
            raise ConfigError(f"{where}: num_frames {arch['frames']} is fewer than tubelet_size {arch['tubelet']}")
    if family in ("vit", "deit", "vit_mae", "videomae"):
        arch["mlp_hidden"] = get.int("intermediate_size", MAX_MLP_HIDDEN)
        arch["dist_token"] = family == "deit"
    if family == "vit_mae":
        ratio = get.value("mask_ratio", (int, float))
        if isinstance(ratio, bool) or not 0 < ratio < 1:
            raise ConfigError(f"{where}: mask_ratio {ratio!r}: expected a number between 0 and 1")
        arch["mae"] = {"norm_pix_loss": get.bool("norm_pix_loss", default=False), "mask_ratio": float(ratio),
                       "decoder_dim": get.int("decoder_hidden_size", MAX_DIM),
                       "decoder_depth": get.int("decoder_num_hidden_layers", MAX_DEPTH),
                       "decoder_heads": get.int("decoder_num_attention_heads", MAX_DIM),
                       "decoder_mlp_hidden": get.int("decoder_intermediate_size", MAX_MLP_HIDDEN)}
    if family.startswith("dinov2"):
        ratio = get.value("mlp_ratio", (int, float))
        if isinstance(ratio, bool) or not 0 < ratio <= 64:
            raise ConfigError(f"{where}: mlp_ratio {ratio!r}: expected a number above 0 and at most 64")
        if get.bool("use_swiglu_ffn", default=False):
            arch["mlp"] = "swiglu"
            arch["mlp_hidden"] = swiglu_hidden(dim, ratio)
        else:
            arch["mlp_hidden"] = int(dim * ratio)  # as Dinov2MLP sizes fc1
        arch["layer_scale"] = True
        arch["pooling"] = "token+avg"  # Dinov2ForImageClassification's head (and the one assumed to train a backbone)
        if family == "dinov2":
            arch["mask_token"] = get.bool("use_mask_token", default=True)
        else:
            arch["mask_token"] = True
            arch["registers"] = get.int("num_register_tokens", MAX_TOKENS_EXTRA, minimum=0)
    return HFModel(architecture=name, arch=arch, notes=_dropout_notes(get))


def _gelu(get: "_Reader") -> None:
    act = get.value("hidden_act", str)
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"{get.where}: hidden_act {shorten(act, quote=True)}: vitcost models a GELU MLP")


def _dropout_notes(get: "_Reader") -> tuple[str, ...]:
    dropout = [k for k in _DROPOUT_KEYS if k in get.data and _positive(get.data[k])]
    if not dropout:
        return ()
    return (f"{', '.join(dropout)} above 0 in {get.where.split(' ', 1)[1]}: the dropout masks a training step keeps "
            "are not modelled (memory is planned as at 0)",)


def _swin(get: "_Reader", name: str, where: str) -> HFModel:
    """``SwinConfig``: embed_dim, depths and num_heads per stage, window_size, mlp_ratio."""
    depths, heads = get.value("depths", list), get.value("num_heads", list)
    for key, value in (("depths", depths), ("num_heads", heads)):
        if not value or len(value) > MAX_STAGES or not all(type(v) is int and 0 < v <= MAX_DEPTH for v in value):
            raise ConfigError(f"{where}: {key}: expected 1 to {MAX_STAGES} whole numbers from 1 to {MAX_DEPTH}, "
                              f"got {shorten(json_repr(value))}")
    ratio = get.value("mlp_ratio", (int, float))
    if isinstance(ratio, bool) or not 0 < ratio <= 64:
        raise ConfigError(f"{where}: mlp_ratio {ratio!r}: expected a number above 0 and at most 64")
    _gelu(get)
    if get.bool("use_absolute_embeddings", default=False):
        raise ConfigError(f"{where}: use_absolute_embeddings true: Swin's absolute position table is not modelled")
    dim = get.int("embed_dim", MAX_DIM)
    arch = {"dim": dim, "depth": sum(depths), "heads": heads[0], "mlp_hidden": int(ratio * dim),
            "channels": get.int("num_channels", 1024), "qkv_bias": get.bool("qkv_bias"), "impl": "hf",
            "image": _pair(get, "image_size"), "patch": _patch(get), "classes": _classes(get),
            "pos_embed": "none", "class_token": False, "pooling": "avg",
            "swin": {"depths": tuple(depths), "heads": tuple(heads), "window": get.int("window_size", MAX_PIXELS),
                     "mlp_ratio": float(ratio)}}
    return HFModel(architecture=name, arch=arch, notes=_dropout_notes(get))


def swiglu_hidden(dim: int, ratio: float) -> int:
    """Dinov2SwiGLUFFN's hidden width: two thirds of ``dim * ratio``, rounded up to 8."""
    return (int(int(dim * ratio) * 2 / 3) + 7) // 8 * 8


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _classes(get: "_Reader") -> int:
    labels = get.data.get("id2label")
    if labels is not None:
        if not isinstance(labels, dict) or not labels:
            raise ConfigError(f"{get.where}: id2label: expected a mapping of class ids to names")
        if len(labels) > MAX_CLASSES:
            raise ConfigError(f"{get.where}: id2label: more than {MAX_CLASSES} classes")
        return len(labels)
    if "num_labels" in get.data:
        return get.int("num_labels", MAX_CLASSES)
    return _HF_DEFAULT_LABELS


def _pair(get: "_Reader", key: str) -> tuple[int, int]:
    value = get.value(key, (int, list))
    if isinstance(value, list):
        if len(value) != 2 or not all(type(v) is int and 0 < v <= MAX_PIXELS for v in value):
            raise ConfigError(f"{get.where}: {key}: expected a size or [height, width], got {shorten(str(value))}")
        return value[0], value[1]
    return (get.int(key, MAX_PIXELS),) * 2


def _patch(get: "_Reader") -> int:
    h, w = _pair(get, "patch_size")
    if h != w:
        raise ConfigError(f"{get.where}: patch_size {h}x{w}: vitcost models square patches")
    return h


class _Reader:
    """Typed reads of a config's keys; a missing or mistyped key is a one-line error."""

    def __init__(self, data: dict, where: str) -> None:
        self.data = data
        self.where = where

    def value(self, key: str, kind):
        if key not in self.data:
            raise ConfigError(f"{self.where}: missing key '{key}'")
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            raise ConfigError(f"{self.where}: {key}: expected {names}, got {shorten(json_repr(value))}")
        return value

    def int(self, key: str, maximum: int, minimum: int = 1) -> int:
        value = self.value(key, int)
        if not minimum <= value <= maximum:
            raise ConfigError(f"{self.where}: {key} {value}: expected {minimum} to {maximum}")
        return value

    def bool(self, key: str, default: bool | None = None) -> bool:
        if default is not None and key not in self.data:
            return default
        return self.value(key, bool)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "true or false"}


def json_repr(value: Any) -> str:
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
