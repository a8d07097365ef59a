"""Training methods: one small object per method, with its loss and its adaptive state.

base.py       Method, MethodOptions, Context, Progress, METHODS, FrozenTeacher
losses.py     KL divergence and soft targets
balance.py    the adaptive parts: class-wise temperatures (ABSLD), entropy and loss balance (B-MTARD)
gradient_matching.py  IGDM's term, an option of the distillation methods (`method.igdm`)
sample_weighting.py   SAAD's per-sample weights, an option of the soft-label methods (`method.saad`)
<name>.py     one file per method (absld, mtard (B-MTARD too), composed, and the baselines)
"""

from . import (  # noqa: F401  (register the methods)
    absld,
    adaad,
    ard,
    bat,
    cfa,
    ciard,
    composed,
    fair_ard,
    frl,
    iad,
    igdm,
    mart,
    mtard,
    natural,
    pgd_at,
    rslad,
    saad,
    trades,
)
from .base import (
    METHODS,
    Context,
    FrozenTeacher,
    Method,
    MethodOptions,
    Progress,
    create_method,
    label_free_methods,
    recompute_batchnorm,
    update_average,
)

__all__ = [
    "METHODS",
    "label_free_methods",
    "Context",
    "FrozenTeacher",
    "Method",
    "MethodOptions",
    "Progress",
    "create_method",
    "recompute_batchnorm",
    "update_average",
]
