"""The built-in pretraining tasks: importing this module registers them in ``objectives.base.TASKS``."""

from counterpoint.objectives import brivl, contrastive, lcl  # noqa: F401  (brivl; clip, siglip, margin; lcl)
