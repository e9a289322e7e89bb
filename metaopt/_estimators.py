"""PT-stage hypergradient estimators: how ``v^T (d theta*/d phi)`` is approximated.

Notation: ``theta`` are the PT parameters, ``phi`` the meta-parameters, ``H = d2 L_PT / d theta2``
on one PT batch, and ``v = dL_val/dtheta`` from the FT stage. The implicit estimators rest on the
optimality condition ``dL_PT/dtheta (theta*, phi) = 0``; the implicit function theorem then gives
``dL_val/dphi = -p^T d2L_PT/(dtheta dphi)`` with ``p = H^-1 v``. They differ in how ``p`` is
approximated. :class:`UnrolledPT` instead differentiates through recorded PT steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import torch

__all__ = [
    "PTEstimator",
    "Neumann",
    "ConjugateGradient",
    "FirstOrder",
    "ExactSolve",
    "UnrolledPT",
    "SolveInfo",
]

logger = logging.getLogger(__name__)

HVP = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class SolveInfo:
    """Diagnostics of one inverse-Hessian-vector product.

    Attributes:
        residual: relative residual ``||v - A p|| / ||v||`` of the linear system that was solved
            (CG, exact solve), or for Neumann the norm of the last series term over ``||v||``.
        diverged: True when the solver detected divergence. Neumann: ``alpha * lambda > 2`` for
            a Rayleigh quotient ``lambda`` of ``H``, or a last term more than twice as long as
            ``v`` (negative curvature makes the series grow). CG: a direction of non-positive
            curvature. Exact solve: ``H + damping I`` not positive definite.
        curvature: the largest Rayleigh quotient (exact solve: eigenvalue) of ``H`` seen.
        min_curvature: the smallest Rayleigh quotient (exact solve: eigenvalue) of ``H`` seen.
        hvps: the number of Hessian-vector products used.
    """

    residual: float | None = None
    diverged: bool = False
    curvature: float | None = None
    min_curvature: float | None = None
    hvps: int = 0

    def observe(self, direction: torch.Tensor, h_direction: torch.Tensor) -> None:
        """Update the curvature range with the Rayleigh quotient of one direction."""
        norm_sq = torch.dot(direction, direction)
        if norm_sq <= 0:
            return
        quotient = (torch.dot(direction, h_direction) / norm_sq).item()
        self.curvature = quotient if self.curvature is None else max(self.curvature, quotient)
        self.min_curvature = (
            quotient if self.min_curvature is None else min(self.min_curvature, quotient)
        )


def _check_positive_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_nonnegative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


class PTEstimator:
    """Base class of the PT-stage estimators."""

    implicit: bool = True

    def solve(self, v: torch.Tensor, hvp: HVP, alpha: float) -> tuple[torch.Tensor, SolveInfo]:
        """Return ``p`` with ``H p ~= v`` for a flat vector ``v`` of shape ``(n,)``."""
        raise NotImplementedError


@dataclasses.dataclass
class Neumann(PTEstimator):
    """Truncated Neumann series: ``p = alpha * sum_{j=0..J} (I - alpha H)^j v``.

    Costs ``J`` Hessian-vector products. It converges to ``H^-1 v`` when every eigenvalue of
    ``alpha H`` lies in ``(0, 2)``; ``J = 0`` gives ``alpha * v``. This is the estimator of
    Raghu et al. (2021) with ``J = 1`` and ``alpha`` the PT learning rate.

    Args:
        terms: ``J``, the number of series terms after the first.
        alpha: the step size of the series; ``None`` takes the current learning rate of the PT
            optimizer's first parameter group at every hyperstep.
    """

    terms: int = 1
    alpha: float | None = None

    def __post_init__(self) -> None:
        _check_positive_int("Neumann terms", self.terms, 0)
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"Neumann alpha must be a finite number > 0, got {self.alpha!r}.")

    def solve(self, v: torch.Tensor, hvp: HVP, alpha: float) -> tuple[torch.Tensor, SolveInfo]:
        alpha = self.alpha if self.alpha is not None else alpha
        info = SolveInfo(hvps=self.terms)
        term = v
        total = v.clone()
        for _ in range(self.terms):
            h_term = hvp(term)
            info.observe(term, h_term)
            term = term - alpha * h_term
            total = total + term

        v_norm = torch.linalg.vector_norm(v).item()
        info.residual = torch.linalg.vector_norm(term).item() / v_norm if v_norm > 0 else 0.0
        too_steep = info.curvature is not None and alpha * info.curvature > 2
        info.diverged = too_steep or info.residual > 2
        return alpha * total, info


@dataclasses.dataclass
class ConjugateGradient(PTEstimator):
    """Conjugate gradient on ``(H + damping I) p = v``.

    Costs at most ``iterations`` Hessian-vector products and stops early when the relative
    residual falls below ``tol``. CG assumes ``H + damping I`` is positive definite; a
    direction of non-positive curvature stops it and sets ``diverged`` in the record.

    Args:
        iterations: the maximum number of CG iterations.
        tol: relative residual ``||v - A p|| / ||v||`` at which to stop.
        damping: the ridge added to ``H`` (units of the loss per squared parameter unit).
    """

    iterations: int = 20
    tol: float = 1e-10
    damping: float = 0.0

    def __post_init__(self) -> None:
        _check_positive_int("ConjugateGradient iterations", self.iterations, 1)
        _check_nonnegative("ConjugateGradient tol", self.tol)
        _check_nonnegative("ConjugateGradient damping", self.damping)

    def solve(self, v: torch.Tensor, hvp: HVP, alpha: float) -> tuple[torch.Tensor, SolveInfo]:
        p = torch.zeros_like(v)
        r = v.clone()
        d = r.clone()
        rr = torch.dot(r, r)
        v_norm = torch.linalg.vector_norm(v)
        info = SolveInfo(residual=0.0)
        if v_norm == 0:
            return p, info

        for _ in range(self.iterations):
            if (rr.sqrt() / v_norm).item() <= self.tol:
                break
            hd = hvp(d)
            info.observe(d, hd)
            ad = hd + self.damping * d
            info.hvps += 1
            curvature = torch.dot(d, ad)
            if curvature <= 0:
                info.diverged = True
                logger.debug("CG met non-positive curvature %.3g; stopping early", curvature)
                break
            step = rr / curvature
            p = p + step * d
            r = r - step * ad
            rr_new = torch.dot(r, r)
            d = r + (rr_new / rr) * d
            rr = rr_new

        info.residual = (rr.sqrt() / v_norm).item()
        return p, info


@dataclasses.dataclass
class FirstOrder(PTEstimator):
    """Identity Hessian, ``p = v``: no Hessian-vector products, a cheap biased baseline."""

    def solve(self, v: torch.Tensor, hvp: HVP, alpha: float) -> tuple[torch.Tensor, SolveInfo]:
        return v.clone(), SolveInfo()


@dataclasses.dataclass
class ExactSolve(PTEstimator):
    """Dense solve of ``(H + damping I) p = v``, building ``H`` from ``n`` Hessian-vector products.

    Memory ``n^2`` and ``n`` HVPs, so it is meant for small models and for checking the other
    estimators.

    Args:
        damping: the ridge added to ``H``.
        max_params: the largest ``n`` accepted.
    """

    damping: float = 0.0
    max_params: int = 20_000

    def __post_init__(self) -> None:
        _check_nonnegative("ExactSolve damping", self.damping)
        _check_positive_int("ExactSolve max_params", self.max_params, 1)

    def solve(self, v: torch.Tensor, hvp: HVP, alpha: float) -> tuple[torch.Tensor, SolveInfo]:
        n = v.numel()
        if n > self.max_params:
            raise ValueError(
                f"ExactSolve needs the dense Hessian of {n} PT parameters, more than max_params="
                f"{self.max_params}. Use ConjugateGradient or Neumann for a model this size, or "
                "raise max_params if n^2 floats fit in memory."
            )
        eye = torch.eye(n, dtype=v.dtype, device=v.device)
        hessian = torch.stack([hvp(eye[i]) for i in range(n)])
        hessian = 0.5 * (hessian + hessian.T)
        eigenvalues = torch.linalg.eigvalsh(hessian)
        system = hessian + self.damping * eye
        p = torch.linalg.solve(system, v)
        residual = torch.linalg.vector_norm(v - system @ p) / torch.linalg.vector_norm(v)
        return p, SolveInfo(
            residual=residual.nan_to_num(0.0).item(),
            diverged=bool(eigenvalues[0] + self.damping <= 0),
            curvature=eigenvalues[-1].item(),
            min_curvature=eigenvalues[0].item(),
            hvps=n,
        )


@dataclasses.dataclass
class UnrolledPT(PTEstimator):
    """Backpropagation through the last ``T`` recorded PT steps (truncated, exact for them).

    Each ``MetaPTOptimizer.step(loss_fn=...)`` records the parameters, the optimizer state, the
    learning rates and the random-number state saved by the preceding ``zero_grad()`` (so
    dropout masks replay), with the closure that computes that step's PT loss. A hyperstep replays the last ``T`` steps differentiably from the oldest
    record and backpropagates ``v`` through them to the meta-parameters. Memory grows linearly
    with ``T`` (one copy of the parameters and optimizer state per recorded step, plus the graph
    of ``T`` steps during the hyperstep). The window restarts after each applied meta-update,
    because earlier steps ran with other meta-parameter values: with a hyperstep every ``M``
    PT steps the replay covers ``min(T, M)`` steps.

    Args:
        steps: ``T``, the number of recorded PT steps to differentiate through.
        replay_tol: the largest relative difference between replayed and actual parameters that
            is accepted silently; a larger one warns that ``loss_fn`` does not reproduce the step.
    """

    steps: int = 5
    replay_tol: float = 1e-4
    implicit = False

    def __post_init__(self) -> None:
        _check_positive_int("UnrolledPT steps", self.steps, 1)
        _check_nonnegative("UnrolledPT replay_tol", self.replay_tol)
