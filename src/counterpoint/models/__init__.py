"""Model towers and the two-tower contrastive model."""

from counterpoint.models.presets import MODEL_PRESETS, ModelSpec, build_model, create_model, resolve_spec
from counterpoint.models.two_tower import TwoTower

__all__ = ["MODEL_PRESETS", "ModelSpec", "TwoTower", "build_model", "create_model", "resolve_spec"]
