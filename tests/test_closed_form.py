"""Hypergradients on weighted ridge regression PT against the exact closed form."""

from __future__ import annotations

import pytest
import torch

import metaopt
from tests.problems import RidgeProblem


def _hypergradient(problem: RidgeProblem, estimator, **build_kwargs) -> tuple[torch.Tensor, object]:
    meta, phi, encoder = problem.build(estimator, **build_kwargs)
    before = phi.detach().clone()
    record = meta.hyperstep(lambda: problem.pt_loss_of(encoder.weight, phi))
    # The meta-optimizer is SGD with lr = 1, so the update is minus the hypergradient.
    return before - phi.detach(), record


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("ft_steps", [1, 3])
@pytest.mark.parametrize(
    "estimator",
    [metaopt.ExactSolve(), metaopt.ConjugateGradient(iterations=50, tol=1e-14)],
    ids=["exact", "cg"],
)
def test_exact_estimators_match_closed_form(estimator, ft_steps: int) -> None:
    problem = RidgeProblem(tasks=4, dim=5, seed=1)
    expected = problem.exact_hypergradient(problem.phi0, ft_steps, ft_lr=0.1)

    got, record = _hypergradient(problem, estimator, ft_steps=ft_steps)

    assert _relative_error(got, expected) < 1e-6
    assert record.residual < 1e-8
    assert record.applied


def test_neumann_converges_as_terms_grow() -> None:
    problem = RidgeProblem(tasks=3, dim=4, seed=2)
    expected = problem.exact_hypergradient(problem.phi0, 1, ft_lr=0.1)
    alpha = 1.0 / problem.hessian_max_eigenvalue()

    errors = []
    for terms in (0, 1, 5, 20, 80):
        got, _ = _hypergradient(problem, metaopt.Neumann(terms=terms, alpha=alpha))
        errors.append(_relative_error(got, expected))

    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


def test_neumann_default_alpha_is_pt_learning_rate() -> None:
    problem = RidgeProblem(seed=3)
    explicit, _ = _hypergradient(problem, metaopt.Neumann(terms=2, alpha=0.05), pt_lr=0.05)
    default, _ = _hypergradient(problem, metaopt.Neumann(terms=2), pt_lr=0.05)
    other, _ = _hypergradient(problem, metaopt.Neumann(terms=2), pt_lr=0.01)

    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert _relative_error(other, explicit) > 1e-3


def test_first_order_equals_identity_hessian() -> None:
    problem = RidgeProblem(seed=4)
    got, record = _hypergradient(problem, metaopt.FirstOrder())

    neumann_zero, _ = _hypergradient(problem, metaopt.Neumann(terms=0, alpha=1.0))

    torch.testing.assert_close(got, neumann_zero, rtol=1e-12, atol=1e-14)
    assert record.residual is None


def test_implicit_ft_matches_closed_form() -> None:
    problem = RidgeProblem(tasks=3, dim=4, seed=5)

    def exact(phi: torch.Tensor) -> torch.Tensor:
        phi = phi.detach().clone().requires_grad_()
        theta = problem.theta_star(phi)
        features = torch.tanh(problem.z_train * theta)
        psi = torch.linalg.solve(features.T @ features, features.T @ problem.u_train)
        val = problem.ft_loss_of(theta, psi, problem.z_val, problem.u_val)
        return torch.autograd.grad(val, phi)[0]

    meta, phi, encoder = problem.build(metaopt.ExactSolve(), mode="implicit", ft_lr=1e-9)
    theta = encoder.weight.detach()
    features = torch.tanh(problem.z_train * theta)
    with torch.no_grad():
        meta.finetune.head.weight.copy_(
            torch.linalg.solve(features.T @ features, features.T @ problem.u_train)
        )
    meta.finetune.implicit_iterations = 50

    before = phi.detach().clone()
    meta.hyperstep(lambda: problem.pt_loss_of(encoder.weight, phi))

    assert _relative_error(before - phi.detach(), exact(problem.phi0)) < 1e-6
