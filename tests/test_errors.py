"""Every documented failure: the error type and the message that names the value and the fix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import metaopt
from tests.problems import RidgeProblem


def _ft(head: nn.Module, **kwargs) -> metaopt.FineTune:
    batches = [(torch.randn(4, 3), torch.randn(4, 1))]
    options = {"loss": lambda m, h, b: (h(m(b[0])) - b[1]).pow(2).mean(),
               "train": batches, "val": batches}
    options.update(kwargs)
    return metaopt.FineTune(head, torch.optim.SGD(head.parameters(), lr=0.1), **options)


def _wrapper(phi: torch.Tensor, **kwargs) -> tuple[metaopt.MetaPTOptimizer, nn.Module]:
    model = nn.Linear(3, 3)
    options = {
        "meta_optimizer": torch.optim.SGD([phi], lr=1.0),
        "finetune": _ft(nn.Linear(3, 1)),
    }
    options.update(kwargs)
    return metaopt.MetaPTOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), **options), model


def test_param_rejects_integer_tensor() -> None:
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        metaopt.Param(torch.zeros(3, dtype=torch.long))


def test_param_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match="expects a tensor or an nn.Module, got list"):
        metaopt.Param([1.0, 2.0])


def test_param_of_module_marks_all_parameters() -> None:
    net = metaopt.Param(nn.Linear(2, 2), name="aug")
    assert all(metaopt.is_meta(p) for p in net.parameters())


def test_meta_parameter_in_pt_optimizer_is_rejected() -> None:
    model = nn.Linear(3, 3)
    phi = metaopt.Param(torch.zeros(2), name="task_logits")
    pt_opt = torch.optim.SGD(list(model.parameters()) + [phi], lr=0.1)
    with pytest.raises(ValueError, match="Meta-parameter task_logits is in the PT optimizer"):
        metaopt.MetaPTOptimizer(
            model, pt_opt, meta_optimizer=torch.optim.SGD([phi], lr=1.0),
            finetune=_ft(nn.Linear(3, 1)),
        )


def test_marked_module_in_pt_optimizer_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(3, 3), metaopt.mark_module(nn.Linear(3, 3), name="aug"))
    with pytest.raises(ValueError, match=r"Meta-parameter aug.weight is in the PT optimizer"):
        metaopt.MetaPTOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1),
            meta_optimizer=torch.optim.SGD(model[1].parameters(), lr=1.0),
            finetune=_ft(nn.Linear(3, 1)),
        )


def test_head_shared_with_pt_model_is_rejected() -> None:
    model = nn.Linear(3, 3)
    phi = metaopt.Param(torch.zeros(2))
    ft = metaopt.FineTune(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          loss=lambda m, h, b: m(b).sum(), train=[1], val=[1])
    with pytest.raises(ValueError, match="FT head parameter .* is also in the PT optimizer"):
        metaopt.MetaPTOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1),
            meta_optimizer=torch.optim.SGD([phi], lr=1.0), finetune=ft,
        )


def test_unreached_meta_parameter_is_named() -> None:
    used = metaopt.Param(torch.zeros(3), name="used")
    unused = metaopt.Param(torch.zeros(2), name="forgotten")
    meta, model = _wrapper(used, meta_optimizer=torch.optim.SGD([used, unused], lr=1.0))
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="forgotten do not affect the gradient of the PT loss"):
        meta.hyperstep(lambda: (torch.sigmoid(used) * model(x)).pow(2).mean())


def test_meta_parameter_outside_model_term_is_unreached() -> None:
    phi = metaopt.Param(torch.zeros(3), name="offset")
    meta, model = _wrapper(phi)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="offset do not affect the gradient"):
        meta.hyperstep(lambda: model(x).pow(2).mean() + phi.sum())


def test_nonfinite_pt_loss_raises_and_keeps_phi() -> None:
    phi = metaopt.Param(torch.zeros(3), name="logits")
    meta, model = _wrapper(phi)
    x = torch.randn(4, 3)
    with pytest.raises(FloatingPointError, match=r"PT loss is not finite \(nan\)"):
        meta.hyperstep(lambda: (phi * model(x)).sum() * float("nan"))
    assert torch.count_nonzero(phi) == 0


def test_nonfinite_hypergradient_warns_and_keeps_phi() -> None:
    phi = metaopt.Param(torch.zeros(3), name="logits")
    meta, model = _wrapper(phi, on_nonfinite="warn")
    x = torch.randn(4, 3)
    with pytest.warns(metaopt.MetaOptWarning, match="hypergradient of logits is not finite"):
        record = meta.hyperstep(lambda: (torch.sqrt(phi) * model(x)).pow(2).mean())
    assert not record.applied
    assert torch.count_nonzero(phi) == 0


def test_nonfinite_val_loss_raises() -> None:
    phi = metaopt.Param(torch.zeros(3))
    batches = [(torch.randn(4, 3), torch.randn(4, 1))]
    ft = _ft(nn.Linear(3, 1), loss=lambda m, h, b: h(m(b[0])).sum() * math.inf,
             train=batches, val=batches)
    meta, model = _wrapper(phi, finetune=ft)
    with pytest.raises(FloatingPointError, match="meta-FT val loss is not finite"):
        meta.hyperstep(lambda: (phi * model(torch.randn(4, 3))).pow(2).mean())


def test_neumann_divergence_is_reported_with_fix() -> None:
    problem = RidgeProblem(seed=0)
    lam_max = problem.hessian_max_eigenvalue()
    meta, phi, encoder = problem.build(metaopt.Neumann(terms=10, alpha=3.0 / lam_max))
    before = phi.detach().clone()

    with pytest.warns(metaopt.MetaOptWarning, match=r"Neumann series diverges.*> 2. Pass "
                      r"Neumann\(alpha=\.\.\.\) below"):
        record = meta.hyperstep(lambda: problem.pt_loss_of(encoder.weight, phi))

    assert record.diverged
    assert record.curvature * 3.0 / lam_max > 2
    assert not record.applied
    torch.testing.assert_close(phi.detach(), before, rtol=0, atol=0)


def test_neumann_divergence_can_raise() -> None:
    problem = RidgeProblem(seed=0)
    meta, phi, encoder = problem.build(metaopt.Neumann(terms=3, alpha=10.0))
    meta.on_divergence = "raise"
    with pytest.raises(FloatingPointError, match="Neumann series diverges"):
        meta.hyperstep(lambda: problem.pt_loss_of(encoder.weight, phi))


def test_converging_neumann_is_not_flagged() -> None:
    problem = RidgeProblem(seed=0)
    meta, phi, encoder = problem.build(
        metaopt.Neumann(terms=10, alpha=1.0 / problem.hessian_max_eigenvalue())
    )
    record = meta.hyperstep(lambda: problem.pt_loss_of(encoder.weight, phi))
    assert not record.diverged


def test_unrolled_pt_requires_loss_fn() -> None:
    phi = metaopt.Param(torch.zeros(3))
    meta, _ = _wrapper(phi, pt_estimator=metaopt.UnrolledPT(steps=2))
    with pytest.raises(ValueError, match=r"step\(\) needs the step's loss"):
        meta.step()


def test_unrolled_pt_without_records_is_rejected() -> None:
    phi = metaopt.Param(torch.zeros(3))
    meta, _ = _wrapper(phi, pt_estimator=metaopt.UnrolledPT(steps=2))
    with pytest.raises(ValueError, match="no recorded PT steps yet"):
        meta.hyperstep()


def test_unrolled_pt_warns_on_irreproducible_loss_fn() -> None:
    phi = metaopt.Param(torch.zeros(3), name="logits")
    meta, model = _wrapper(phi, pt_estimator=metaopt.UnrolledPT(steps=2))
    batches = iter([torch.randn(4, 3) for _ in range(4)])
    for _ in range(2):
        meta.zero_grad()
        (torch.sigmoid(phi) * model(next(batches))).pow(2).mean().backward()
        # The closure draws the next batch instead of reusing this step's batch.
        meta.step(loss_fn=lambda: (torch.sigmoid(phi) * model(next(batches))).pow(2).mean())
    with pytest.warns(metaopt.MetaOptWarning, match="capture the batch in the closure"):
        meta.hyperstep()


def test_implicit_estimator_requires_pt_loss() -> None:
    phi = metaopt.Param(torch.zeros(3))
    meta, _ = _wrapper(phi)
    with pytest.raises(ValueError, match=r"Neumann needs the PT loss: call meta.hyperstep\("):
        meta.hyperstep()


def test_pt_loss_must_be_scalar() -> None:
    phi = metaopt.Param(torch.zeros(3))
    meta, model = _wrapper(phi)
    with pytest.raises(ValueError, match=r"must return a scalar tensor, got \(4, 3\)"):
        meta.hyperstep(lambda: phi * model(torch.randn(4, 3)))


def test_ft_loss_must_be_scalar() -> None:
    phi = metaopt.Param(torch.zeros(3))
    batches = [torch.randn(4, 3)]
    ft = _ft(nn.Linear(3, 1), loss=lambda m, h, b: h(m(b)), train=batches, val=batches)
    meta, model = _wrapper(phi, finetune=ft)
    with pytest.raises(ValueError, match=r"FT train loss must be a scalar tensor, got \(4, 1\)"):
        meta.hyperstep(lambda: (phi * model(torch.randn(4, 3))).sum())


def test_unsupported_pt_optimizer_for_unrolled() -> None:
    model = nn.Linear(3, 3)
    phi = metaopt.Param(torch.zeros(3))
    with pytest.raises(TypeError, match="cannot differentiate through Adagrad"):
        metaopt.MetaPTOptimizer(
            model, torch.optim.Adagrad(model.parameters()),
            meta_optimizer=torch.optim.SGD([phi], lr=1.0), finetune=_ft(nn.Linear(3, 1)),
            pt_estimator=metaopt.UnrolledPT(steps=1),
        )


def test_unsupported_ft_optimizer() -> None:
    head = nn.Linear(3, 1)
    with pytest.raises(TypeError, match="cannot differentiate through RMSprop"):
        metaopt.FineTune(head, torch.optim.RMSprop(head.parameters()),
                         loss=lambda m, h, b: 0, train=[1], val=[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "linear"}, "mode must be one of"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"train": iter([1])}, "must be re-iterable"),
        ({"implicit_damping": -1.0}, "implicit_damping must be a finite number >= 0, got -1.0"),
        ({"implicit_damping": float("nan")}, "implicit_damping must be a finite number >= 0"),
    ],
)
def test_finetune_arguments_are_checked(kwargs, message) -> None:
    head = nn.Linear(3, 1)
    options = {"loss": lambda m, h, b: 0, "train": [1], "val": [1], **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        metaopt.FineTune(head, torch.optim.SGD(head.parameters(), lr=0.1), **options)


def test_empty_ft_batches_are_reported() -> None:
    phi = metaopt.Param(torch.zeros(3))
    meta, model = _wrapper(phi, finetune=_ft(nn.Linear(3, 1), train=[]))
    with pytest.raises(ValueError, match="FineTune train yielded no batches"):
        meta.hyperstep(lambda: (phi * model(torch.randn(4, 3))).sum())


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: metaopt.Neumann(terms=-1), "Neumann terms must be an integer >= 0"),
        (lambda: metaopt.Neumann(alpha=0.0), "Neumann alpha must be a finite number > 0"),
        (lambda: metaopt.ConjugateGradient(iterations=0), "iterations must be an integer >= 1"),
        (lambda: metaopt.ConjugateGradient(damping=-1.0), "damping must be a finite number"),
        (lambda: metaopt.UnrolledPT(steps=0), "UnrolledPT steps must be an integer >= 1"),
    ],
)
def test_estimator_arguments_are_checked(factory, message) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_exact_solve_rejects_large_models() -> None:
    phi = metaopt.Param(torch.zeros(3))
    meta, model = _wrapper(phi, pt_estimator=metaopt.ExactSolve(max_params=5))
    with pytest.raises(ValueError, match="dense Hessian of 12 PT parameters, more than max_params=5"):
        meta.hyperstep(lambda: (phi * model(torch.randn(4, 3))).pow(2).sum())


def test_wrong_argument_types_are_named() -> None:
    phi = metaopt.Param(torch.zeros(3))
    with pytest.raises(TypeError, match="finetune must be a metaopt.FineTune, got dict"):
        _wrapper(phi, finetune={})
    with pytest.raises(TypeError, match="pt_estimator must be a metaopt PT estimator"):
        _wrapper(phi, pt_estimator="neumann")
    with pytest.raises(ValueError, match="on_divergence must be one of"):
        _wrapper(phi, on_divergence="ignore")


def test_mixed_dtypes_are_rejected() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3).double())
    phi = metaopt.Param(torch.zeros(3))
    with pytest.raises(ValueError, match="one device with one dtype"):
        metaopt.MetaPTOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1),
            meta_optimizer=torch.optim.SGD([phi], lr=1.0), finetune=_ft(nn.Linear(3, 1)),
        )


def _indefinite_quadratic(estimator: metaopt.PTEstimator, theta0: list[float]):
    """Return a wrapper whose PT loss is ``0.5 theta^T diag(-0.5, 1) theta - phi . theta``."""
    theta = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    phi = metaopt.Param(torch.tensor([1.0, 1.0], dtype=torch.float64), name="scale")
    model = nn.Module()
    model.theta = theta
    head = nn.Linear(2, 1).double()
    batches = [torch.ones(1, 2, dtype=torch.float64)]
    ft = metaopt.FineTune(head, torch.optim.SGD(head.parameters(), lr=0.1),
                          loss=lambda m, h, b: h(b * m.theta).pow(2).sum(), train=batches,
                          val=batches)
    meta = metaopt.MetaPTOptimizer(
        model, torch.optim.SGD([theta], lr=0.5), meta_optimizer=torch.optim.SGD([phi], lr=1.0),
        finetune=ft, pt_estimator=estimator,
    )
    hessian = torch.tensor([-0.5, 1.0], dtype=torch.float64)  # one negative eigenvalue
    return meta, lambda: 0.5 * (hessian * theta.pow(2)).sum() - (phi * theta).sum()


def test_neumann_growth_from_negative_curvature_is_flagged() -> None:
    meta, pt_loss = _indefinite_quadratic(metaopt.Neumann(terms=30), [0.0, 0.0])

    with pytest.warns(metaopt.MetaOptWarning, match="Neumann series grows.*negative curvature"):
        record = meta.hyperstep(pt_loss)

    assert record.diverged
    assert record.min_curvature < 0
    assert not record.applied


def test_exact_solve_flags_indefinite_hessian() -> None:
    meta, pt_loss = _indefinite_quadratic(metaopt.ExactSolve(), [0.3, 0.1])

    with pytest.warns(metaopt.MetaOptWarning, match="non-positive curvature"):
        record = meta.hyperstep(pt_loss)

    assert record.diverged
    assert record.min_curvature == pytest.approx(-0.5)
    assert record.curvature == pytest.approx(1.0)


def test_detached_ft_features_warn_not_silent() -> None:
    phi = metaopt.Param(torch.zeros(3), name="logits")
    batches = [(torch.randn(4, 3), torch.randn(4, 1))]
    ft = _ft(nn.Linear(3, 1), loss=lambda m, h, b: (h(m(b[0]).detach()) - b[1]).pow(2).mean(),
             train=batches, val=batches)
    meta, model = _wrapper(phi, finetune=ft)
    with pytest.warns(metaopt.MetaOptWarning, match=r"without torch.no_grad\(\) or .detach\(\)"):
        record = meta.hyperstep(lambda: (torch.sigmoid(phi) * model(torch.randn(4, 3))).sum())
    assert not record.applied
    assert torch.count_nonzero(phi) == 0


def test_nonfinite_ft_keeps_head_and_state() -> None:
    phi = metaopt.Param(torch.zeros(3), name="logits")
    bad = [(torch.randn(4, 3), torch.full((4, 1), float("inf")))]
    head = nn.Linear(3, 1)
    before = [p.detach().clone() for p in head.parameters()]
    meta, model = _wrapper(phi, finetune=_ft(head, train=bad), on_nonfinite="warn")
    with pytest.warns(metaopt.MetaOptWarning, match="not finite"):
        meta.hyperstep(lambda: (torch.sigmoid(phi) * model(torch.randn(4, 3))).sum())
    for param, old in zip(head.parameters(), before):
        assert torch.equal(param.detach(), old)
    assert len(meta.finetune.optimizer.state) == 0


@pytest.mark.parametrize("mode", ["implicit", "head"])
def test_frozen_head_parameter_stays_frozen(mode: str) -> None:
    phi = metaopt.Param(torch.zeros(3), name="logits")
    head = nn.Linear(3, 1)
    head.bias.requires_grad_(False)
    bias = head.bias.detach().clone()
    meta, model = _wrapper(phi, finetune=_ft(head, mode=mode))
    meta.hyperstep(lambda: (torch.sigmoid(phi) * model(torch.randn(4, 3))).pow(2).sum())
    assert torch.equal(head.bias.detach(), bias)
    assert not torch.equal(head.weight.detach(), torch.zeros_like(head.weight))


def test_frozen_pt_parameter_with_unrolled_pt() -> None:
    phi = metaopt.Param(torch.zeros(3), name="logits")
    model = nn.Linear(3, 3)
    model.bias.requires_grad_(False)
    meta = metaopt.MetaPTOptimizer(
        model, torch.optim.Adam(model.parameters(), lr=0.1),
        meta_optimizer=torch.optim.SGD([phi], lr=1.0), finetune=_ft(nn.Linear(3, 1)),
        pt_estimator=metaopt.UnrolledPT(steps=2),
    )
    x = torch.randn(4, 3)
    for _ in range(2):
        meta.zero_grad()
        (torch.sigmoid(phi) * model(x)).pow(2).sum().backward()
        meta.step(loss_fn=lambda: (torch.sigmoid(phi) * model(x)).pow(2).sum())
    assert meta.hyperstep().applied


def test_pt_parameter_outside_model_is_rejected_for_unrolled() -> None:
    encoder, pt_head = nn.Linear(3, 3), nn.Linear(3, 2)
    phi = metaopt.Param(torch.zeros(2))
    with pytest.raises(ValueError, match=r"2 PT optimizer parameter\(s\) with shapes \[\(2, 3\), "
                       r"\(2,\)\] are not in the model"):
        metaopt.MetaPTOptimizer(
            encoder, torch.optim.SGD([*encoder.parameters(), *pt_head.parameters()], lr=0.1),
            meta_optimizer=torch.optim.SGD([phi], lr=1.0), finetune=_ft(nn.Linear(3, 1)),
            pt_estimator=metaopt.UnrolledPT(steps=1),
        )


def test_reused_nan_loss_still_fills_grads() -> None:
    phi = metaopt.Param(torch.zeros(3), name="logits")
    meta, model = _wrapper(phi, on_nonfinite="warn")
    loss = (torch.sigmoid(phi) * model(torch.randn(4, 3))).sum() * float("nan")
    with pytest.warns(metaopt.MetaOptWarning, match="PT loss is not finite"):
        meta.hyperstep(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_nonfinite_implicit_head_is_restored() -> None:
    phi = metaopt.Param(torch.zeros(3), name="logits")
    head = nn.Linear(3, 1)
    before = [p.detach().clone() for p in head.parameters()]
    train = [(torch.randn(4, 3), torch.full((4, 1), 1e30))]  # the head step overflows
    val = [(torch.randn(4, 3), torch.randn(4, 1))]
    ft = metaopt.FineTune(head, torch.optim.SGD(head.parameters(), lr=1e10),
                          loss=lambda m, h, b: (h(m(b[0])) - b[1]).pow(2).mean(),
                          train=train, val=val, mode="implicit")
    meta, model = _wrapper(phi, finetune=ft, on_nonfinite="warn")
    with pytest.warns(metaopt.MetaOptWarning, match="not finite"):
        record = meta.hyperstep(lambda: (torch.sigmoid(phi) * model(torch.randn(4, 3))).sum())
    assert not record.applied
    for param, old in zip(head.parameters(), before):
        assert torch.equal(param.detach(), old)
