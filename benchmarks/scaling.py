"""Hyperstep time against the number of PT parameters and the number of meta-parameters.

Model size: the GIN width grows with depth fixed, so the PT parameter count spans more than
100x. Meta-parameter count: 10 to 100,000 task weights on a fixed GIN whose PT head is a trained
``hidden -> 16`` layer followed by a fixed random ``16 -> tasks`` projection, so that only the
task weights and the label matrix grow. For that sweep the default hyperstep is also split into
four phases, timed one by one on the reference formulation (the same math as metaopt's): the FT
stage, the PT gradient with ``create_graph=True``, the Hessian-vector product and the final
vector-Jacobian product with respect to the meta-parameters.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from typing import Any, Callable

import torch

import metaopt

from .cost import TimingPolicy
from .measure import synchronize
from .problems import GINSize, Problem, build_gin, count_parameters, make_meta
from .reference import ReferenceHyperstep

__all__ = ["run", "MODEL_WIDTHS", "TASK_COUNTS"]

logger = logging.getLogger(__name__)

MODEL_WIDTHS = (12, 24, 48, 96, 192)
TASK_COUNTS = (10, 100, 1_000, 10_000, 100_000)
SMALL_POOLS = (3, 2, 2)


def _pt_and_hyperstep(problem: Problem, device: torch.device,
                      policy: TimingPolicy) -> dict[str, Any]:
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=problem.pt_lr)
    counter = itertools.count()
    pt = policy.time(lambda: problem.pt_step(optimizer, next(counter)), device)
    meta = make_meta(problem, metaopt.Neumann(terms=1), meta_lr=0.0)
    hyper = policy.time(lambda: meta.hyperstep(problem.pt_closure(next(counter))), device)
    return {"pt_step": pt.as_dict(), "hyperstep": hyper.as_dict(),
            "ratio": hyper.median / pt.median, "cpu_ratio": hyper.cpu_median / pt.cpu_median}


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, tuple[float, float]]:
    """Call ``fn``; return its output and its (wall, process CPU) seconds."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return out, (time.perf_counter() - wall, time.process_time() - cpu)


def _phases(problem: Problem, device: torch.device, repeats: int) -> dict[str, dict]:
    """Median wall and CPU seconds of each phase of the reference hyperstep (J=1, K=1)."""
    reference = ReferenceHyperstep(problem, terms=1, ft_steps=1, meta_lr=0.0)
    theta, phi = problem.theta, problem.meta_params
    names = ("ft_stage", "pt_gradient", "hvp", "meta_vjp")
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for index in range(repeats + 1):
        problem.model.eval()
        v, ft = _timed(reference.ft_stage, device)
        problem.model.train()
        v = torch.cat([x.reshape(-1) for x in v])
        batch = problem.pt_batch(index)

        def gradient() -> torch.Tensor:
            grads = torch.autograd.grad(problem.pt_loss(batch), theta, create_graph=True)
            return torch.cat([g.reshape(-1) for g in grads])

        g, grad_s = _timed(gradient, device)
        _, hvp_s = _timed(lambda: torch.autograd.grad(g, theta, grad_outputs=v,
                                                      retain_graph=True), device)
        _, vjp_s = _timed(lambda: torch.autograd.grad(g, phi, grad_outputs=v), device)
        if index > 0:  # the first round is a warm-up
            for name, value in zip(names, (ft, grad_s, hvp_s, vjp_s)):
                samples[name].append(value)
    return {
        "wall_s": {name: statistics.median(w for w, _ in values)
                   for name, values in samples.items()},
        "cpu_s": {name: statistics.median(c for _, c in values)
                  for name, values in samples.items()},
    }


def run(device: torch.device, policy: TimingPolicy, *, phase_repeats: int = 3,
        widths: tuple[int, ...] = MODEL_WIDTHS,
        task_counts: tuple[int, ...] = TASK_COUNTS) -> dict[str, Any]:
    """Sweep the model width and the task count; return one row per size."""
    model_rows = []
    for width in widths:
        problem = build_gin(GINSize(layers=3, hidden=width, tasks=32), device,
                            pools=SMALL_POOLS)
        logger.info("scaling: width %d (%d PT parameters)", width,
                    count_parameters(problem.model))
        row = {"width": width, "pt_parameters": count_parameters(problem.model)}
        row.update(_pt_and_hyperstep(problem, device, policy))
        model_rows.append(row)
    meta_rows = []
    for tasks in task_counts:
        size = GINSize(layers=3, hidden=64, tasks=tasks, task_rank=16)
        problem = build_gin(size, device, pools=SMALL_POOLS)
        logger.info("scaling: %d task weights", tasks)
        row = {"meta_parameters": tasks, "pt_parameters": count_parameters(problem.model)}
        row.update(_pt_and_hyperstep(problem, device, policy))
        row["phases"] = _phases(build_gin(size, device, pools=SMALL_POOLS), device,
                                phase_repeats)
        meta_rows.append(row)
    return {"model_size": model_rows, "meta_count": meta_rows}
