"""Process memory over many hypersteps on a small GIN: does anything accumulate?

Each iteration takes PT steps and one hyperstep: one PT step, or ``T`` recorded steps for
``UnrolledPT(steps=T)``, whose window restarts after every applied hyperstep. After every
hyperstep three measures are
read: the bytes of tensor storages created since the loop began and still alive (followed by a
``TorchDispatchMode``, so tensors kept only inside an autograd graph count too), the process RSS,
and on CUDA ``torch.cuda.memory_allocated``. Every ``census_every`` hypersteps the tensors that
the garbage collector can reach are counted as well. Slopes are least-squares fits over the
second half of the run, after the working set has formed. The RSS is the weakest of these
measures: in a process whose allocator already keeps freed memory from earlier sections it can
stay flat while tensors accumulate, which the tracked bytes would show.
"""

from __future__ import annotations

import gc
import itertools
import logging
from typing import Any, Callable, Sequence

import torch

import metaopt

from .measure import StorageTracker, live_tensor_bytes, rss_bytes
from .problems import GINSize, build_gin, make_meta

__all__ = ["run", "slope"]

logger = logging.getLogger(__name__)

SIZE = GINSize(layers=2, hidden=32, tasks=16, graphs=16)
ESTIMATORS: dict[str, Callable[[], metaopt.PTEstimator]] = {
    "Neumann J=1 (default)": lambda: metaopt.Neumann(terms=1),
    "UnrolledPT T=5": lambda: metaopt.UnrolledPT(steps=5, replay_tol=1.0),
}


def slope(values: Sequence[float]) -> float:
    """Return the least-squares slope of ``values`` against their index (units per step)."""
    if len(values) < 2:
        return 0.0
    y = torch.tensor(values, dtype=torch.float64)
    x = torch.arange(len(values), dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def _trace(make: Callable[[], metaopt.PTEstimator], hypersteps: int, device: torch.device,
           census_every: int, size: GINSize) -> dict[str, Any]:
    problem = build_gin(size, device)
    estimator = make()
    meta = make_meta(problem, estimator, meta_lr=1e-3)
    record = isinstance(estimator, metaopt.UnrolledPT)
    steps_per_hyperstep = estimator.steps if record else 1
    steps = itertools.count()
    rss: list[int] = []
    cuda: list[int] = []
    tracked: list[int] = []
    census: list[dict[str, int]] = []
    tracker = StorageTracker()
    with tracker:
        for index in range(hypersteps):
            for _ in range(steps_per_hyperstep):
                problem.pt_step(meta, next(steps), record=record)
            meta.hyperstep(problem.pt_closure(next(steps)))
            tracked.append(tracker.live)
            rss.append(rss_bytes())
            if device.type == "cuda":
                cuda.append(torch.cuda.memory_allocated(device))
            if index % census_every == 0 or index == hypersteps - 1:
                gc.collect()
                count, size = live_tensor_bytes()
                census.append({"hyperstep": index, "tensors": count, "bytes": size})
    half = hypersteps // 2
    result = {"tracked_bytes": tracked,
              "tracked_slope_bytes_per_hyperstep": slope(tracked[half:]),
              "tracked_change_second_half_bytes": tracked[-1] - tracked[half],
              "rss_bytes": rss, "rss_slope_bytes_per_hyperstep": slope(rss[half:]),
              "rss_change_second_half_bytes": rss[-1] - rss[half], "census": census,
              "tensor_count_change": census[-1]["tensors"] - census[1]["tensors"]
              if len(census) > 1 else 0}
    if cuda:
        result["cuda_allocated_bytes"] = cuda
        result["cuda_slope_bytes_per_hyperstep"] = slope(cuda[half:])
    return result


def run(device: torch.device, hypersteps: int, census_every: int = 20,
        size: GINSize = SIZE) -> dict[str, Any]:
    """Trace every estimator of ``ESTIMATORS`` for ``hypersteps`` hypersteps."""
    traces = {}
    for label, make in ESTIMATORS.items():
        logger.info("memory flatness: %s, %d hypersteps", label, hypersteps)
        traces[label] = _trace(make, hypersteps, device, census_every, size)
    return {"problem": size.label, "hypersteps": hypersteps, "traces": traces}
