"""Training: a config in, a run folder out.

config.py     `Config` (its sections live beside what they configure), `TrainConfig`, loading, overrides
preflight.py  every check on a run's input before anything is read or written; what a resume may change
builders.py   the parts of a run, one builder each: data, models and teachers, method, optimiser, loader
loop.py       `train` = setup + fit + finish: the epochs, validation and selection, checkpoints, the report
estimate.py   how long a run will take, timed on the run itself
"""
