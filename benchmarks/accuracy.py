"""Accuracy of each PT estimator against the exact implicit hypergradient (float64).

Two problems:

- ``mlp``: multitask PT of a small tanh MLP with ``2 * sigmoid(logit)`` task weights and an L2
  penalty, trained to a tight optimum on one fixed PT batch; FT takes ``K = 1`` SGD step of a
  linear head. The exact value solves the dense Hessian (one Hessian-vector product per column)
  for ``H^-1 v``, with ``v`` from the FT stage unrolled by ``higher``. This module computes it
  independently of metaopt.
- ``ridge``: weighted ridge regression, whose PT optimum and hypergradient have a closed form
  (``tests/problems.py``).

For both, the Neumann step ``alpha`` (the PT learning rate) is ``1 / lambda_max(H)``, where the
series converges, and ``UnrolledPT`` replays SGD steps with that learning rate from the optimum.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import metaopt

from .problems import Problem, RecordingSGD
from .reference import ReferenceHyperstep, cosine, relative_difference

__all__ = ["run", "build_mlp", "exact_hypergradient"]

logger = logging.getLogger(__name__)

DTYPE = torch.float64


def build_mlp(seed: int = 0, *, hidden: int = 12, tasks: int = 4, examples: int = 128,
              l2: float = 1e-2, train_steps: int = 3000) -> Problem:
    """Build the MLP problem at an optimum of the penalised PT loss (float64)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.ModuleDict({
        "encoder": nn.Sequential(nn.Linear(6, hidden), nn.Tanh()),
        "pt_head": nn.Linear(hidden, tasks),
    }).to(DTYPE)
    head = nn.Linear(hidden, 1).to(DTYPE)
    logits = metaopt.Param(0.5 * torch.randn(tasks, generator=generator, dtype=DTYPE),
                           name="task_logits")

    def draw(rows: int, columns: int) -> torch.Tensor:
        return torch.randn(rows, columns, generator=generator, dtype=DTYPE)

    pt_batch = (draw(examples, 6), (draw(examples, tasks) > 0).to(DTYPE))
    ft_train = [(draw(64, 6), draw(64, 1))]
    ft_val = [(draw(64, 6), draw(64, 1))]

    def pt_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out = model["pt_head"](model["encoder"](x))
        bce = F.binary_cross_entropy_with_logits(out, y, reduction="none")
        penalty = sum(p.pow(2).sum() for p in model.parameters())
        return (2 * torch.sigmoid(logits) * bce).mean() + 0.5 * l2 * penalty

    def ft_loss(model: nn.Module, head: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        return F.mse_loss(head(model["encoder"](x)), y)

    problem = Problem(name="mlp", model=model, head=head, meta_params=[logits],
                      pt_batches=[pt_batch], ft_train=ft_train, ft_val=ft_val,
                      pt_loss=pt_loss, ft_loss=ft_loss, pt_lr=0.0, ft_lr=0.1)
    _train_to_optimum(problem, train_steps)
    problem.pt_lr = 1.0 / _hessian(problem).max().item()
    return problem


def _train_to_optimum(problem: Problem, steps: int) -> None:
    optimizer = torch.optim.LBFGS(problem.model.parameters(), lr=1.0, max_iter=steps,
                                  tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = problem.pt_loss(problem.pt_batches[0])
        loss.backward()
        return loss

    optimizer.step(closure)


def _dense_hessian(problem: Problem) -> torch.Tensor:
    """Return the symmetrised dense PT Hessian, one Hessian-vector product per column."""
    theta = problem.theta
    loss = problem.pt_loss(problem.pt_batches[0])
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    columns = [torch.cat([c.reshape(-1) for c in torch.autograd.grad(
        flat, theta, grad_outputs=e, retain_graph=True)]) for e in eye]
    hessian = torch.stack(columns)
    return 0.5 * (hessian + hessian.T)


def _hessian(problem: Problem) -> torch.Tensor:
    """Return the eigenvalues of the dense PT Hessian."""
    return torch.linalg.eigvalsh(_dense_hessian(problem))


def exact_hypergradient(problem: Problem) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Return ``-(H^-1 v)^T d2L_PT/(dtheta dphi)`` with a dense solve, and ``H``'s spectrum
    bounds. Moves the FT head one step, like a hyperstep."""
    reference = ReferenceHyperstep(problem, terms=0, ft_steps=1, meta_lr=0.0)
    problem.model.eval()
    v = torch.cat([x.reshape(-1) for x in reference.ft_stage()])
    problem.model.train()
    hessian = _dense_hessian(problem)
    p = torch.linalg.solve(hessian, v)
    theta = problem.theta
    loss = problem.pt_loss(problem.pt_batches[0])
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    parts = [x.view_as(t) for x, t in zip(p.split([t.numel() for t in theta]), theta)]
    mixed = torch.autograd.grad(grads, problem.meta_params, grad_outputs=parts)
    eig = torch.linalg.eigvalsh(hessian)
    spectrum = {"lambda_min": eig.min().item(), "lambda_max": eig.max().item(),
                "condition_number": (eig.max() / eig.min()).item()}
    return [-m for m in mixed], spectrum


def _metaopt_hypergradient(problem: Problem, estimator: metaopt.PTEstimator) -> list:
    finetune = metaopt.FineTune(
        problem.head, torch.optim.SGD(problem.head.parameters(), lr=problem.ft_lr),
        loss=problem.ft_loss, train=problem.ft_train, val=problem.ft_val, steps=1)
    meta = metaopt.MetaPTOptimizer(
        problem.model, torch.optim.SGD(problem.model.parameters(), lr=problem.pt_lr),
        meta_optimizer=RecordingSGD(problem.meta_params, lr=0.0), finetune=finetune,
        pt_estimator=estimator, on_divergence="warn")
    if isinstance(estimator, metaopt.UnrolledPT):
        for _ in range(estimator.steps):
            problem.pt_step(meta, 0, record=True)
    meta.hyperstep(problem.pt_closure(0))
    return meta.meta_optimizer.last_grads


def _sweep() -> list[tuple[str, int, Callable[[int], metaopt.PTEstimator]]]:
    neumann = lambda j: metaopt.Neumann(terms=j)  # noqa: E731
    cg = lambda i: metaopt.ConjugateGradient(iterations=i, tol=0.0)  # noqa: E731
    unrolled = lambda t: metaopt.UnrolledPT(steps=t, replay_tol=1.0)  # noqa: E731
    rows = [("Neumann J", j, neumann) for j in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)]
    rows += [("CG iterations", i, cg) for i in (1, 2, 5, 10, 20, 50, 100)]
    rows += [("UnrolledPT T", t, unrolled) for t in (1, 2, 5, 10, 20, 50, 100, 200)]
    rows += [("FirstOrder", 0, lambda _: metaopt.FirstOrder())]
    return rows


def _mlp_rows(seed: int) -> dict[str, Any]:
    base = build_mlp(seed)
    state = copy.deepcopy({"model": base.model.state_dict(), "head": base.head.state_dict()})
    exact, spectrum = exact_hypergradient(build_mlp(seed))

    def fresh() -> Problem:
        base.model.load_state_dict(state["model"])
        base.head.load_state_dict(state["head"])
        return base

    rows = []
    for family, value, make in _sweep():
        got = _metaopt_hypergradient(fresh(), make(value))
        rows.append({"estimator": family, "value": value,
                     "cosine": cosine(got, exact), "relative_error": relative_difference(got,
                                                                                          exact)})
    got = _metaopt_hypergradient(fresh(), metaopt.ExactSolve())
    rows.append({"estimator": "ExactSolve", "value": 0, "cosine": cosine(got, exact),
                 "relative_error": relative_difference(got, exact)})
    return {"pt_parameters": sum(p.numel() for p in base.theta), "alpha": base.pt_lr,
            **spectrum, "rows": rows}


def _ridge_rows() -> dict[str, Any]:
    from tests.problems import RidgeProblem

    problem = RidgeProblem()
    alpha = 1.0 / problem.hessian_max_eigenvalue()
    exact = problem.exact_hypergradient(problem.phi0, ft_steps=1, ft_lr=0.1)
    rows = []
    for family, value, make in _sweep():
        estimator = make(value)
        meta, phi, encoder = problem.build(estimator, ft_steps=1, ft_lr=0.1, pt_lr=alpha)
        closure = lambda: problem.pt_loss_of(encoder.weight, phi)  # noqa: E731
        if isinstance(estimator, metaopt.UnrolledPT):
            for _ in range(estimator.steps):
                meta.zero_grad()
                closure().backward()
                meta.step(loss_fn=closure)
        before = phi.detach().clone()
        meta.hyperstep(closure)  # the meta-optimizer is SGD with lr 1
        got = [before - phi.detach()]
        rows.append({"estimator": family, "value": value, "cosine": cosine(got, [exact]),
                     "relative_error": relative_difference(got, [exact])})
    return {"pt_parameters": problem.dim, "alpha": alpha, "rows": rows}


def run(seed: int = 0) -> dict[str, Any]:
    """Sweep J, CG iterations and T on both problems; return the rows.

    Both problems are small and float64, so this section always runs on the CPU.
    """
    logger.info("accuracy: MLP problem")
    mlp = _mlp_rows(seed)
    logger.info("accuracy: ridge problem")
    try:
        ridge = _ridge_rows()
    except ImportError as error:
        ridge = {"status": "skipped", "error": f"tests.problems not importable: {error}"}
    return {"mlp": mlp, "ridge": ridge}
