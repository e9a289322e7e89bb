"""Differentiable versions of ``torch.optim`` optimizers that follow torch's update rules exactly.

``higher`` 0.2.1 records unrolled optimization through its ``DifferentiableOptimizer`` classes,
but its own update rules differ from ``torch.optim``: it lacks AdamW, treats Adam's decoupled
weight decay as L2, ignores ``maximize`` and adds ``eps`` before Adam's bias correction. The
classes here subclass ``higher.optim.DifferentiableOptimizer`` (so ``higher`` still records the
unroll) and replace the update with torch 2.x's single-tensor algorithms, operation by operation.
"""

from __future__ import annotations

import collections
import copy
import logging
from typing import Any, Iterable, Sequence

import higher.optim
import torch

__all__ = ["make_differentiable", "export_state", "SUPPORTED_OPTIMIZERS"]

logger = logging.getLogger(__name__)

SUPPORTED_OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")


def _scalar(value: Any) -> Any:
    """Turn a 0-d tensor hyperparameter without a graph into a Python number, as torch does."""
    if isinstance(value, torch.Tensor) and not value.requires_grad:
        return value.item()
    return value


def _copy_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


def _sqrt_zero_safe(x: torch.Tensor) -> torch.Tensor:
    """Compute ``sqrt(x)`` with a zero instead of an infinite derivative where ``x == 0``.

    Adam's second moment is exactly zero where a gradient entry has been zero at every step
    (an unused embedding row, say), and ``d sqrt(x)/dx`` is infinite there. The values match
    ``torch.sqrt`` exactly.
    """
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), 0.0)


class _Exact(higher.optim.DifferentiableOptimizer):
    """Base of the exact differentiable optimizers.

    ``higher``'s constructor deep-copies ``param_groups`` together with every parameter tensor.
    This one copies only the hyperparameters and the optimizer state, so building a
    differentiable optimizer over a large model copies no parameters.
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Sequence[torch.Tensor],
        override: dict[str, list[Any]] | None = None,
    ) -> None:
        index_of = {id(p): i for i, p in enumerate(reference_params)}
        self.param_groups = []
        self._group_to_param_list = []
        self.state = []
        self.original_params: list[list[torch.Tensor]] = []
        for group in other.param_groups:
            # Frozen parameters (requires_grad=False) stay out of the unroll, as torch.optim
            # skips parameters without a gradient.
            members = [p for p in group["params"] if p.requires_grad]
            hyper = copy.deepcopy({k: v for k, v in group.items() if k != "params"})
            self.param_groups.append({**hyper, "params": [None] * len(members)})
            state = collections.defaultdict(dict)
            indices = []
            for p_idx, param in enumerate(members):
                if id(param) not in index_of:
                    raise ValueError(
                        f"Optimizer parameter of shape {tuple(param.shape)} is missing from the "
                        "parameters being unrolled; pass every trainable parameter."
                    )
                indices.append(index_of[id(param)])
                if other.state.get(param):
                    state[p_idx] = {k: _copy_state(v) for k, v in other.state[param].items()}
            self.state.append(state)
            self._group_to_param_list.append(indices)
            self.original_params.append(members)
        if override is not None:
            self._apply_override(override)
        self._grad_callback = None
        self._fmodel = None
        self._track_higher_grads = True

    def _state_for(self, group_idx: int, p_idx: int) -> dict:
        return self.state[group_idx][p_idx]


class ExactSGD(_Exact):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize), differentiable."""

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            lr = _scalar(group["lr"])
            momentum = _scalar(group["momentum"])
            dampening = _scalar(group["dampening"])
            weight_decay = _scalar(group["weight_decay"])

            for p_idx, (param, grad) in enumerate(zip(group["params"], grads)):
                if grad is None:
                    continue
                if group["maximize"]:
                    grad = -grad
                if weight_decay != 0:
                    grad = grad.add(param, alpha=weight_decay)

                if momentum != 0:
                    state = self._state_for(group_idx, p_idx)
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = grad.clone()
                    else:
                        buf = buf.mul(momentum).add(grad, alpha=1 - dampening)
                    state["momentum_buffer"] = buf
                    grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf

                group["params"][p_idx] = param.add(grad, alpha=-lr)


class ExactAdam(_Exact):
    """``torch.optim.Adam`` and ``AdamW`` (L2 or decoupled decay, AMSGrad, maximize), differentiable."""

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for p_idx, (param, grad) in enumerate(zip(group["params"], grads)):
                if grad is None:
                    continue
                state = self._state_for(group_idx, p_idx)
                group["params"][p_idx] = self._adam_update(group, state, param, grad)

    @staticmethod
    def _adam_update(
        group: dict, state: dict, param: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        lr = _scalar(group["lr"])
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        eps = _scalar(group["eps"])
        weight_decay = _scalar(group["weight_decay"])

        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(param)

        if group["maximize"]:
            grad = -grad
        step_t = state["step"] + 1
        state["step"] = step_t

        if weight_decay != 0:
            if group.get("decoupled_weight_decay", False):
                param = param.mul(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul(grad, grad, value=1 - beta2)
        state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq

        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1

        second_moment = exp_avg_sq
        if group["amsgrad"]:
            second_moment = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
            state["max_exp_avg_sq"] = second_moment
        denom = (_sqrt_zero_safe(second_moment) / bias_correction2_sqrt).add(eps)
        return param.addcdiv(exp_avg, denom, value=-step_size)


def _check_supported(optimizer: torch.optim.Optimizer) -> type[_Exact]:
    if isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam in torch >= 2.6
        decoupled = isinstance(optimizer, torch.optim.AdamW)
        for group in optimizer.param_groups:
            group.setdefault("decoupled_weight_decay", decoupled)
        return ExactAdam
    if type(optimizer) is torch.optim.SGD:
        return ExactSGD
    raise TypeError(
        f"metaopt cannot differentiate through {type(optimizer).__name__}: the supported "
        f"optimizers are {', '.join(SUPPORTED_OPTIMIZERS)}. Use one of them for this stage."
    )


def _check_params(params: Sequence[torch.Tensor]) -> None:
    for param in params:
        if torch.is_complex(param):
            raise TypeError(
                "metaopt's differentiable optimizers do not support complex parameters "
                f"(found shape {tuple(param.shape)}, dtype {param.dtype})."
            )


def make_differentiable(
    optimizer: torch.optim.Optimizer,
    reference_params: Iterable[torch.Tensor],
    *,
    override: dict[str, list[Any]] | None = None,
) -> higher.optim.DifferentiableOptimizer:
    """Build a differentiable copy of ``optimizer`` that starts from its current state.

    The copy reads the current hyperparameters of every parameter group (so the learning rate
    set by a scheduler is honoured) and a copy of the optimizer state. ``step(loss, params=...)``
    returns new parameter tensors that carry a graph back to ``params`` and to whatever the loss
    reads.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` instance.
        reference_params: every parameter of ``optimizer``, in the order in which tensors will
            be passed to ``step(..., params=...)``.
        override: per-group hyperparameter overrides in ``higher``'s format.

    Raises:
        TypeError: the optimizer type or a parameter dtype is not supported.
    """
    cls = _check_supported(optimizer)
    reference_params = list(reference_params)
    _check_params(reference_params)
    return cls(optimizer, reference_params, override=override)


def export_state(
    diffopt: higher.optim.DifferentiableOptimizer,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Copy the state of a differentiable optimizer back into ``optimizer``, detached.

    After ``K`` differentiable steps this leaves ``optimizer`` exactly as ``K`` real steps on the
    same losses would have left it (the parameter values are copied separately).
    """
    for group_idx in range(len(optimizer.param_groups)):
        for p_idx, param in enumerate(diffopt.original_params[group_idx]):
            new_state = diffopt.state[group_idx].get(p_idx)
            if not new_state:
                continue
            optimizer.state[param] = {
                key: value.detach().clone() if isinstance(value, torch.Tensor) else value
                for key, value in new_state.items()
            }
