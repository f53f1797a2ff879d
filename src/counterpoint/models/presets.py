"""Named model configurations, from ``tiny-*`` (CPU tests, seconds) to ``vit-b-16`` (the CLIP paper's
ViT-B/16 with a 12-layer text tower). ``create_model`` builds a :class:`TwoTower` from one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from counterpoint.config import ConfigError, from_dict
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

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        """A spec saved in a checkpoint, every field type-checked (raises :class:`ConfigError`)."""
        spec = from_dict(cls, data, prefix="model_spec.")
        check_spec(spec)
        return spec


def check_spec(spec: ModelSpec, name: str = "the model") -> None:
    """Value checks a spec must pass before a model is built; :class:`ConfigError` names the setting.

    ``model.*`` settings a recipe can override (``embed_dim``, ``image_size``, ``context_length``,
    ``vocab_size``) are named as such; the rest are preset fields.
    """
    positive = {"model.embed_dim": spec.embed_dim, "model.image_size": spec.image_size,
                "model.vocab_size": spec.vocab_size, "text_width": spec.text_width, "text_layers": spec.text_layers,
                "text_heads": spec.text_heads}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if spec.embed_dim < 2:
        raise ConfigError(f"model.embed_dim must be >= 2 (unit vectors of 1 dimension are only +1 or -1), "
                          f"got {spec.embed_dim}")
    if spec.context_length < 3:
        raise ConfigError(f"model.context_length must be >= 3 (<sot>, at least one token, <eot>), "
                          f"got {spec.context_length}")
    if spec.text_width % spec.text_heads:
        raise ConfigError(f"text_width {spec.text_width} of {name} is not divisible by text_heads {spec.text_heads}")
    if spec.image_tower == "vit":
        if min(spec.patch_size, spec.vision_width, spec.vision_layers, spec.vision_heads) < 1:
            raise ConfigError(f"the ViT fields of {name} must be >= 1")
        if spec.image_size % spec.patch_size:
            raise ConfigError(f"model.image_size={spec.image_size} must be a multiple of the patch size "
                              f"{spec.patch_size} of {name}")
        if spec.vision_width % spec.vision_heads:
            raise ConfigError(f"vision_width {spec.vision_width} of {name} is not divisible by vision_heads "
                              f"{spec.vision_heads}")
    elif spec.image_tower == "cnn":
        if (not spec.cnn_widths or len(spec.cnn_widths) != len(spec.cnn_depths)
                or min(spec.cnn_widths + spec.cnn_depths) < 1 or spec.cnn_stem_stride < 1):
            raise ConfigError(f"cnn_widths / cnn_depths / cnn_stem_stride of {name} are malformed")
        smallest = spec.cnn_stem_stride * 2 ** (len(spec.cnn_widths) - 1)
        if spec.image_size % spec.cnn_stem_stride or spec.image_size < smallest:
            raise ConfigError(f"model.image_size={spec.image_size} must be a multiple of the stem stride "
                              f"{spec.cnn_stem_stride} of {name} and at least {smallest}")
    else:
        raise ConfigError(f"unknown image_tower {spec.image_tower!r}; use 'vit' or 'cnn'")


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
    spec = dataclasses.replace(MODEL_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    check_spec(spec, name)
    return spec


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
