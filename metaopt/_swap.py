"""Temporarily replacing module parameters with other tensors, and saving buffers."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["swapped_parameters", "saved_buffers", "saved_training_modes"]


@contextlib.contextmanager
def swapped_parameters(
    modules: Sequence[nn.Module],
    params: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
) -> Iterator[None]:
    """Make ``modules`` compute with ``tensors`` in place of ``params`` inside the block.

    Every submodule that registers one of ``params`` (tied weights included) uses the matching
    tensor, so a forward pass builds a graph back to ``tensors``. The original parameters are
    put back on exit, also when the block raises.
    """
    replacement = {id(p): t for p, t in zip(params, tensors)}
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    seen: set[int] = set()
    try:
        for module in modules:
            for submodule in module.modules():
                if id(submodule) in seen:
                    continue
                seen.add(id(submodule))
                for name, value in list(submodule._parameters.items()):
                    if value is not None and id(value) in replacement:
                        swapped.append((submodule._parameters, name, value))
                        submodule._parameters[name] = replacement[id(value)]
        yield
    finally:
        for registry, name, original in reversed(swapped):
            registry[name] = original


@contextlib.contextmanager
def saved_buffers(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Restore every buffer of ``modules`` (BatchNorm running statistics, counters) on exit."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    for module in modules:
        for buffer in module.buffers():
            if id(buffer) not in seen:
                seen.add(id(buffer))
                saved.append((buffer, buffer.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                # Untouched buffers keep their version counter, so a graph that saved them
                # (BatchNorm in eval mode, say) stays valid for a later backward.
                if not torch.equal(buffer, copy):
                    buffer.copy_(copy)


@contextlib.contextmanager
def saved_training_modes(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Restore the ``training`` flag of every submodule of ``modules`` on exit."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        yield
    finally:
        for submodule, mode in modes:
            submodule.training = mode
