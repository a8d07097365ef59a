"""What everything else stands on, with no knowledge of models or training.

errors.py       the errors a user can cause and fix (`UserError`: one line, exit code 2); `require`
registry.py     the name registries (models, datasets, attacks, methods, checks)
schema.py       YAML and `key=value` overrides typed into dataclasses, with errors naming the key
threat.py       the threat model (norm and eps): every budget is checked, and defaulted, there
distributed.py  DDP plumbing (no-ops in one process), devices, every rank's random streams
timing.py       FLOP counting, durations for people, thread counts
progress.py     what a library call shows while it works (log lines, progress bars), or not
"""

__version__ = "0.1.0"
