"""Training: a config in, a run folder out.

config.py     `Config` (its sections live beside what they configure), `TrainConfig`, loading, overrides
preflight.py  every check on a run's input before anything is read or written; what a resume may change
builders.py   the parts of a run, one builder each: models and teachers, method, optimiser and its lr
              schedule, loader, selection; a resumed state read and checked
folder.py     the run folder, opened after every check, removed when a run fails before its first checkpoint
loop.py       `train` = setup + fit + finish: the epochs, validation and selection, checkpoints, the report
estimate.py   how long a run will take, timed on the run itself
"""
