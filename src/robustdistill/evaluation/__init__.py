"""Evaluation: a model and a split in, a report a sceptical reviewer accepts out.

config.py    the `eval` config section and its resolution into `EvalSettings`
metrics.py   accuracy and class-wise accuracy with Wilson intervals, NSD, packed verdicts, selection scores
checks.py    the sanity checks, one registered function each
suite.py     `evaluate_model`: the attacks, per-sample verdicts assembled over ranks, metrics, checks
pipeline.py  `evaluate_source`: the one path from a model source to a report (training's and `eval`'s)
report.py    report.json, report.md and terminal tables
plots.py     a run's figures: adaptive-state trajectories, class-wise accuracy, robustness-fairness scatter
"""
