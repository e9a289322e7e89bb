"""Evaluation of a pre-trained encoder on the BBB task, and paired statistics of two arms.

Both evaluations start a fresh FT head on the FT train split, pick the checkpoint with the
best meta-FT val AUROC and report its test AUROC. The test split is used for nothing else.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from .config import ExperimentConfig
from .model import GINEncoder, make_ft_head
from .train import make_loader

__all__ = [
    "auroc",
    "embed",
    "full_finetune",
    "linear_evaluation",
    "paired_comparison",
    "summarise",
]

logger = logging.getLogger(__name__)

LINEAR_EVAL_EVERY = 10  # full-batch steps between val AUROC checks of the linear head


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the ROC AUC, or NaN when `labels` has a single class (AUROC undefined)."""
    if len(np.unique(labels)) < 2:
        logger.warning("AUROC undefined: only one class among %d labels", len(labels))
        return math.nan
    return float(roc_auc_score(labels, scores))


@torch.no_grad()
def embed(
    encoder: GINEncoder, graphs: Sequence[Data], batch_size: int, device: str
) -> tuple[torch.Tensor, np.ndarray]:
    """Return graph embeddings [n, hidden] (encoder in eval mode) and labels [n]."""
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    for batch in DataLoader(list(graphs), batch_size=batch_size, shuffle=False):
        features.append(encoder(batch.to(device)))
        labels.append(batch.y.cpu())
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels).numpy()


def linear_evaluation(
    encoder: GINEncoder,
    splits: tuple[Sequence[Data], Sequence[Data], Sequence[Data]],
    config: ExperimentConfig,
    seed: int,
) -> dict[str, float]:
    """Train a fresh linear head on frozen embeddings (full batch, Adam) and test it.

    Embeddings are standardised with the train split's mean and std. Returns the val AUROC
    of the selected step, its test AUROC and the step.
    """
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        embed(encoder, graphs, config.eval_batch_size, config.device) for graphs in splits
    )
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x, test_x = ((x - mean) / std for x in (train_x, val_x, test_x))
    torch.manual_seed(seed)
    head = make_ft_head(config.hidden).to(config.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.linear_lr)
    targets = torch.as_tensor(train_y, dtype=torch.float32, device=config.device)
    best = {"val_auroc": -math.inf, "test_auroc": math.nan, "step": 0}
    for step in range(1, config.linear_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(head(train_x).squeeze(-1), targets).backward()
        optimizer.step()
        if step % LINEAR_EVAL_EVERY == 0 or step == config.linear_steps:
            with torch.no_grad():
                val_auroc = auroc(val_y, head(val_x).squeeze(-1).cpu().numpy())
                if val_auroc > best["val_auroc"]:
                    test_scores = head(test_x).squeeze(-1).cpu().numpy()
                    best = {
                        "val_auroc": val_auroc,
                        "test_auroc": auroc(test_y, test_scores),
                        "step": step,
                    }
    return best


def _scores(
    encoder: GINEncoder, head: nn.Module, graphs: Sequence[Data], config: ExperimentConfig
) -> tuple[np.ndarray, np.ndarray]:
    features, labels = embed(encoder, graphs, config.eval_batch_size, config.device)
    with torch.no_grad():
        return labels, head(features).squeeze(-1).cpu().numpy()


def full_finetune(
    encoder: GINEncoder,
    splits: tuple[Sequence[Data], Sequence[Data], Sequence[Data]],
    config: ExperimentConfig,
    seed: int,
) -> dict[str, float]:
    """Fine-tune a copy of the encoder with a fresh head, selecting the epoch by val AUROC.

    Returns the val AUROC of the selected epoch, its test AUROC and the epoch (1-based).
    The encoder passed in is left unchanged.
    """
    encoder = copy.deepcopy(encoder)
    torch.manual_seed(seed)
    head = make_ft_head(config.hidden).to(config.device)
    parameters = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.finetune_lr)
    loader = make_loader(splits[0], config.eval_batch_size, seed)
    best = {"val_auroc": -math.inf, "test_auroc": math.nan, "epoch": 0}
    for epoch in range(1, config.finetune_epochs + 1):
        encoder.train()
        for batch in loader:
            batch = batch.to(config.device)
            optimizer.zero_grad(set_to_none=True)
            logits = head(encoder(batch)).squeeze(-1)
            F.binary_cross_entropy_with_logits(logits, batch.y).backward()
            optimizer.step()
        val_auroc = auroc(*_scores(encoder, head, splits[1], config))
        if val_auroc > best["val_auroc"]:
            best = {
                "val_auroc": val_auroc,
                "test_auroc": auroc(*_scores(encoder, head, splits[2], config)),
                "epoch": epoch,
            }
    return best


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else math.nan
    return {"mean": float(array.mean()), "std": std, "n": len(array)}


def paired_comparison(meta: Sequence[float], uniform: Sequence[float]) -> dict[str, object]:
    """Compare per-seed values of two arms: differences meta - uniform and a paired t-test.

    The p-value is NaN with fewer than two seeds or when all differences are equal.
    """
    differences = [a - b for a, b in zip(meta, uniform, strict=True)]
    p_value = math.nan
    if len(differences) > 1 and np.ptp(differences) > 0:
        p_value = float(stats.ttest_rel(meta, uniform).pvalue)
    return {"differences": differences, **_mean_std(differences), "t_test_p": p_value}


def summarise(runs: Sequence[dict[str, object]], arms: Sequence[str]) -> dict[str, object]:
    """Aggregate test AUROCs per arm and evaluation, and compare the arms seed by seed.

    Each run dict has "arm", "seed" and "linear"/"full" dicts with "test_auroc".
    """
    summary: dict[str, object] = {}
    for evaluation in ("linear", "full"):
        per_arm = {}
        for arm in arms:
            ordered = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
            per_arm[arm] = {r["seed"]: r[evaluation]["test_auroc"] for r in ordered}
        entry: dict[str, object] = {arm: _mean_std(list(v.values())) for arm, v in per_arm.items()}
        if {"meta", "uniform"} <= set(per_arm):
            seeds = sorted(set(per_arm["meta"]) & set(per_arm["uniform"]))
            entry["paired"] = paired_comparison(
                [per_arm["meta"][s] for s in seeds], [per_arm["uniform"][s] for s in seeds]
            )
            entry["paired"]["seeds"] = seeds
        summary[evaluation] = entry
    return summary
