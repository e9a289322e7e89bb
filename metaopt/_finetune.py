"""The fine-tuning (FT) stage: ``v = dL_val/dtheta`` through FT of a head on the PT weights."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from . import _diffopt
from ._estimators import ConjugateGradient
from ._swap import swapped_parameters

__all__ = ["FineTune", "FTResult", "FT_MODES", "train_head"]

logger = logging.getLogger(__name__)

FT_MODES = ("head", "full", "implicit")

FTLoss = Callable[[nn.Module, nn.Module, Any], torch.Tensor]


class _BatchCycle:
    """An endless iterator over a re-iterable of batches that counts what it has consumed."""

    def __init__(self, batches: Iterable, name: str) -> None:
        if isinstance(batches, Iterator):
            raise TypeError(
                f"FineTune {name} must be re-iterable (a list, tuple or DataLoader), got the "
                f"one-shot iterator {type(batches).__name__}; pass list(...) of it instead."
            )
        self._batches = batches
        self._name = name
        self._iterator: Iterator | None = None
        self.consumed = 0

    def next(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self._batches)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self._batches)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(f"FineTune {self._name} yielded no batches.") from None
        self.consumed += 1
        return batch

    def fast_forward(self, consumed: int) -> None:
        """Restart and skip ``consumed`` batches, so a resumed run gets the same batches."""
        self._iterator = None
        self.consumed = 0
        skip = consumed
        if hasattr(self._batches, "__len__") and len(self._batches) > 0:
            # A sized collection restarts every len() batches, so whole passes need no replay.
            # NOTE: this assumes each pass yields the same batches (no reshuffling per pass).
            skip = consumed % len(self._batches)
        for _ in range(skip):
            self.next()
        self.consumed = consumed


class FineTune:
    """How the meta-objective fine-tunes the PT weights: a head, its optimizer, its data.

    The FT loss on a batch is ``loss(model, head, batch)``, a scalar tensor. During a hyperstep
    ``model`` and ``head`` are the user's modules with some parameters temporarily replaced by
    differentiable tensors, so ``loss`` simply calls them.

    Modes (``K = steps``):

    - ``"head"``: ``K`` differentiable steps of ``optimizer`` on the head with the encoder in
      eval mode, then ``L_val``. ``v`` is the gradient of ``L_val`` through the unrolled steps.
      Cost: ``K + 1`` forward and backward passes with a second-order graph over the head.
    - ``"full"``: as ``"head"``, but the PT parameters are fine-tuned too, with the
      hyperparameters of the first parameter group of ``optimizer`` and fresh optimizer state.
    - ``"implicit"``: ``K`` real optimizer steps of the head towards its optimum on frozen
      features, then the implicit function theorem for the head:
      ``v = dL_val/dtheta - (d2L_FT/(dtheta dpsi)) (H_psi + damping I)^-1 dL_val/dpsi``,
      solved with ``implicit_iterations`` CG steps. It assumes the head is near an optimum.

    The head is carried forward between hypersteps: after the FT stage the head and ``optimizer``
    hold the result of the ``K`` steps, as if they had been taken with ``optimizer.step()``.

    Args:
        head: the FT head module.
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` over the head's parameters.
        loss: ``loss(model, head, batch) -> Tensor`` (a scalar).
        train: meta-FT train batches (re-iterable; cycled). ``K`` are used per hyperstep.
        val: meta-FT val batches (re-iterable; cycled). One is used per hyperstep.
        steps: ``K``, the number of FT steps per hyperstep.
        mode: ``"head"``, ``"full"`` or ``"implicit"``.
        encoder_eval: put the model in eval mode during the FT stage (dropout off, BatchNorm
            on running statistics), as the reference implementation does.
        implicit_iterations: CG iterations of the ``"implicit"`` mode.
        implicit_damping: ridge added to the head Hessian in the ``"implicit"`` mode.
    """

    def __init__(
        self,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss: FTLoss,
        train: Iterable,
        val: Iterable,
        steps: int = 1,
        mode: str = "head",
        encoder_eval: bool = True,
        implicit_iterations: int = 20,
        implicit_damping: float = 0.0,
    ) -> None:
        if not isinstance(head, nn.Module):
            raise TypeError(f"FineTune head must be an nn.Module, got {type(head).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"FineTune optimizer must be a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}."
            )
        if not callable(loss):
            raise TypeError("FineTune loss must be callable as loss(model, head, batch).")
        if mode not in FT_MODES:
            raise ValueError(f"FineTune mode must be one of {FT_MODES}, got {mode!r}.")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"FineTune steps must be an integer >= 1, got {steps!r}.")
        if not isinstance(implicit_iterations, int) or implicit_iterations < 1:
            raise ValueError(
                f"FineTune implicit_iterations must be an integer >= 1, got "
                f"{implicit_iterations!r}."
            )
        if not math.isfinite(implicit_damping) or implicit_damping < 0:
            raise ValueError(
                f"FineTune implicit_damping must be a finite number >= 0, got {implicit_damping!r}."
            )
        _diffopt._check_supported(optimizer)

        self.head = head
        self.optimizer = optimizer
        self.loss = loss
        self.train = _BatchCycle(train, "train")
        self.val = _BatchCycle(val, "val")
        self.steps = steps
        self.mode = mode
        self.encoder_eval = encoder_eval
        self.implicit_iterations = implicit_iterations
        self.implicit_damping = implicit_damping

    @property
    def params(self) -> list[torch.Tensor]:
        """The head parameters that ``optimizer`` trains (``requires_grad``), in group order."""
        return [
            p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad
        ]


@dataclasses.dataclass
class FTResult:
    """Output of the FT stage: ``v`` per PT parameter and the two FT losses.

    ``reaches_theta`` is False when the validation loss has no graph to any PT parameter
    (features computed under ``torch.no_grad()`` or detached), so ``v`` is zero by construction.
    """

    v: list[torch.Tensor]
    val_loss: torch.Tensor
    train_loss: torch.Tensor
    reaches_theta: bool = True


def _grads_or_zeros(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    **kwargs: Any,
) -> list[torch.Tensor]:
    grads = _grads_or_none(outputs, inputs, **kwargs)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _grads_or_none(
    outputs: torch.Tensor | Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], **kwargs: Any
) -> list[torch.Tensor | None]:
    single = isinstance(outputs, torch.Tensor)
    if single and not outputs.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(outputs, list(inputs), allow_unused=True, **kwargs))


def _val_gradient(val_loss: torch.Tensor, theta: Sequence[torch.Tensor]) -> tuple[list, bool]:
    """Return ``dL_val/dtheta`` (zeros where unused) and whether any PT parameter is reached."""
    if not torch.isfinite(val_loss):
        return [], True
    grads = _grads_or_none(val_loss, theta)
    reaches = any(g is not None for g in grads)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, theta)], reaches


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _full_optimizer(ft: FineTune, theta: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """Build an optimizer like ``ft.optimizer`` with one more group for the PT parameters."""
    hyper = {k: v for k, v in ft.optimizer.param_groups[0].items() if k != "params"}
    groups = [dict(g) for g in ft.optimizer.param_groups] + [{**copy.deepcopy(hyper),
                                                             "params": list(theta)}]
    combined = type(ft.optimizer)(groups)
    for param in ft.params:
        if param in ft.optimizer.state:
            combined.state[param] = ft.optimizer.state[param]
    return combined


def unrolled_ft(ft: FineTune, model: nn.Module, theta: Sequence[torch.Tensor]) -> FTResult:
    """Run ``K`` differentiable FT steps and return ``v = dL_val/dtheta`` through them.

    The head (and in ``"full"`` mode the PT parameters) move along the unrolled trajectory;
    ``v`` is the gradient of ``L_val`` at the end with respect to the starting ``theta``.
    """
    head_params = ft.params
    full = ft.mode == "full"
    optimizer = _full_optimizer(ft, theta) if full else ft.optimizer
    moving = head_params + (list(theta) if full else [])
    diffopt = _diffopt.make_differentiable(optimizer, moving)

    fast = [p.detach().requires_grad_() for p in head_params]
    if full:
        fast += list(theta)
    # Only the head's parameters are replaced in "head" mode, so only the head is searched.
    modules = [model, ft.head] if full else [ft.head]
    train_losses = []
    for _ in range(ft.steps):
        batch = ft.train.next()
        with swapped_parameters(modules, moving, fast):
            loss = ft.loss(model, ft.head, batch)
        _check_scalar(loss, "FT train loss")
        train_losses.append(loss.detach())
        fast = diffopt.step(loss, params=fast)

    with swapped_parameters(modules, moving, fast):
        val_loss = ft.loss(model, ft.head, ft.val.next())
    _check_scalar(val_loss, "meta-FT val loss")
    v, reaches = _val_gradient(val_loss, theta)

    # A non-finite FT step would leave a broken head for every later hyperstep, so the head
    # and its optimizer move only when the whole FT stage is finite.
    new_head = fast[: len(head_params)]
    if torch.isfinite(val_loss) and _all_finite(new_head):
        with torch.no_grad():
            for param, new in zip(head_params, new_head):
                param.copy_(new)
        _diffopt.export_state(diffopt, ft.optimizer)
    return FTResult(v, val_loss.detach(), torch.stack(train_losses).mean(), reaches)


def _real_head_steps(ft: FineTune, model: nn.Module, steps: int | None = None) -> torch.Tensor:
    head_params = ft.params
    losses = []
    for _ in range(ft.steps if steps is None else steps):
        loss = ft.loss(model, ft.head, ft.train.next())
        _check_scalar(loss, "FT train loss")
        grads = torch.autograd.grad(loss, head_params, allow_unused=True)
        for param, grad in zip(head_params, grads):
            param.grad = grad
        ft.optimizer.step()
        ft.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def train_head(ft: FineTune, model: nn.Module, steps: int) -> torch.Tensor:
    """Take ``steps`` plain optimizer steps on the head over meta-FT train batches.

    Gradients reach only the head (``torch.autograd.grad`` with respect to its parameters), so
    the PT parameters' ``.grad`` is left alone. Returns the mean FT loss of the steps.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"train_head steps must be an integer >= 1, got {steps!r}.")
    return _real_head_steps(ft, model, steps)


def implicit_ft(ft: FineTune, model: nn.Module, theta: Sequence[torch.Tensor]) -> FTResult:
    """Train the head ``K`` real steps, then return ``v`` by the implicit function theorem.

    With ``g_psi = dL_FT/dpsi`` on one meta-FT train batch and ``q`` the CG solution of
    ``(d2L_FT/dpsi2 + damping I) q = dL_val/dpsi``, ``v = dL_val/dtheta - (dg_psi/dtheta)^T q``.
    """
    head_params = ft.params
    saved_head = [p.detach().clone() for p in head_params]
    saved_state = copy.deepcopy(ft.optimizer.state_dict())
    train_loss = _real_head_steps(ft, model)

    loss = ft.loss(model, ft.head, ft.train.next())
    _check_scalar(loss, "FT train loss")
    g_psi = torch.autograd.grad(loss, head_params, create_graph=True)
    val_loss = ft.loss(model, ft.head, ft.val.next())
    _check_scalar(val_loss, "meta-FT val loss")
    if not (torch.isfinite(val_loss) and _all_finite(head_params)):
        with torch.no_grad():  # undo the real head steps, as the unrolled modes do
            for param, old in zip(head_params, saved_head):
                param.copy_(old)
        ft.optimizer.load_state_dict(saved_state)
        return FTResult([], val_loss.detach(), train_loss)

    grads = _grads_or_none(val_loss, list(theta) + head_params)
    reaches = any(g is not None for g in grads[: len(theta)])
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, [*theta, *head_params])]
    dval_theta, dval_psi = grads[: len(theta)], grads[len(theta):]

    q = _cg_small(g_psi, head_params, dval_psi, ft.implicit_iterations, ft.implicit_damping)
    mixed = _grads_or_none(list(g_psi), theta, grad_outputs=q)
    reaches = reaches or any(g is not None for g in mixed)
    v = [a if b is None else a - b for a, b in zip(dval_theta, mixed)]
    return FTResult(v, val_loss.detach(), train_loss, reaches)


def _cg_small(
    grad: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    rhs: Sequence[torch.Tensor],
    iterations: int,
    damping: float,
) -> list[torch.Tensor]:
    """Solve ``(d grad/d params + damping I) q = rhs`` by CG on flat vectors."""
    shapes = [p.shape for p in params]

    def hvp(vec: torch.Tensor) -> torch.Tensor:
        parts = [x.view(s) for x, s in zip(vec.split([p.numel() for p in params]), shapes)]
        out = _grads_or_zeros(list(grad), params, grad_outputs=parts, retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out])

    flat_rhs = torch.cat([r.reshape(-1) for r in rhs])
    solver = ConjugateGradient(iterations=iterations, tol=1e-12, damping=damping)
    q, info = solver.solve(flat_rhs, hvp, alpha=1.0)
    logger.debug("implicit FT: CG residual %.3g after %d HVPs", info.residual, info.hvps)
    return [x.view(s) for x, s in zip(q.split([p.numel() for p in params]), shapes)]


def _check_scalar(loss: Any, what: str) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"The {what} must be a scalar tensor, got {shape}; reduce it with .mean().")
