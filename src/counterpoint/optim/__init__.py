"""Gradient combiners and min-norm solvers for balanced multimodal learning (METHODS.md section 2)."""

from counterpoint.optim.combiners import (
    COMBINERS,
    MGDA,
    OGMGE,
    GradientCombiner,
    Joint,
    MMPareto,
    PCGrad,
    Uniform,
    Unimodal,
    build_combiner,
)
from counterpoint.optim.min_norm import min_norm_simplex, min_norm_two, min_norm_two_gram

__all__ = [
    "COMBINERS",
    "MGDA",
    "OGMGE",
    "GradientCombiner",
    "Joint",
    "MMPareto",
    "PCGrad",
    "Uniform",
    "Unimodal",
    "build_combiner",
    "min_norm_simplex",
    "min_norm_two",
    "min_norm_two_gram",
]
