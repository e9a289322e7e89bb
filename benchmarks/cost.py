"""Cost of a PT step, of one hyperstep per estimator, and of training with periodic hypersteps.

Every hyperstep time and memory is also reported as a ratio to one plain PT step (a
``torch.optim.Adam`` step without metaopt) measured in the same process on the same problem.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import warnings
from typing import Any, Callable

import torch

import metaopt

from .measure import Timing, peak_memory, time_call, time_interleaved
from .problems import Problem, count_parameters, make_meta

__all__ = ["EstimatorSpec", "ESTIMATORS", "run_problem", "amortised"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    """One hyperstep configuration: a PT estimator and an FT stage."""

    label: str
    make_estimator: Callable[[], metaopt.PTEstimator]
    ft_steps: int = 1
    ft_mode: str = "head"
    heavy: bool = False  # skipped on cost cases that set skip_heavy (slow problems)

    @property
    def unrolled_steps(self) -> int:
        estimator = self.make_estimator()
        return estimator.steps if isinstance(estimator, metaopt.UnrolledPT) else 0


# The GIN and conv nets of these problems are far from a PT optimum, where the Hessian is
# indefinite and undamped CG stops at non-positive curvature after two or three HVPs. The cost
# rows damp it so that it runs all its iterations (tol=0); the HVPs used are reported.
CG_DAMPING = 100.0


def _cg(iterations: int) -> Callable[[], metaopt.PTEstimator]:
    return lambda: metaopt.ConjugateGradient(iterations=iterations, tol=0.0, damping=CG_DAMPING)


def _count_hvps(estimator: metaopt.PTEstimator, counts: list[int]) -> metaopt.PTEstimator:
    """Make ``estimator`` append the HVP count of each solve to ``counts``."""
    solve = estimator.solve

    def counting_solve(v: torch.Tensor, hvp: Any, alpha: float) -> Any:
        p, info = solve(v, hvp, alpha)
        counts.append(info.hvps)
        return p, info

    estimator.solve = counting_solve  # type: ignore[method-assign]
    return estimator


ESTIMATORS: tuple[EstimatorSpec, ...] = (
    EstimatorSpec("Neumann J=1, FT K=1 (default)", lambda: metaopt.Neumann(terms=1)),
    EstimatorSpec("Neumann J=5", lambda: metaopt.Neumann(terms=5)),
    EstimatorSpec("Neumann J=20", lambda: metaopt.Neumann(terms=20), heavy=True),
    EstimatorSpec(f"CG 5 (damping {CG_DAMPING:g})", _cg(5)),
    EstimatorSpec(f"CG 20 (damping {CG_DAMPING:g})", _cg(20), heavy=True),
    EstimatorSpec("UnrolledPT T=1", lambda: metaopt.UnrolledPT(steps=1)),
    EstimatorSpec("UnrolledPT T=5", lambda: metaopt.UnrolledPT(steps=5)),
    EstimatorSpec("UnrolledPT T=20", lambda: metaopt.UnrolledPT(steps=20), heavy=True),
    EstimatorSpec("FT unrolled K=5", lambda: metaopt.Neumann(terms=1), ft_steps=5),
    EstimatorSpec("FT implicit (CG 20 on the head)", lambda: metaopt.Neumann(terms=1),
                  ft_mode="implicit"),
    EstimatorSpec("FirstOrder", metaopt.FirstOrder),
)


@dataclasses.dataclass
class TimingPolicy:
    """How long to time each call: warm-up calls, repeat bounds and a time budget."""

    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 10
    budget_s: float = 3.0

    def time(self, fn: Callable[[], Any], device: torch.device,
             setup: Callable[[], Any] | None = None) -> Timing:
        return time_call(fn, device, warmup=self.warmup, min_repeats=self.min_repeats,
                         max_repeats=self.max_repeats, budget_s=self.budget_s, setup=setup)


def _pt_step_cost(
    build: Callable[[], Problem], device: torch.device, policy: TimingPolicy
) -> dict[str, Any]:
    problem = build()
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=problem.pt_lr)
    counter = itertools.count()
    step = lambda: problem.pt_step(optimizer, next(counter))  # noqa: E731
    timing = policy.time(step, device)
    return {"time": timing.as_dict(), "memory": peak_memory(step, device)}


def _hyperstep_cost(
    build: Callable[[], Problem], spec: EstimatorSpec, device: torch.device, policy: TimingPolicy
) -> dict[str, Any]:
    problem = build()
    hvps: list[int] = []
    estimator = _count_hvps(spec.make_estimator(), hvps)
    meta = make_meta(problem, estimator, ft_steps=spec.ft_steps, ft_mode=spec.ft_mode,
                     meta_lr=0.0)
    recorded = spec.unrolled_steps > 0
    counter = itertools.count(1000)
    records: list[metaopt.HyperstepRecord] = []

    def record_steps() -> None:
        # An applied hyperstep restarts UnrolledPT's window, so each one needs T new steps.
        for _ in range(spec.unrolled_steps):
            problem.pt_step(meta, next(counter), record=True)

    def hyperstep() -> None:
        records.append(meta.hyperstep(problem.pt_closure(next(counter))))

    problem.pt_step(meta, next(counter), record=recorded)
    setup = record_steps if recorded else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", metaopt.MetaOptWarning)
        timing = policy.time(hyperstep, device, setup=setup)
        if setup is not None:
            setup()
        memory = peak_memory(hyperstep, device)
    result = {"label": spec.label, "time": timing.as_dict(), "memory": memory,
              "residual": records[-1].residual, "diverged": records[-1].diverged,
              "hvps": sorted(set(hvps)),
              "warnings": sorted({str(w.message)[:200] for w in caught})}
    if recorded:
        step = lambda: problem.pt_step(meta, next(counter), record=True)  # noqa: E731
        result["recorded_pt_step"] = policy.time(step, device).as_dict()
    return result


def amortised(
    build: Callable[[], Problem], every: int, steps: int, device: torch.device, repeats: int
) -> dict[str, Any]:
    """Time ``steps`` PT steps with a default hyperstep every ``every`` steps.

    After one untimed warm-up round, three loops run in turn ``repeats`` times. The first is
    plain Adam. The second takes each hyperstep on a fresh PT batch (``hyperstep(closure)``, the
    method's schedule). The third passes the PT step's own loss (``hyperstep(loss)`` in place
    of ``loss.backward()``), which saves a forward and a backward pass but takes the Hessian
    from the step's batch.
    """
    plain_problem, fresh_problem, reuse_problem = build(), build(), build()
    plain = torch.optim.Adam(plain_problem.model.parameters(), lr=plain_problem.pt_lr)
    fresh = make_meta(fresh_problem, metaopt.Neumann(terms=1), meta_lr=1e-3)
    reuse = make_meta(reuse_problem, metaopt.Neumann(terms=1), meta_lr=1e-3)

    def plain_loop() -> None:
        for index in range(steps):
            plain_problem.pt_step(plain, index)

    def fresh_loop() -> None:
        for index in range(steps):
            fresh_problem.pt_step(fresh, index)
            if (index + 1) % every == 0:
                fresh.hyperstep(fresh_problem.pt_closure(index + 1))

    def reuse_loop() -> None:
        for index in range(steps):
            if (index + 1) % every != 0:
                reuse_problem.pt_step(reuse, index)
                continue
            reuse.zero_grad()
            reuse.hyperstep(reuse_problem.pt_loss(reuse_problem.pt_batch(index)))
            reuse.step()

    timings = time_interleaved({"plain": plain_loop, "fresh": fresh_loop,
                                "reuse": reuse_loop}, device, warmup=1, repeats=repeats)
    plain_time = timings["plain"]
    return {"every": every, "steps": steps, "plain": plain_time.as_dict(),
            "with_hypersteps": timings["fresh"].as_dict(),
            "ratio": timings["fresh"].median / plain_time.median,
            "cpu_ratio": timings["fresh"].cpu_median / plain_time.cpu_median,
            "reusing_step_loss": timings["reuse"].as_dict(),
            "reuse_ratio": timings["reuse"].median / plain_time.median,
            "reuse_cpu_ratio": timings["reuse"].cpu_median / plain_time.cpu_median}


def run_problem(
    build: Callable[[], Problem],
    device: torch.device,
    policy: TimingPolicy,
    *,
    skip_heavy: bool,
    amortised_plan: list[tuple[int, int]],
    amortised_repeats: int = 2,
) -> dict[str, Any]:
    """Measure the PT step, every estimator of ``ESTIMATORS`` and the amortised plan
    (``(every, steps)`` pairs) on the problem that ``build`` returns."""
    probe = build()
    result: dict[str, Any] = {
        "problem": probe.name,
        "pt_parameters": count_parameters(probe.model),
        "meta_parameters": sum(p.numel() for p in probe.meta_params),
    }
    del probe
    logger.info("cost: %s, %d PT parameters", result["problem"], result["pt_parameters"])
    pt = _pt_step_cost(build, device, policy)
    result["pt_step"] = pt

    rows = []
    for spec in ESTIMATORS:
        if skip_heavy and spec.heavy:
            continue
        logger.info("cost: %s / %s", result["problem"], spec.label)
        rows.append(_relative_to(pt, _hyperstep_cost(build, spec, device, policy)))
    result["hypersteps"] = rows

    result["amortised"] = []
    for every, steps in amortised_plan:
        logger.info("cost: %s / amortised M=%d", result["problem"], every)
        row = amortised(build, every, steps, device, amortised_repeats)
        result["amortised"].append(_with_prediction(row, pt, rows[0]))
    return result


def _relative_to(pt: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Add the ratios of a hyperstep row to the plain PT step."""
    row["time_ratio"] = row["time"]["median_s"] / pt["time"]["median_s"]
    row["cpu_ratio"] = row["time"]["cpu_median_s"] / pt["time"]["cpu_median_s"]
    row["memory_ratio"] = _ratio(row["memory"]["tensor_peak_bytes"],
                                 pt["memory"]["tensor_peak_bytes"])
    return row


def _with_prediction(row: dict[str, Any], pt: dict[str, Any],
                     default: dict[str, Any]) -> dict[str, Any]:
    """Add ``1 + t_hyperstep / (M t_PT)`` from the single-step medians to an amortised row."""
    every = row["every"]
    row["predicted_ratio"] = 1 + default["time"]["median_s"] / (every * pt["time"]["median_s"])
    row["predicted_cpu_ratio"] = 1 + default["time"]["cpu_median_s"] / (
        every * pt["time"]["cpu_median_s"])
    return row


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator
