"""Speed benchmarks, run from the repository root as modules: `python -m benchmarks.train_step`.

Importing the package first sets OMP_WAIT_POLICY=PASSIVE unless it is given (OpenMP reads it when
torch loads; the spinning default made contended steps many times slower on a shared machine), so
every benchmark measures with the same thread policy. README.md here has what they measure and
their recorded output (`python -m benchmarks.record`).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
