"""The built-in pretraining tasks: importing this module registers them in ``objectives.base.TASKS``."""

from counterpoint.objectives import brivl, contrastive  # noqa: F401  (brivl; clip, siglip, margin)
