"""Small bilevel problems with exact hypergradients, shared by the tests."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import metaopt

__all__ = ["RidgeProblem", "Vector"]


class Vector(nn.Module):
    """A module whose only parameter is one vector, used as encoder or head."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value.clone())


@dataclasses.dataclass
class RidgeProblem:
    """Weighted ridge regression PT over tasks, a linear FT head on ``x * theta``.

    PT: ``L_PT(theta, phi) = sum_t w_t ||X_t theta - y_t||^2 / (2 n) + lam/2 ||theta||^2`` with
    ``w = 2 sigmoid(phi)``, so ``theta*(phi) = (sum_t w_t A_t + lam I)^-1 sum_t w_t b_t``.
    FT: ``L(theta, psi) = mean((tanh(Z * theta) psi - u)^2)`` on a train and a val split.
    """

    tasks: int = 3
    dim: int = 4
    n: int = 16
    lam: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        kw = {"dtype": torch.float64, "generator": gen}
        self.x = torch.randn(self.tasks, self.n, self.dim, **kw)
        self.y = torch.randn(self.tasks, self.n, **kw)
        self.z_train = torch.randn(self.n, self.dim, **kw)
        self.u_train = torch.randn(self.n, **kw)
        self.z_val = torch.randn(self.n, self.dim, **kw)
        self.u_val = torch.randn(self.n, **kw)
        self.psi0 = torch.randn(self.dim, **kw)
        self.phi0 = 0.5 * torch.randn(self.tasks, **kw)

    def pt_loss_of(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        weights = 2 * torch.sigmoid(phi)
        residual = torch.einsum("tnd,d->tn", self.x, theta) - self.y
        per_task = residual.pow(2).sum(dim=1) / (2 * self.n)
        return (weights * per_task).sum() + 0.5 * self.lam * theta.pow(2).sum()

    def theta_star(self, phi: torch.Tensor) -> torch.Tensor:
        weights = 2 * torch.sigmoid(phi)
        a = torch.einsum("t,tnd,tne->de", weights, self.x, self.x) / self.n
        b = torch.einsum("t,tnd,tn->d", weights, self.x, self.y) / self.n
        return torch.linalg.solve(a + self.lam * torch.eye(self.dim, dtype=torch.float64), b)

    @staticmethod
    def ft_loss_of(theta: torch.Tensor, psi: torch.Tensor, z: torch.Tensor, u: torch.Tensor):
        return (torch.tanh(z * theta) @ psi - u).pow(2).mean()

    def exact_hypergradient(self, phi: torch.Tensor, ft_steps: int, ft_lr: float) -> torch.Tensor:
        """``dL_val/dphi`` by autograd through the closed form and ``K`` plain SGD head steps."""
        phi = phi.detach().clone().requires_grad_()
        theta = self.theta_star(phi)
        psi = self.psi0.clone().requires_grad_()
        for _ in range(ft_steps):
            loss = self.ft_loss_of(theta, psi, self.z_train, self.u_train)
            (grad,) = torch.autograd.grad(loss, psi, create_graph=True)
            psi = psi - ft_lr * grad
        val = self.ft_loss_of(theta, psi, self.z_val, self.u_val)
        (hypergrad,) = torch.autograd.grad(val, phi)
        return hypergrad

    def build(
        self,
        estimator: metaopt.PTEstimator,
        *,
        ft_steps: int = 1,
        ft_lr: float = 0.1,
        pt_lr: float = 0.05,
        mode: str = "head",
    ) -> tuple[metaopt.MetaPTOptimizer, metaopt.Param, nn.Module]:
        """Return a wrapper whose model sits exactly at ``theta*(phi0)``."""
        phi = metaopt.Param(self.phi0.clone(), name="task_logits")
        encoder = Vector(self.theta_star(self.phi0))
        head = Vector(self.psi0)

        def ft_loss(model: nn.Module, head: nn.Module, batch) -> torch.Tensor:
            z, u = batch
            return self.ft_loss_of(model.weight, head.weight, z, u)

        finetune = metaopt.FineTune(
            head,
            torch.optim.SGD(head.parameters(), lr=ft_lr),
            loss=ft_loss,
            train=[(self.z_train, self.u_train)],
            val=[(self.z_val, self.u_val)],
            steps=ft_steps,
            mode=mode,
        )
        meta = metaopt.MetaPTOptimizer(
            encoder,
            torch.optim.SGD(encoder.parameters(), lr=pt_lr),
            meta_optimizer=torch.optim.SGD([phi], lr=1.0),
            finetune=finetune,
            pt_estimator=estimator,
        )
        return meta, phi, encoder

    def hessian_max_eigenvalue(self) -> float:
        theta = self.theta_star(self.phi0).requires_grad_()
        hess = torch.autograd.functional.hessian(lambda t: self.pt_loss_of(t, self.phi0), theta)
        return torch.linalg.eigvalsh(hess).max().item()
