"""Benchmarks of metaopt: cost, a reference formulation, other libraries, accuracy, scaling.

Run ``python -m benchmarks --quick`` (a few minutes on two CPU cores) or ``python -m
benchmarks`` for the full set; ``python -m benchmarks.report`` turns the JSON into the tables of
BENCHMARKS.md.
"""

__all__: list[str] = []
