"""Marking tensors and modules as meta-parameters."""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["Param", "mark_module", "is_meta", "meta_name", "owning_module"]

logger = logging.getLogger(__name__)

_META_FLAG = "_metaopt_meta"
_NAME_ATTR = "_metaopt_name"
_MODULE_ATTR = "_metaopt_module"


class Param(nn.Parameter):
    """A meta-parameter: a PT hyperparameter learned from the meta-FT validation loss.

    ``Param(tensor)`` returns a leaf :class:`torch.nn.Parameter` marked as a meta-parameter.
    ``Param(module)`` marks every parameter of ``module`` in place (see :func:`mark_module`)
    and returns the module, so a whole augmentation network can be a meta-parameter.

    Args:
        data: a floating-point tensor, or an ``nn.Module``.
        name: the name used in error messages and logs; defaults to ``"meta[<shape>]"``.

    Raises:
        TypeError: ``data`` is neither a tensor nor a module, or is not floating point.
    """

    def __new__(cls, data: Any = None, requires_grad: bool = True, *, name: str | None = None):
        if isinstance(data, nn.Module):
            return mark_module(data, name=name)
        if not isinstance(data, torch.Tensor):
            raise TypeError(
                f"metaopt.Param expects a tensor or an nn.Module, got {type(data).__name__}; "
                "wrap the value with torch.as_tensor(...) first."
            )
        if not data.is_floating_point():
            raise TypeError(
                f"metaopt.Param needs a floating-point tensor, got dtype {data.dtype}; "
                "convert it with .float() or .double()."
            )
        param = super().__new__(cls, data.detach(), requires_grad)
        _mark(param, name or f"meta{list(param.shape)}", module=None)
        return param

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # nn.Parameter has no __init__ to call, and the keyword-only name is consumed in __new__.
        pass

    def __deepcopy__(self, memo: dict) -> "Param":
        if id(self) in memo:
            return memo[id(self)]
        result = Param(self.data.clone(memory_format=torch.preserve_format),
                       self.requires_grad, name=meta_name(self))
        memo[id(self)] = result
        return result

    def __repr__(self) -> str:
        return f"metaopt.Param(name={meta_name(self)!r}, shape={tuple(self.shape)})"


def _mark(tensor: torch.Tensor, name: str, module: nn.Module | None) -> None:
    setattr(tensor, _META_FLAG, True)
    setattr(tensor, _NAME_ATTR, name)
    setattr(tensor, _MODULE_ATTR, weakref.ref(module) if module is not None else None)


def mark_module(module: nn.Module, name: str | None = None) -> nn.Module:
    """Mark every parameter of ``module`` as a meta-parameter and return the module.

    Buffers of a marked module (BatchNorm running statistics, for example) are saved before
    each hyperstep and restored after it, so the differentiable passes of a hyperstep leave them
    unchanged.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``module`` has no parameters.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"mark_module expects an nn.Module, got {type(module).__name__}.")
    params = list(module.named_parameters())
    if not params:
        raise ValueError(
            f"mark_module got a {type(module).__name__} without parameters; "
            "there is nothing to learn."
        )
    prefix = name or type(module).__name__
    for param_name, param in params:
        _mark(param, f"{prefix}.{param_name}", module)
    logger.debug("marked %d parameters of %s as meta-parameters", len(params), prefix)
    return module


def is_meta(tensor: torch.Tensor) -> bool:
    """Return whether ``tensor`` was marked as a meta-parameter."""
    return bool(getattr(tensor, _META_FLAG, False))


def meta_name(tensor: torch.Tensor) -> str:
    """Return the name of a meta-parameter, or a shape-based name for any other tensor."""
    return getattr(tensor, _NAME_ATTR, None) or f"tensor{list(tensor.shape)}"


def owning_module(tensor: torch.Tensor) -> nn.Module | None:
    """Return the module that :func:`mark_module` marked ``tensor`` through, if it is alive."""
    ref = getattr(tensor, _MODULE_ATTR, None)
    return ref() if ref is not None else None
