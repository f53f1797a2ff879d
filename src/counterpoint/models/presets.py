"""Named model configurations, from ``tiny-*`` (CPU tests, seconds) to ``vit-b-16`` (the CLIP paper's
ViT-B/16 with a 12-layer text tower). ``create_model`` builds a :class:`TwoTower` from one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from counterpoint.errors import UserError
from counterpoint.models.cnn import ResNetTower
from counterpoint.models.text import TextTransformer
from counterpoint.models.two_tower import TwoTower
from counterpoint.models.vit import VisionTransformer


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; saved as JSON inside every checkpoint."""

    image_tower: str  # "vit" | "cnn"
    image_size: int
    embed_dim: int
    # ViT
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_pool: str = "cls"
    # CNN
    cnn_widths: tuple[int, ...] = (64, 128, 256)
    cnn_depths: tuple[int, ...] = (1, 1, 1)
    cnn_stem_stride: int = 1
    # Text
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_pool: str = "eot"


MODEL_PRESETS: dict[str, ModelSpec] = {
    "tiny-cnn": ModelSpec("cnn", 32, 128, cnn_widths=(32, 64, 128), cnn_depths=(1, 1, 1), cnn_stem_stride=2,
                          vocab_size=1024,
                          context_length=32, text_width=128, text_layers=2, text_heads=4),
    "tiny-vit": ModelSpec("vit", 32, 128, patch_size=4, vision_width=128, vision_layers=4, vision_heads=4,
                          vocab_size=1024, context_length=32, text_width=128, text_layers=2, text_heads=4),
    "small-cnn": ModelSpec("cnn", 32, 256, cnn_widths=(64, 128, 256), cnn_depths=(2, 2, 2), vocab_size=2048,
                           context_length=32, text_width=256, text_layers=4, text_heads=4),
    "small-vit": ModelSpec("vit", 64, 256, patch_size=8, vision_width=384, vision_layers=6, vision_heads=6,
                           vocab_size=2048, context_length=32, text_width=256, text_layers=4, text_heads=4),
    "vit-b-32": ModelSpec("vit", 224, 512, patch_size=32),
    "vit-b-16": ModelSpec("vit", 224, 512, patch_size=16),
}


def resolve_spec(name: str, **overrides: object) -> ModelSpec:
    """The preset ``name`` with ``overrides`` (fields left ``None`` keep the preset value)."""
    if name not in MODEL_PRESETS:
        raise UserError(f"unknown model '{name}'; choose one of {', '.join(MODEL_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = set(overrides) - fields
    if unknown:
        raise UserError(f"unknown model field(s) {sorted(unknown)}; valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(MODEL_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def build_model(spec: ModelSpec, init_temperature: float = 0.07, init_logit_bias: float | None = None,
                pad_id: int = 0, eot_id: int = 2) -> TwoTower:
    if spec.image_tower == "vit":
        visual = VisionTransformer(spec.image_size, spec.patch_size, spec.vision_width, spec.vision_layers,
                                   spec.vision_heads, spec.embed_dim, pool=spec.vision_pool)
    elif spec.image_tower == "cnn":
        visual = ResNetTower(tuple(spec.cnn_widths), tuple(spec.cnn_depths), spec.embed_dim, spec.image_size,
                             stem_stride=spec.cnn_stem_stride)
    else:
        raise UserError(f"unknown image_tower '{spec.image_tower}'; use 'vit' or 'cnn'")
    text = TextTransformer(spec.vocab_size, spec.context_length, spec.text_width, spec.text_layers,
                           spec.text_heads, spec.embed_dim, pool=spec.text_pool, pad_id=pad_id, eot_id=eot_id)
    return TwoTower(visual, text, init_temperature, init_logit_bias)


def create_model(name: str, init_temperature: float = 0.07, init_logit_bias: float | None = None,
                 **overrides: object) -> TwoTower:
    """Build the preset ``name`` (see ``MODEL_PRESETS``), e.g. ``create_model("tiny-vit", embed_dim=64)``.
    For SigLIP pass ``init_temperature=0.1, init_logit_bias=-10.0`` (the paper's initialisation)."""
    return build_model(resolve_spec(name, **overrides), init_temperature, init_logit_bias)
