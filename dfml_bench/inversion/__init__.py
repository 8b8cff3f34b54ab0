"""Model inversion: losses that synthesise pseudo images from a teacher's weights alone."""

from dfml_bench.inversion.deepinversion import (
    BNStatistics,
    DeepInversionWeights,
    InversionLoss,
    TeacherWeighting,
    bn_feature_statistics,
    deep_inversion_loss,
    deep_inversion_loss_over_teachers,
    draw_shift,
    eci_teacher_weights,
    fit_to_teacher,
    l2_prior,
    random_jitter,
    total_variation,
)
from dfml_bench.inversion.vectorised import InversionStrategy, StackedTeachers, resolve_strategy

__all__ = [
    "BNStatistics",
    "DeepInversionWeights",
    "InversionLoss",
    "InversionStrategy",
    "TeacherWeighting",
    "StackedTeachers",
    "bn_feature_statistics",
    "deep_inversion_loss",
    "deep_inversion_loss_over_teachers",
    "draw_shift",
    "eci_teacher_weights",
    "fit_to_teacher",
    "l2_prior",
    "random_jitter",
    "resolve_strategy",
    "total_variation",
]
