"""Hypothesis properties of hyperstep over random sizes, task counts, K, J, T and seeds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import metaopt

ESTIMATORS = st.one_of(
    st.builds(metaopt.Neumann, terms=st.integers(0, 4)),
    st.builds(metaopt.ConjugateGradient, iterations=st.integers(1, 6), damping=st.just(10.0)),
    st.just(metaopt.FirstOrder()),
    st.builds(metaopt.UnrolledPT, steps=st.integers(1, 3)),
)


def _setup(seed: int, dim: int, tasks: int, ft_steps: int, estimator, val_scale: float = 1.0,
           ignore_encoder: bool = False):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    kw = {"dtype": torch.float64, "generator": gen}
    encoder = nn.Sequential(nn.Linear(dim, dim), nn.Tanh()).double()
    pt_head = nn.Linear(dim, tasks).double()
    model = nn.ModuleDict({"encoder": encoder, "pt_head": pt_head})
    head = nn.Linear(dim, 1).double()
    phi = metaopt.Param(0.1 * torch.randn(tasks, **kw), name="logits")
    pt_batches = [(torch.randn(8, dim, **kw), torch.randn(8, tasks, **kw)) for _ in range(4)]
    ft_batches = [(torch.randn(8, dim, **kw), torch.randn(8, 1, **kw), 1.0) for _ in range(2)]
    val = [(torch.randn(8, dim, **kw), torch.randn(8, 1, **kw), val_scale)]

    def pt_loss(batch) -> torch.Tensor:
        x, y = batch
        per_task = (model["pt_head"](model["encoder"](x)) - y).pow(2).mean(dim=0)
        return (2 * torch.sigmoid(phi) * per_task).mean()

    def ft_loss(model, head, batch) -> torch.Tensor:
        x, y, scale = batch
        features = x if ignore_encoder else model["encoder"](x)
        return scale * (head(features) - y).pow(2).mean()

    meta = metaopt.MetaPTOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        meta_optimizer=torch.optim.SGD([phi], lr=1.0),
        finetune=metaopt.FineTune(
            head, torch.optim.SGD(head.parameters(), lr=0.1), loss=ft_loss,
            train=ft_batches, val=val, steps=ft_steps,
        ),
        pt_estimator=estimator,
    )
    for batch in pt_batches[:3]:
        meta.zero_grad()
        pt_loss(batch).backward()
        meta.step(loss_fn=lambda b=batch: pt_loss(b))
    return meta, phi, lambda: pt_loss(pt_batches[3])


def _hypergradient(meta, phi, closure) -> tuple[torch.Tensor, metaopt.HyperstepRecord]:
    before = phi.detach().clone()
    record = meta.hyperstep(closure)
    return before - phi.detach(), record


SIZES = {
    "seed": st.integers(0, 10_000),
    "dim": st.integers(1, 6),
    "tasks": st.integers(1, 5),
    "ft_steps": st.integers(1, 3),
    "estimator": ESTIMATORS,
}


@given(**SIZES)
def test_hypergradient_shape_and_finite(seed, dim, tasks, ft_steps, estimator) -> None:
    meta, phi, closure = _setup(seed, dim, tasks, ft_steps, estimator)
    grad, record = _hypergradient(meta, phi, closure)

    assert grad.shape == (tasks,)
    assert torch.isfinite(grad).all()
    assert math.isfinite(record.val_loss)
    assert math.isfinite(record.hypergrad_norm)
    assert record.hypergrad_norm == pytest.approx(torch.linalg.vector_norm(grad).item(), rel=1e-9)
    assert record.applied


@given(**SIZES)
def test_zero_when_val_ignores_encoder(seed, dim, tasks, ft_steps, estimator) -> None:
    meta, phi, closure = _setup(seed, dim, tasks, ft_steps, estimator, ignore_encoder=True)
    with pytest.warns(metaopt.MetaOptWarning, match="does not depend on any PT parameter"):
        grad, record = _hypergradient(meta, phi, closure)

    assert torch.count_nonzero(grad) == 0
    assert record.hypergrad_norm == 0.0
    assert not record.applied


@given(**SIZES, scale=st.floats(0.1, 10.0))
def test_linear_in_validation_loss(seed, dim, tasks, ft_steps, estimator, scale) -> None:
    base_meta, base_phi, base_closure = _setup(seed, dim, tasks, ft_steps, estimator)
    base, _ = _hypergradient(base_meta, base_phi, base_closure)
    meta, phi, closure = _setup(seed, dim, tasks, ft_steps, estimator, val_scale=scale)
    scaled, _ = _hypergradient(meta, phi, closure)

    torch.testing.assert_close(scaled, scale * base, rtol=1e-9, atol=1e-12)
