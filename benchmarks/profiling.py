"""A cProfile of repeated default hypersteps, showing where metaopt spends the time.

The profiler's clock is the calling thread's CPU time (``time.thread_time``), so time that the
process spends descheduled on a busy machine is not charged to any function. Each row is a
function in ``metaopt/`` with its call count, its own time and its cumulative time (callees
included, torch operators too), as a share of the total hyperstep time. For functions written
as context managers (``swapped_parameters``, ``saved_buffers``, ...) the cumulative time covers
entering and leaving the block, not the block's body.
"""

from __future__ import annotations

import cProfile
import itertools
import logging
import pstats
import time
from pathlib import Path
from typing import Any, Callable

import metaopt

from .problems import Problem, make_meta
from .reference import ReferenceHyperstep

__all__ = ["run"]

logger = logging.getLogger(__name__)

PACKAGE = str(Path(metaopt.__file__).resolve().parent)


def _profile(fn: Callable[[], Any], calls: int) -> pstats.Stats:
    fn()  # warm-up
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    return pstats.Stats(profiler)


def _rows(stats: pstats.Stats, total: float, min_share: float) -> list[dict[str, Any]]:
    rows = []
    for (filename, line, name), entry in stats.stats.items():  # type: ignore[attr-defined]
        primitive, ncalls, tottime, cumtime = entry[:4]
        if not str(Path(filename).resolve()).startswith(PACKAGE):
            continue
        if cumtime / total < min_share:
            continue
        rows.append({"function": f"{Path(filename).name}:{line}({name})", "calls": ncalls,
                     "self_s": tottime, "cumulative_s": cumtime,
                     "self_share": tottime / total, "cumulative_share": cumtime / total})
    return sorted(rows, key=lambda row: row["cumulative_s"], reverse=True)


def _total(stats: pstats.Stats, function: str) -> float:
    for (filename, _, name), entry in stats.stats.items():  # type: ignore[attr-defined]
        if name == function and filename.startswith(PACKAGE):
            return entry[3]
    raise KeyError(function)


def run(build: Callable[[], Problem], calls: int, min_share: float = 0.002) -> dict[str, Any]:
    """Profile ``calls`` default hypersteps of metaopt and of the reference formulation."""
    problem = build()
    meta = make_meta(problem, metaopt.Neumann(terms=1), meta_lr=0.0)
    counter = itertools.count()
    stats = _profile(lambda: meta.hyperstep(problem.pt_closure(next(counter))), calls)
    total = _total(stats, "hyperstep")

    other = build()
    reference = ReferenceHyperstep(other, terms=1, ft_steps=1, meta_lr=0.0)
    reference_stats = _profile(lambda: reference.step(other.pt_batch(next(counter))), calls)
    reference_total = max(entry[3] for (filename, _, name), entry
                          in reference_stats.stats.items()  # type: ignore[attr-defined]
                          if name == "step" and filename.endswith("reference.py"))
    return {"problem": problem.name, "calls": calls, "clock": "thread CPU time",
            "metaopt_cpu_s_per_hyperstep": total / calls,
            "reference_cpu_s_per_hyperstep": reference_total / calls,
            "rows": _rows(stats, total, min_share)}
