"""`python -m robustdistill ...` (what `torchrun -m robustdistill train ...` runs)."""

import sys

from .cli import main

sys.exit(main())
