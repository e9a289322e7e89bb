"""Multitask PT of the GIN with uniform task weights or with task weights learned by metaopt."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import metaopt
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader
from tqdm import tqdm

from .config import ExperimentConfig
from .model import GINEncoder, MoleculeModel, make_ft_head

__all__ = [
    "PTResult",
    "build_model",
    "make_loader",
    "ft_loss",
    "pretrain",
    "pt_loss",
    "task_weights",
]

logger = logging.getLogger(__name__)

LOSS_SMOOTHING = 0.05  # weight of the newest step in the running PT loss of the progress bar


@dataclass
class PTResult:
    """The outcome of one PT run (one arm, one seed)."""

    arm: str
    seed: int
    model: MoleculeModel
    task_logits: torch.Tensor  # [num_tasks], detached
    pt_losses: list[float]  # one per PT step
    hypersteps: list[dict[str, object]] = field(default_factory=list)
    seconds: float = 0.0
    meta_state: dict[str, object] | None = None


def task_weights(logits: torch.Tensor) -> torch.Tensor:
    """Map task logits to task weights 2 * sigmoid(logit), each in (0, 2), 1 at logit 0."""
    return 2.0 * torch.sigmoid(logits)


def pt_loss(model: nn.Module, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    """Compute the weighted multitask PT loss: mean over graphs and tasks of weight_t * BCE_t.

    `batch.y` is [num_graphs, num_tasks] in {0, 1}. `logits` is [num_tasks].
    """
    batch = batch.to(logits.device)
    predictions = model(batch)
    bce = F.binary_cross_entropy_with_logits(predictions, batch.y, reduction="none")
    return (bce * task_weights(logits)).mean()


def ft_loss(model: MoleculeModel, head: nn.Module, batch: Batch) -> torch.Tensor:
    """Compute the FT head's BCE on the graph embeddings. `batch.y` is [num_graphs] in {0, 1}."""
    batch = batch.to(next(head.parameters()).device)
    logits = head(model.encoder(batch)).squeeze(-1)
    return F.binary_cross_entropy_with_logits(logits, batch.y)


def build_model(config: ExperimentConfig, num_tasks: int, seed: int) -> MoleculeModel:
    """Build the encoder and PT head, initialised from `seed` (same weights in both arms)."""
    torch.manual_seed(seed)
    encoder = GINEncoder(config.layers, config.hidden, config.dropout, config.pooling)
    return MoleculeModel(encoder, num_tasks).to(config.device)


def _cycle(loader: DataLoader) -> Iterator[Batch]:
    while True:
        yield from loader


def make_loader(
    graphs: Sequence[Data], batch_size: int, seed: int, shuffle: bool = True
) -> DataLoader:
    """Return a seeded loader that drops a final partial batch unless it would be the only one."""
    if not graphs:
        raise ValueError("cannot build a loader over 0 graphs: use a larger data subset")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        list(graphs),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=len(graphs) > batch_size,
    )


def _make_estimator(config: ExperimentConfig) -> metaopt.PTEstimator:
    if config.pt_estimator == "neumann":
        return metaopt.Neumann(terms=config.neumann_terms)
    if config.pt_estimator == "cg":
        return metaopt.ConjugateGradient(
            iterations=config.cg_iterations, damping=config.cg_damping
        )
    if config.pt_estimator == "unrolled":
        return metaopt.UnrolledPT(steps=config.unroll_steps)
    return metaopt.FirstOrder()


def _make_meta_optimizer(
    config: ExperimentConfig,
    model: MoleculeModel,
    optimizer: torch.optim.Optimizer,
    logits: metaopt.Param,
    ft_graphs: tuple[Sequence[Data], Sequence[Data]],
    seed: int,
) -> metaopt.MetaPTOptimizer:
    head = make_ft_head(config.hidden).to(config.device)
    finetune = metaopt.FineTune(
        head,
        torch.optim.Adam(head.parameters(), lr=config.meta_ft_lr),
        loss=ft_loss,
        train=make_loader(ft_graphs[0], config.meta_ft_batch_size, seed + 1),
        val=make_loader(ft_graphs[1], config.meta_ft_batch_size, seed + 2),
        steps=config.ft_steps,
        mode=config.ft_mode,
    )
    return metaopt.MetaPTOptimizer(
        model,
        optimizer,
        meta_optimizer=torch.optim.Adam([logits], lr=config.meta_lr),
        finetune=finetune,
        pt_estimator=_make_estimator(config),
    )


def pretrain(
    arm: str,
    seed: int,
    config: ExperimentConfig,
    pt_graphs: Sequence[Data],
    ft_graphs: tuple[Sequence[Data], Sequence[Data]],
    quiet: bool = False,
) -> PTResult:
    """Run `config.pt_steps` PT steps of one arm.

    `pt_graphs` carry `y` [1, num_tasks]. `ft_graphs` are the meta-FT train and val graphs,
    with `y` [1]. The meta arm uses them for hypersteps and the uniform arm ignores them.
    Both arms see the same PT batches in the same order for a given seed.
    """
    num_tasks = pt_graphs[0].y.shape[-1]
    model = build_model(config, num_tasks, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.pt_lr)
    logits = metaopt.Param(torch.zeros(num_tasks, device=config.device), name="task_logits")
    meta = None
    if arm == "meta":
        meta = _make_meta_optimizer(config, model, optimizer, logits, ft_graphs, seed)
    batches = _cycle(make_loader(pt_graphs, config.pt_batch_size, seed))
    hyper_batches = _cycle(make_loader(pt_graphs, config.pt_batch_size, seed + 1000))
    result = PTResult(arm, seed, model, logits.detach(), [])
    start = time.perf_counter()
    model.train()
    progress = tqdm(
        range(config.pt_steps), desc=f"PT {arm} seed {seed}", disable=quiet, leave=False
    )
    running = math.nan
    postfix: dict[str, str] = {}
    for step in progress:
        loss = _pt_step(meta, optimizer, model, next(batches), logits)
        result.pt_losses.append(loss)
        running = loss if math.isnan(running) else running + LOSS_SMOOTHING * (loss - running)
        postfix["pt_loss"] = f"{running:.4f}"
        if meta is not None and (step + 1) % config.hyper_interval == 0:
            if step + 1 <= config.warmup_steps:
                meta.train_head(steps=meta.finetune.steps)
            else:
                record = _hyperstep(meta, model, next(hyper_batches), logits)
                result.hypersteps.append(dataclasses.asdict(record))
                # The last hyperstep's values stay on the bar until the next hyperstep.
                postfix["val_loss"] = f"{record.val_loss:.4f}"
                postfix["|hypergrad|"] = f"{record.hypergrad_norm:.2e}"
        progress.set_postfix(postfix, refresh=False)
    result.seconds = time.perf_counter() - start
    result.task_logits = logits.detach().clone()
    result.meta_state = meta.state_dict() if meta is not None else None
    _log_run(result, config)
    return result


def _pt_step(
    meta: metaopt.MetaPTOptimizer | None,
    optimizer: torch.optim.Optimizer,
    model: MoleculeModel,
    batch: Batch,
    logits: torch.Tensor,
) -> float:
    if meta is None:
        optimizer.zero_grad(set_to_none=True)
        loss = pt_loss(model, batch, logits.detach())
        loss.backward()
        optimizer.step()
        return loss.item()
    meta.zero_grad()
    loss = pt_loss(model, batch, logits)
    loss.backward()
    if isinstance(meta.pt_estimator, metaopt.UnrolledPT):
        meta.step(loss_fn=lambda: pt_loss(model, batch, logits))
    else:
        meta.step()
    return loss.item()


def _hyperstep(
    meta: metaopt.MetaPTOptimizer, model: MoleculeModel, batch: Batch, logits: torch.Tensor
) -> metaopt.HyperstepRecord:
    # One fixed batch, so that every Hessian-vector product of the estimator uses the same loss.
    return meta.hyperstep(lambda: pt_loss(model, batch, logits))


def _log_run(result: PTResult, config: ExperimentConfig) -> None:
    weights = task_weights(result.task_logits).cpu().numpy()
    tail = result.pt_losses[-config.hyper_interval:]
    message = "PT %s seed %d: %d steps in %.1f s, mean PT loss of the last %d steps %.4f"
    arguments: list[object] = [
        result.arm, result.seed, len(result.pt_losses), result.seconds, len(tail),
        float(np.mean(tail)),
    ]
    if result.hypersteps:
        message += ", %d hypersteps, last meta-FT val loss %.4f, weights in [%.3f, %.3f]"
        arguments += [
            len(result.hypersteps), result.hypersteps[-1]["val_loss"], weights.min(), weights.max(),
        ]
    logger.info(message, *arguments)
