"""robustdistill: adversarial robustness distillation (ABSLD, B-MTARD and their baselines)."""

__version__ = "0.1.0"
