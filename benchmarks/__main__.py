"""``python -m benchmarks [--quick] [--out DIR] [--device cpu]``: see ``benchmarks.cli``."""

import sys

from .cli import main

sys.exit(main())
