"""A hyperstep written directly from the method's equations, and its comparison with metaopt.

The reference formulation follows the two-stage hypergradient of Raghu et al. (2021) with the
plainest tools: the FT head is unrolled for ``K`` SGD steps with ``higher.innerloop_ctx``
(``higher``'s own SGD, which is exact for plain SGD), ``v = dL_val/dtheta`` comes from
``torch.autograd.grad`` through the unroll, and the PT stage works on flattened parameter
vectors: ``g = dL_PT/dtheta`` with ``create_graph=True``, a Python loop for the truncated Neumann
series ``p = alpha * sum_{j=0..J} (I - alpha H)^j v``, and one vector-Jacobian product
``-p^T d2L_PT/(dtheta dphi)`` for the hypergradient. Like metaopt, it runs the FT stage with the
encoder in eval mode, carries the FT head forward, and restores the model's buffers afterwards.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterator

import higher
import torch

import metaopt

from .measure import peak_memory, time_interleaved
from .problems import Problem, RecordingSGD, make_meta

__all__ = ["ReferenceHyperstep", "compare", "relative_difference", "cosine"]

logger = logging.getLogger(__name__)


def _flat(tensors: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def relative_difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Return ``||got - expected|| / ||expected||`` over the concatenated tensors."""
    a, b = _flat(got).double(), _flat(expected).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def cosine(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Return the cosine similarity of the concatenated tensors."""
    a, b = _flat(got).double(), _flat(expected).double()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))


class ReferenceHyperstep:
    """The reference hyperstep on a :class:`Problem` (Neumann PT stage, unrolled FT head).

    Args:
        problem: the bilevel problem; its FT batches are cycled in the order metaopt uses.
        terms: ``J``, the Neumann terms after the first.
        ft_steps: ``K``, the unrolled FT steps.
        meta_lr: learning rate of the meta-optimizer (SGD; it records each hypergradient).
    """

    def __init__(self, problem: Problem, *, terms: int, ft_steps: int, meta_lr: float) -> None:
        self.problem = problem
        self.terms = terms
        self.ft_steps = ft_steps
        self.alpha = problem.pt_lr
        self.ft_optimizer = torch.optim.SGD(problem.head.parameters(), lr=problem.ft_lr)
        self.meta_optimizer = RecordingSGD(problem.meta_params, lr=meta_lr)
        self._train: Iterator[Any] = itertools.cycle(problem.ft_train)
        self._val: Iterator[Any] = itertools.cycle(problem.ft_val)

    def ft_stage(self) -> list[torch.Tensor]:
        """Unroll ``K`` FT steps of the head; return ``v = dL_val/dtheta`` and move the head."""
        problem = self.problem
        model, theta = problem.model, problem.theta
        with higher.innerloop_ctx(problem.head, self.ft_optimizer,
                                  copy_initial_weights=True) as (fast_head, diffopt):
            for _ in range(self.ft_steps):
                diffopt.step(problem.ft_loss(model, fast_head, next(self._train)))
            val_loss = problem.ft_loss(model, fast_head, next(self._val))
            grads = torch.autograd.grad(val_loss, theta, allow_unused=True)
            with torch.no_grad():
                for param, new in zip(problem.head.parameters(), fast_head.parameters()):
                    param.copy_(new)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, theta)]

    def pt_stage(self, v: list[torch.Tensor], pt_batch: Any) -> list[torch.Tensor]:
        """Return ``-alpha * sum_j ((I - alpha H)^j v)^T d2L_PT/(dtheta dphi)``."""
        problem = self.problem
        theta = problem.theta
        loss = problem.pt_loss(pt_batch)
        g = _flat(torch.autograd.grad(loss, theta, create_graph=True))
        term = _flat(v)
        total = term.clone()
        for _ in range(self.terms):
            hvp = _flat(torch.autograd.grad(g, theta, grad_outputs=term, retain_graph=True))
            term = term - self.alpha * hvp
            total = total + term
        mixed = torch.autograd.grad(g, problem.meta_params, grad_outputs=self.alpha * total)
        return [-m for m in mixed]

    def step(self, pt_batch: Any) -> list[torch.Tensor]:
        """Run one hyperstep on ``pt_batch`` and step the meta-parameters; return the
        hypergradient."""
        model = self.problem.model
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        model.eval()
        v = self.ft_stage()
        model.train()
        hypergrad = self.pt_stage(v, pt_batch)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for param, grad in zip(self.problem.meta_params, hypergrad):
            param.grad = grad
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        return hypergrad


def _warm_start(problem: Problem, optimizer: Any, steps: int) -> None:
    for index in range(steps):
        problem.pt_step(optimizer, index)


def _agreement(
    build: Callable[[], Problem], terms: int, ft_steps: int, hypersteps: int
) -> dict[str, Any]:
    """Run both formulations from identical states; compare each hypergradient."""
    ours, theirs = build(), build()
    meta = make_meta(ours, metaopt.Neumann(terms=terms), ft_steps=ft_steps, meta_lr=1e-3)
    reference = ReferenceHyperstep(theirs, terms=terms, ft_steps=ft_steps, meta_lr=1e-3)
    _warm_start(ours, meta, 3)
    _warm_start(theirs, torch.optim.Adam(theirs.model.parameters(), lr=theirs.pt_lr), 3)
    rows = []
    for index in range(hypersteps):
        meta.hyperstep(ours.pt_closure(100 + index))
        got = meta.meta_optimizer.last_grads
        expected = reference.step(theirs.pt_batch(100 + index))
        rows.append({"relative_difference": relative_difference(got, expected),
                     "cosine": cosine(got, expected),
                     "norm": float(_flat(expected).norm())})
    with torch.no_grad():
        head_diff = max(float((a - b).abs().max())
                        for a, b in zip(ours.head.parameters(), theirs.head.parameters()))
    return {"hypersteps": rows,
            "max_relative_difference": max(r["relative_difference"] for r in rows),
            "head_max_abs_difference": head_diff}


def compare(
    build: Callable[[], Problem],
    device: torch.device,
    *,
    terms: int = 1,
    ft_steps: int = 1,
    repeats: int = 5,
    hypersteps: int = 2,
) -> dict[str, Any]:
    """Compare metaopt's ``Neumann(terms)`` hyperstep with the reference formulation.

    Returns the hypergradient agreement, interleaved median times, peak memories and the ratios
    metaopt / reference.
    """
    result: dict[str, Any] = {"terms": terms, "ft_steps": ft_steps}
    result["agreement"] = _agreement(build, terms, ft_steps, hypersteps)

    ours, theirs = build(), build()
    result["problem"] = ours.name
    meta = make_meta(ours, metaopt.Neumann(terms=terms), ft_steps=ft_steps, meta_lr=1e-4)
    reference = ReferenceHyperstep(theirs, terms=terms, ft_steps=ft_steps, meta_lr=1e-4)
    counter = itertools.count()
    calls = {
        "metaopt": lambda: meta.hyperstep(ours.pt_closure(next(counter))),
        "reference": lambda: reference.step(theirs.pt_batch(next(counter))),
    }
    timings = time_interleaved(calls, device, warmup=1, repeats=repeats)
    memory = {name: peak_memory(fn, device) for name, fn in calls.items()}
    result["time"] = {name: t.as_dict() for name, t in timings.items()}
    result["memory"] = memory
    result["time_ratio"] = timings["metaopt"].median / timings["reference"].median
    result["cpu_ratio"] = timings["metaopt"].cpu_median / timings["reference"].cpu_median
    result["memory_ratio"] = _ratio(memory["metaopt"]["tensor_peak_bytes"],
                                    memory["reference"]["tensor_peak_bytes"])
    result["rss_ratio"] = _ratio(memory["metaopt"]["rss_peak_delta_bytes"],
                                 memory["reference"]["rss_peak_delta_bytes"])
    return result


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator
