"""The built-in pretraining tasks: importing this module registers them in ``objectives.base.TASKS``."""

from counterpoint.objectives import blip, brivl, contrastive, lcl  # noqa: F401  (clip, siglip, margin; brivl; lcl; blip)
