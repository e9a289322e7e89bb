"""``MetaPTOptimizer``: a ``torch.optim``-style wrapper that adds hypersteps to a PT loop."""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
import time
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import _diffopt
from ._estimators import Neumann, PTEstimator, SolveInfo, UnrolledPT
from ._finetune import FineTune, FTResult, implicit_ft, train_head, unrolled_ft
from ._param import is_meta, meta_name, owning_module
from ._swap import saved_buffers, saved_training_modes, swapped_parameters

__all__ = ["MetaPTOptimizer", "HyperstepRecord", "MetaOptWarning"]

logger = logging.getLogger(__name__)

PTLoss = Callable[[], torch.Tensor]

_POLICIES = ("raise", "warn", "skip")


class MetaOptWarning(UserWarning):
    """A hyperstep problem that metaopt reported without raising."""


@dataclasses.dataclass
class HyperstepRecord:
    """Measurements of one hyperstep.

    Attributes:
        step: the number of PT steps taken before this hyperstep.
        val_loss: the meta-FT validation loss after the FT stage.
        ft_train_loss: the mean FT training loss over the FT steps of this hyperstep.
        hypergrad_norm: the L2 norm of the hypergradient over all meta-parameters.
        residual: the PT solver's relative residual (see ``SolveInfo``), or None.
        diverged: whether the PT solver detected divergence.
        curvature: the largest Hessian Rayleigh quotient the solver saw, or None.
        min_curvature: the smallest Hessian Rayleigh quotient the solver saw, or None.
        applied: whether the meta-optimizer stepped (False when a check skipped the update).
        seconds: wall time of the hyperstep.
    """

    step: int
    val_loss: float
    ft_train_loss: float
    hypergrad_norm: float
    residual: float | None
    diverged: bool
    curvature: float | None
    min_curvature: float | None
    applied: bool
    seconds: float


@dataclasses.dataclass
class _StepRecord:
    """The saved inputs of one PT step, replayed by ``UnrolledPT``."""

    theta: list[torch.Tensor]
    state: dict
    lrs: list[Any]
    rng: tuple
    loss_fn: PTLoss


class MetaPTOptimizer:
    """Wrap a model's PT optimizer and learn meta-parameters by hypersteps beside it.

    ``step()``, ``zero_grad()``, ``param_groups``, ``state_dict()`` and ``load_state_dict()``
    behave as on the wrapped PT optimizer. ``hyperstep(pt_loss)`` computes
    ``dL_val/dphi = v^T dtheta_FT/dtheta . dtheta*/dphi``: the FT stage (``finetune``) gives
    ``v = dL_val/dtheta``, the PT stage (``pt_estimator``) maps it to the meta-parameters. The
    result is written to each meta-parameter's ``.grad`` and ``meta_optimizer`` steps.

    Args:
        model: the module trained by PT (encoder plus any PT head).
        optimizer: the PT optimizer; its parameters are ``theta`` (``SGD``, ``Adam`` or ``AdamW``
            when the estimator differentiates through it).
        meta_optimizer: an optimizer over the meta-parameters ``phi``.
        finetune: the FT stage.
        pt_estimator: :class:`Neumann` (default, ``J = 1``), :class:`ConjugateGradient`,
            :class:`FirstOrder`, :class:`ExactSolve` or :class:`UnrolledPT`.
        on_nonfinite: ``"raise"`` (default) a ``FloatingPointError``, or ``"warn"`` and skip the
            update, when a loss or the hypergradient is NaN or infinite.
        on_divergence: ``"skip"`` (default: warn and leave ``phi`` unchanged), ``"warn"`` (warn
            and apply the update) or ``"raise"`` when the PT solver reports divergence.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        meta_optimizer: torch.optim.Optimizer,
        finetune: FineTune,
        pt_estimator: PTEstimator | None = None,
        on_nonfinite: str = "raise",
        on_divergence: str = "skip",
    ) -> None:
        _check_types(model, optimizer, meta_optimizer, finetune, pt_estimator)
        _check_policy("on_nonfinite", on_nonfinite, ("raise", "warn"))
        _check_policy("on_divergence", on_divergence, _POLICIES)

        self.model = model
        self.optimizer = optimizer
        self.meta_optimizer = meta_optimizer
        self.finetune = finetune
        self.pt_estimator = pt_estimator if pt_estimator is not None else Neumann()
        self.on_nonfinite = on_nonfinite
        self.on_divergence = on_divergence

        self.theta = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.meta_params = [p for g in meta_optimizer.param_groups for p in g["params"]]
        _check_disjoint(self.theta, self.meta_params, finetune.params, optimizer)
        _check_flat_compatible(self.theta)
        if not self.pt_estimator.implicit:
            _diffopt._check_supported(optimizer)
        if not self.pt_estimator.implicit or finetune.mode == "full":
            _check_inside_model(model, self.theta)

        self._meta_modules = _meta_modules(self.meta_params)
        self._records: collections.deque[_StepRecord] = collections.deque(
            maxlen=getattr(self.pt_estimator, "steps", 1)
        )
        self._rng_before_step: tuple | None = None
        self.step_count = 0
        self.hyperstep_count = 0

    # ----- the torch.optim surface -----

    @property
    def param_groups(self) -> list[dict]:
        """The PT optimizer's parameter groups (shared, so edits reach the PT optimizer)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        """The PT optimizer's state."""
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the PT parameters and of the meta-parameters.

        The PT loss reaches the meta-parameters, so ``loss.backward()`` accumulates into their
        ``.grad``; those gradients are not hypergradients and are never used by a hyperstep.
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for param in self.meta_params:
            _clear_grad(param, set_to_none)
        if isinstance(self.pt_estimator, UnrolledPT):
            # The forward pass of the coming step starts from this random state (dropout masks),
            # so a replay that restores it reproduces the step.
            self._rng_before_step = _rng_state(self.theta[0].device)

    def step(
        self, closure: Callable[[], Any] | None = None, *, loss_fn: PTLoss | None = None
    ) -> Any:
        """Take one PT step with the wrapped optimizer.

        Args:
            closure: passed to the PT optimizer's ``step`` unchanged (torch semantics).
            loss_fn: with :class:`UnrolledPT`, a closure that recomputes this step's PT loss
                on the same batch (it is called again during the next hypersteps). Required
                then, ignored otherwise.

        Raises:
            ValueError: ``UnrolledPT`` is the estimator and ``loss_fn`` is missing.
        """
        if isinstance(self.pt_estimator, UnrolledPT):
            if loss_fn is None:
                raise ValueError(
                    "UnrolledPT records each PT step, so step() needs the step's loss: call "
                    "meta.step(loss_fn=lambda: pt_loss(model, batch, ...)) with this step's batch."
                )
            self._records.append(self._record_step(loss_fn))
        result = self.optimizer.step(closure)
        self.step_count += 1
        return result

    def state_dict(self) -> dict[str, Any]:
        """Return the states of the PT, FT and meta optimizers, the counters and FT positions.

        Model, head and meta-parameter values are not included, as with ``torch.optim``; save
        them with their modules. ``UnrolledPT``'s recorded steps are not saved either: after
        loading, the next hypersteps use the steps recorded since.
        """
        return {
            "pt_optimizer": self.optimizer.state_dict(),
            "ft_optimizer": self.finetune.optimizer.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "step_count": self.step_count,
            "hyperstep_count": self.hyperstep_count,
            "ft_train_consumed": self.finetune.train.consumed,
            "ft_val_consumed": self.finetune.val.consumed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, fast-forwarding the FT batch iterators."""
        missing = {
            "pt_optimizer", "ft_optimizer", "meta_optimizer", "step_count", "hyperstep_count",
            "ft_train_consumed", "ft_val_consumed",
        } - set(state_dict)
        if missing:
            raise KeyError(
                f"MetaPTOptimizer state_dict is missing the keys {sorted(missing)}; pass the "
                "dict that MetaPTOptimizer.state_dict() returned."
            )
        self.optimizer.load_state_dict(state_dict["pt_optimizer"])
        self.finetune.optimizer.load_state_dict(state_dict["ft_optimizer"])
        self.meta_optimizer.load_state_dict(state_dict["meta_optimizer"])
        self.step_count = int(state_dict["step_count"])
        self.hyperstep_count = int(state_dict["hyperstep_count"])
        self.finetune.train.fast_forward(int(state_dict["ft_train_consumed"]))
        self.finetune.val.fast_forward(int(state_dict["ft_val_consumed"]))
        self._records.clear()

    # ----- hypersteps -----

    def train_head(self, steps: int = 1) -> float:
        """Train the FT head for ``steps`` plain steps on meta-FT train batches (a warm-up).

        Raghu et al. (2021) train the head on the side during a warm-up phase of plain PT,
        so the first hypersteps start from a useful head. The model is in eval mode during
        these steps when ``FineTune.encoder_eval`` is set, and its buffers are left unchanged.

        Returns:
            The mean FT training loss of the steps.
        """
        modules = [self.model, self.finetune.head]
        with saved_buffers([self.model]), saved_training_modes(modules):
            if self.finetune.encoder_eval:
                self.model.eval()
            return float(train_head(self.finetune, self.model, steps))

    def hyperstep(self, pt_loss: PTLoss | torch.Tensor | None = None) -> HyperstepRecord:
        """Compute the hypergradient, write it to the meta-parameters' ``.grad`` and step them.

        Args:
            pt_loss: a closure returning the PT loss on a fresh PT batch (a scalar tensor that
                reads the meta-parameters). The implicit estimators take ``H`` and
                ``d2L_PT/(dtheta dphi)`` from it. ``UnrolledPT`` uses the recorded steps instead
                and ignores it. It may also be the PT loss tensor of the current step before
                ``backward()``: the hyperstep then reuses its forward graph and accumulates
                ``dL_PT/dtheta`` into the PT parameters' ``.grad`` as ``loss.backward()`` would,
                so ``meta.step()`` follows directly. This saves one forward and one backward
                pass per hyperstep.

        Returns:
            A :class:`HyperstepRecord`.

        Raises:
            ValueError: a meta-parameter does not reach the PT gradient, or ``pt_loss`` is
                missing for an implicit estimator.
            FloatingPointError: a loss or the hypergradient is not finite and
                ``on_nonfinite="raise"``.
        """
        start = time.perf_counter()
        if self.pt_estimator.implicit and pt_loss is None:
            raise ValueError(
                f"{type(self.pt_estimator).__name__} needs the PT loss: call "
                "meta.hyperstep(lambda: pt_loss(model, next_pt_batch, ...))."
            )
        if not self.pt_estimator.implicit and isinstance(pt_loss, torch.Tensor):
            raise ValueError(
                "UnrolledPT differentiates through recorded steps and cannot reuse a PT loss "
                "tensor: call loss.backward() and meta.step(loss_fn=...), then meta.hyperstep()."
            )
        if not self.pt_estimator.implicit and not self._records:
            raise ValueError(
                "UnrolledPT has no recorded PT steps yet: call meta.step(loss_fn=...) at least "
                "once before meta.hyperstep()."
            )

        modules = [self.model, self.finetune.head, *self._meta_modules]
        with saved_buffers(modules):
            with saved_training_modes(modules):
                ft = self._ft_stage()
            hypergrad, info = self._pt_stage(ft, pt_loss)

        applied = self._apply(hypergrad, info) if ft.reaches_theta else False
        self.hyperstep_count += 1
        record = self._make_record(ft, hypergrad, info, applied, time.perf_counter() - start)
        logger.debug("hyperstep %d: %s", self.hyperstep_count, record)
        return record

    def _ft_stage(self) -> FTResult:
        if self.finetune.encoder_eval:
            self.model.eval()
        if self.finetune.mode == "implicit":
            return implicit_ft(self.finetune, self.model, self.theta)
        return unrolled_ft(self.finetune, self.model, self.theta)

    def _pt_stage(
        self, ft: FTResult, pt_loss: PTLoss | torch.Tensor | None
    ) -> tuple[list[torch.Tensor] | None, SolveInfo]:
        failed = None
        if not torch.isfinite(ft.val_loss):
            failed = ("meta-FT val loss", ft.val_loss.item())
        elif not ft.v:  # the implicit FT stage trained the head to non-finite weights
            failed = ("FT head after its training steps", "NaN or inf entries")
        elif not bool(torch.isfinite(torch.cat([x.reshape(-1) for x in ft.v])).all()):
            failed = ("FT-stage gradient dL_val/dtheta", "NaN or inf entries")
        if failed is not None:
            self._backward_reused(pt_loss)
            self._report_nonfinite(*failed)
            return None, SolveInfo()
        if not ft.reaches_theta:
            self._backward_reused(pt_loss)
            warnings.warn(
                "The meta-FT val loss does not depend on any PT parameter, so the hypergradient "
                "is zero and the meta-parameters were left unchanged. FineTune.loss must call "
                "the model without torch.no_grad() or .detach() on its features.",
                MetaOptWarning,
                stacklevel=4,
            )
            return [torch.zeros_like(p) for p in self.meta_params], SolveInfo()
        if self.pt_estimator.implicit:
            return self._implicit_pt(ft.v, pt_loss)
        return self._unrolled_pt(ft.v), SolveInfo()

    def _implicit_pt(
        self, v: list[torch.Tensor], pt_loss: PTLoss | torch.Tensor
    ) -> tuple[list[torch.Tensor] | None, SolveInfo]:
        reuse = isinstance(pt_loss, torch.Tensor)
        loss = pt_loss if reuse else pt_loss()
        _check_pt_loss(loss)
        if not torch.isfinite(loss):
            self._backward_reused(pt_loss)
            self._report_nonfinite("PT loss", loss.item())
            return None, SolveInfo()

        grads = torch.autograd.grad(loss, self.theta, create_graph=True, allow_unused=True)
        if reuse:
            _accumulate_grads(self.theta, grads)
        linked = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        linked_grads = [grads[i] for i in linked]
        linked_theta = [self.theta[i] for i in linked]
        sizes = [p.numel() for p in linked_theta]

        def hvp(vec: torch.Tensor) -> torch.Tensor:
            parts = [x.view_as(p) for x, p in zip(vec.split(sizes), linked_theta)]
            out = torch.autograd.grad(
                linked_grads, linked_theta, grad_outputs=parts, retain_graph=True,
                allow_unused=True,
            )
            return torch.cat([
                (torch.zeros_like(p) if o is None else o).reshape(-1)
                for o, p in zip(out, linked_theta)
            ])

        v_flat = torch.cat([v[i].reshape(-1) for i in linked]) if linked else None
        if v_flat is None:
            self._raise_unreached(self.meta_params)
        alpha = float(self.optimizer.param_groups[0]["lr"])
        p_flat, info = self.pt_estimator.solve(v_flat, hvp, alpha)

        parts = [x.view_as(t) for x, t in zip(p_flat.split(sizes), linked_theta)]
        mixed = torch.autograd.grad(
            linked_grads, self.meta_params, grad_outputs=parts, allow_unused=True
        )
        self._check_reached(mixed)
        return [-m for m in mixed], info

    def _backward_reused(self, pt_loss: PTLoss | torch.Tensor | None) -> None:
        """Accumulate ``dL_PT/dtheta`` from a reused loss tensor when the hyperstep stops early.

        ``hyperstep(loss)`` promises the gradients of ``loss.backward()``, so the PT step that
        follows is taken (with NaN gradients if the loss is NaN, as plain PyTorch would).
        """
        if isinstance(pt_loss, torch.Tensor):
            _check_pt_loss(pt_loss)
            _accumulate_grads(self.theta, torch.autograd.grad(pt_loss, self.theta, allow_unused=True))

    def _record_step(self, loss_fn: PTLoss) -> _StepRecord:
        theta = [p.detach().clone() for p in self.theta]
        state = {p: copy.deepcopy(self.optimizer.state[p]) for p in self.theta
                 if p in self.optimizer.state}
        lrs = [copy.deepcopy(g["lr"]) for g in self.optimizer.param_groups]
        rng = self._rng_before_step or _rng_state(self.theta[0].device)
        self._rng_before_step = None
        return _StepRecord(theta, state, lrs, rng, loss_fn)

    def _unrolled_pt(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        records = list(self._records)
        first = records[0]
        frozen = copy.copy(self.optimizer)
        frozen.state = collections.defaultdict(dict, first.state)
        diffopt = _diffopt.make_differentiable(frozen, self.theta)

        device = self.theta[0].device
        rng = _rng_state(device)
        fast = [t.clone().requires_grad_() for t in first.theta]
        try:
            for record in records:
                _set_rng_state(device, record.rng)
                with swapped_parameters([self.model], self.theta, fast):
                    loss = record.loss_fn()
                _check_pt_loss(loss)
                fast = diffopt.step(loss, params=fast, override={"lr": record.lrs})
        finally:
            _set_rng_state(device, rng)

        self._check_replay(fast)
        grads = torch.autograd.grad(fast, self.meta_params, grad_outputs=v, allow_unused=True)
        self._check_reached(grads)
        return list(grads)

    def _check_replay(self, fast: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            diff = max((f - p).abs().max().item() for f, p in zip(fast, self.theta))
            scale = max(p.abs().max().item() for p in self.theta) or 1.0
        if diff / scale > self.pt_estimator.replay_tol:
            warnings.warn(
                f"UnrolledPT replayed the last {len(self._records)} PT steps to parameters that "
                f"differ from the actual ones by {diff:.3g} (relative {diff / scale:.3g}). Each "
                "loss_fn must recompute its step's loss on the same batch, so capture the batch "
                "in the closure, e.g. loss_fn=lambda b=batch: pt_loss(model, b, ...). With "
                "dropout, call meta.zero_grad() before the forward pass, because the replay "
                "restores the random state saved there.",
                MetaOptWarning,
                stacklevel=4,
            )

    # ----- checks and bookkeeping -----

    def _check_reached(self, grads: Sequence[torch.Tensor | None]) -> None:
        unreached = [p for p, g in zip(self.meta_params, grads) if g is None]
        if unreached:
            self._raise_unreached(unreached)

    def _raise_unreached(self, unreached: Sequence[torch.Tensor]) -> None:
        names = ", ".join(meta_name(p) for p in unreached)
        raise ValueError(
            f"Meta-parameter(s) {names} do not affect the gradient of the PT loss with respect "
            "to the PT parameters, so their hypergradient is not defined (it would be a silent "
            "zero). Make the PT loss use them in a term that depends on the model, or remove "
            "them from meta_optimizer."
        )

    def _apply(self, hypergrad: list[torch.Tensor] | None, info: SolveInfo) -> bool:
        if hypergrad is None:
            return False
        for param, grad in zip(self.meta_params, hypergrad):
            bad = int((~torch.isfinite(grad)).sum())
            if bad:
                self._report_nonfinite(
                    f"hypergradient of {meta_name(param)}", f"{bad} of {grad.numel()} entries"
                )
                return False
        if info.diverged and not self._report_divergence(info):
            return False

        for param, grad in zip(self.meta_params, hypergrad):
            param.grad = grad.detach().clone()
        self.meta_optimizer.step()
        for param in self.meta_params:
            param.grad = None
        # Recorded steps ran with the old meta-parameters, so replaying them with the new ones
        # would not reproduce them; UnrolledPT's window restarts here.
        self._records.clear()
        return True

    def _report_nonfinite(self, what: str, value: Any) -> None:
        message = (
            f"The {what} is not finite ({value}); the meta-parameters were left unchanged. "
            "Lower the meta or PT learning rate, or check the losses for log(0) or overflow."
        )
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, MetaOptWarning, stacklevel=4)

    def _report_divergence(self, info: SolveInfo) -> bool:
        """Report a diverging solver; return whether the update should still be applied."""
        message = _divergence_message(
            self.pt_estimator, info, float(self.optimizer.param_groups[0]["lr"])
        )
        if self.on_divergence == "raise":
            raise FloatingPointError(message)
        skip = self.on_divergence == "skip"
        suffix = " The meta-parameters were left unchanged." if skip else ""
        warnings.warn(message + suffix, MetaOptWarning, stacklevel=4)
        return not skip

    def _make_record(
        self,
        ft: FTResult,
        hypergrad: list[torch.Tensor] | None,
        info: SolveInfo,
        applied: bool,
        seconds: float,
    ) -> HyperstepRecord:
        if hypergrad is None:
            norm = math.nan
        else:
            norm = math.sqrt(sum(float(g.detach().pow(2).sum()) for g in hypergrad))
        return HyperstepRecord(
            step=self.step_count,
            val_loss=float(ft.val_loss),
            ft_train_loss=float(ft.train_loss),
            hypergrad_norm=norm,
            residual=info.residual,
            diverged=info.diverged,
            curvature=info.curvature,
            min_curvature=info.min_curvature,
            applied=applied,
            seconds=seconds,
        )


def _divergence_message(estimator: PTEstimator, info: SolveInfo, lr: float) -> str:
    if isinstance(estimator, Neumann):
        alpha = estimator.alpha or lr
        if info.curvature is not None and alpha * info.curvature > 2:
            return (
                f"The Neumann series diverges: alpha * lambda = {alpha:.3g} * "
                f"{info.curvature:.3g} = {alpha * info.curvature:.3g} > 2. Pass "
                f"Neumann(alpha=...) below {2 / info.curvature:.3g}, or use ConjugateGradient."
            )
        return (
            f"The Neumann series grows (last term {info.residual:.3g} times as long as v): the "
            f"PT Hessian has negative curvature (Rayleigh quotient {info.min_curvature}). "
            "Use fewer terms, or ConjugateGradient(damping=...) with damping above that value."
        )
    return (
        f"{type(estimator).__name__} met non-positive curvature (smallest Rayleigh quotient "
        f"{info.min_curvature}), so the implicit function theorem's PT optimum assumption "
        "fails here. Add damping, e.g. ConjugateGradient(damping=1e-3), or train PT longer."
    )


def _rng_state(device: torch.device) -> tuple:
    # NOTE: the CUDA branch has not run on a GPU yet; only the CPU path is tested.
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _accumulate_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]):
    for param, grad in zip(params, grads):
        if grad is None:
            continue
        if param.grad is None:
            param.grad = grad.detach().clone()
        else:
            param.grad.add_(grad.detach())


def _clear_grad(param: torch.Tensor, set_to_none: bool) -> None:
    if param.grad is None:
        return
    if set_to_none:
        param.grad = None
    else:
        param.grad.detach_()
        param.grad.zero_()


def _check_policy(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}.")


def _check_types(
    model: Any, optimizer: Any, meta_optimizer: Any, finetune: Any, estimator: Any
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    for name, value in (("optimizer", optimizer), ("meta_optimizer", meta_optimizer)):
        if not isinstance(value, torch.optim.Optimizer):
            raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(value).__name__}.")
    if not isinstance(finetune, FineTune):
        raise TypeError(
            f"finetune must be a metaopt.FineTune, got {type(finetune).__name__}; build it with "
            "metaopt.FineTune(head, head_optimizer, loss=..., train=..., val=...)."
        )
    if estimator is not None and not isinstance(estimator, PTEstimator):
        raise TypeError(
            f"pt_estimator must be a metaopt PT estimator (Neumann, ConjugateGradient, "
            f"FirstOrder, ExactSolve, UnrolledPT), got {type(estimator).__name__}."
        )


def _check_disjoint(
    theta: Sequence[torch.Tensor],
    meta_params: Sequence[torch.Tensor],
    head_params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> None:
    theta_ids = {id(p) for p in theta}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if is_meta(param):
                raise ValueError(
                    f"Meta-parameter {meta_name(param)} is in the PT optimizer's param_groups, "
                    "so PT would train it on the PT loss. Leave meta-parameters out of the PT "
                    "optimizer, e.g. torch.optim.Adam([p for p in model.parameters() "
                    "if not metaopt.is_meta(p)])."
                )
    if not meta_params:
        raise ValueError("meta_optimizer has no parameters; pass it the metaopt.Param tensors.")
    for param in meta_params:
        if id(param) in theta_ids:
            raise ValueError(
                f"Meta-parameter {meta_name(param)} is also in the PT optimizer; remove it there."
            )
        if not param.requires_grad:
            raise ValueError(
                f"Meta-parameter {meta_name(param)} has requires_grad=False; set "
                "requires_grad=True or remove it from meta_optimizer."
            )
    for param in head_params:
        if id(param) in theta_ids:
            raise ValueError(
                f"FT head parameter {meta_name(param)} is also in the PT optimizer; the FT "
                "head must be a separate module from the PT model."
            )
    if not theta:
        raise ValueError(
            "The PT optimizer has no parameters that require gradients; build it from the "
            "model's trainable parameters."
        )


def _check_inside_model(model: nn.Module, theta: Sequence[torch.Tensor]) -> None:
    """Reject PT parameters that ``model`` does not register (they cannot be swapped)."""
    registered = {id(p) for p in model.parameters()}
    stray = [tuple(p.shape) for p in theta if id(p) not in registered]
    if stray:
        raise ValueError(
            f"{len(stray)} PT optimizer parameter(s) with shapes {stray[:5]} are not in the "
            "model, but UnrolledPT and FineTune(mode='full') recompute the model with replaced "
            "parameters. Pass a module that contains every PT parameter, e.g. "
            "nn.ModuleDict({'encoder': encoder, 'pt_head': pt_head})."
        )


def _check_flat_compatible(theta: Sequence[torch.Tensor]) -> None:
    kinds = {(p.device, p.dtype) for p in theta}
    if len(kinds) > 1:
        raise ValueError(
            "metaopt needs every PT parameter on one device with one dtype, found "
            f"{sorted(map(str, kinds))}; move the model with model.to(device, dtype)."
        )


def _check_pt_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"The PT loss closure must return a scalar tensor, got {shape}.")
    if not loss.requires_grad:
        raise ValueError(
            "The PT loss closure returned a tensor without a graph; compute it inside the "
            "closure (not under torch.no_grad()) from the model and the meta-parameters."
        )


def _meta_modules(meta_params: Sequence[torch.Tensor]) -> list[nn.Module]:
    modules: list[nn.Module] = []
    for param in meta_params:
        module = owning_module(param)
        if module is not None and all(module is not m for m in modules):
            modules.append(module)
    return modules
