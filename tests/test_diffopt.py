"""Differentiable optimizers against torch.optim, step by step, in float64."""

from __future__ import annotations

import pytest
import torch

from metaopt._diffopt import export_state, make_differentiable

CONFIGS = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05}),
    (torch.optim.SGD, {"lr": 0.1, "maximize": True}),
    (torch.optim.Adam, {"lr": 0.05}),
    (torch.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
    (torch.optim.Adam, {"lr": 0.05, "amsgrad": True}),
    (torch.optim.Adam, {"lr": 0.05, "maximize": True}),
    (torch.optim.AdamW, {"lr": 0.05}),
    (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.3, "amsgrad": True}),
]


def _problem() -> tuple[list[torch.Tensor], callable]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, dtype=torch.float64, generator=gen)
    y = torch.randn(32, dtype=torch.float64, generator=gen)
    params = [
        torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_(),
        torch.zeros(1, dtype=torch.float64).requires_grad_(),
    ]

    def loss_of(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ w + b) - y).pow(2).mean() + 0.01 * w.pow(4).sum()

    return params, loss_of


def _ids(config) -> str:
    cls, kwargs = config
    return cls.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("config", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_trajectory_matches_torch_optim(config) -> None:
    cls, kwargs = config
    params, loss_of = _problem()
    optimizer = cls(params, **kwargs)
    for _ in range(2):  # start from a non-empty optimizer state
        optimizer.zero_grad()
        loss_of(*params).backward()
        optimizer.step()

    diffopt = make_differentiable(optimizer, params)
    fast = [p.detach().clone().requires_grad_() for p in params]
    for step in range(8):
        fast = diffopt.step(loss_of(*fast), params=fast)
        optimizer.zero_grad()
        loss_of(*params).backward()
        optimizer.step()
        for got, expected in zip(fast, params):
            torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15, msg=f"step {step}")


@pytest.mark.parametrize("config", CONFIGS[:2] + CONFIGS[5:7], ids=[_ids(c) for c in CONFIGS[:2] + CONFIGS[5:7]])
def test_exported_state_continues_like_torch(config) -> None:
    cls, kwargs = config
    params, loss_of = _problem()
    reference = [p.detach().clone().requires_grad_() for p in params]
    optimizer = cls(params, **kwargs)
    reference_optimizer = cls(reference, **kwargs)

    diffopt = make_differentiable(optimizer, params)
    fast = diffopt.step(loss_of(*params), params=params)
    with torch.no_grad():
        for p, new in zip(params, fast):
            p.copy_(new)
    export_state(diffopt, optimizer)
    reference_optimizer.zero_grad()
    loss_of(*reference).backward()
    reference_optimizer.step()

    for opt in (optimizer, reference_optimizer):
        opt.zero_grad()
        loss_of(*opt.param_groups[0]["params"]).backward()
        opt.step()
    for got, expected in zip(params, reference):
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)


def test_scheduler_learning_rate_is_honoured() -> None:
    params, loss_of = _problem()
    optimizer = torch.optim.SGD(params, lr=1.0, momentum=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        loss_of(*params).backward()
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)

    diffopt = make_differentiable(optimizer, params)
    fast = diffopt.step(loss_of(*params), params=[p.detach().requires_grad_() for p in params])
    optimizer.zero_grad()
    loss_of(*params).backward()
    optimizer.step()
    for got, expected in zip(fast, params):
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)


def test_adam_zero_gradient_entries_have_finite_second_order() -> None:
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=0.1)
    diffopt = make_differentiable(optimizer, [w])

    (new_w,) = diffopt.step(scale * w[0] ** 2, params=[w])  # w[1] gets a zero gradient
    (grad,) = torch.autograd.grad(new_w.sum(), scale)

    assert torch.isfinite(grad)


def test_unsupported_optimizer_is_rejected() -> None:
    params, _ = _problem()
    with pytest.raises(TypeError, match="cannot differentiate through RMSprop.*SGD"):
        make_differentiable(torch.optim.RMSprop(params), params)
