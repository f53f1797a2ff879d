"""The built-in pretraining tasks: importing this module registers them in ``objectives.base.TASKS``."""

from counterpoint.objectives import contrastive  # noqa: F401  (clip, siglip, margin)
