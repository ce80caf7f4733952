"""``python -m fusedops.benchmarks`` is ``fusedops-bench``."""

import sys

from .report import main

sys.exit(main())
