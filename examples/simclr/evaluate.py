"""Downstream evaluation of a pre-trained encoder: linear probe and full fine-tuning.

Both train on the whole labelled FT set (meta-FT train and meta-FT val) and
report test accuracy and macro one-vs-rest AUROC.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

__all__ = [
    "EvalConfig",
    "classification_metrics",
    "full_finetune",
    "linear_probe",
]

logger = logging.getLogger(__name__)

Labelled = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class EvalConfig:
    """Optimisation settings of both downstream evaluations (Adam in both)."""

    num_classes: int = 10
    probe_epochs: int = 300
    probe_lr: float = 1e-2
    probe_weight_decay: float = 1e-4
    finetune_epochs: int = 20
    finetune_lr: float = 3e-4
    finetune_head_lr: float = 1e-2
    batch_size: int = 64


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Return accuracy and macro one-vs-rest AUROC of ``[N, K]`` logits against ``[N]`` labels.

    AUROC needs every class present in ``labels``, so a missing class gives NaN.
    """
    probabilities = torch.softmax(logits.detach().double(), dim=1).cpu().numpy()
    targets = labels.cpu().numpy()
    accuracy = float(np.mean(probabilities.argmax(axis=1) == targets))
    classes = np.arange(logits.shape[1])
    if len(np.unique(targets)) < len(classes):
        logger.warning("AUROC undefined: test labels cover %d of %d classes",
                       len(np.unique(targets)), len(classes))
        return {"accuracy": accuracy, "auroc": float("nan")}
    auroc = roc_auc_score(targets, probabilities, multi_class="ovr", average="macro",
                          labels=classes)
    return {"accuracy": accuracy, "auroc": float(auroc)}


@torch.no_grad()
def _features(encoder: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(encoder.parameters()).device
    chunks = [encoder(chunk.to(device)) for chunk in images.split(batch_size)]
    return torch.cat(chunks)


def linear_probe(
    encoder: nn.Module, ft: Labelled, test: Labelled, config: EvalConfig, seed: int
) -> dict[str, float]:
    """Train a fresh linear classifier on frozen encoder features and score it on ``test``.

    The encoder runs in eval mode. Features are standardised with the FT set's
    mean and standard deviation, and the classifier is trained full-batch.
    """
    was_training = encoder.training
    encoder.eval()
    train_features = _features(encoder, ft[0], 256)
    test_features = _features(encoder, test[0], 256)
    encoder.train(was_training)
    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0).clamp_min(1e-6)
    train_features = (train_features - mean) / std
    test_features = (test_features - mean) / std

    torch.manual_seed(seed)
    head = nn.Linear(train_features.shape[1], config.num_classes).to(train_features.device)
    optimizer = torch.optim.Adam(
        head.parameters(), lr=config.probe_lr, weight_decay=config.probe_weight_decay
    )
    train_labels = ft[1].to(train_features.device)
    for _ in range(config.probe_epochs):
        optimizer.zero_grad()
        F.cross_entropy(head(train_features), train_labels).backward()
        optimizer.step()
    with torch.no_grad():
        return classification_metrics(head(test_features), test[1])


def full_finetune(
    encoder: nn.Module, ft: Labelled, test: Labelled, config: EvalConfig, seed: int
) -> dict[str, float]:
    """Fine-tune a copy of the encoder with a fresh linear head and score it on ``test``.

    The encoder trains at ``finetune_lr`` and the head at ``finetune_head_lr``.
    Mini-batches are shuffled by a generator seeded with ``seed``. The original
    encoder is left unchanged.
    """
    device = next(encoder.parameters()).device
    model = copy.deepcopy(encoder)
    torch.manual_seed(seed)
    head = nn.Linear(int(encoder.feature_dim), config.num_classes).to(device)
    optimizer = torch.optim.Adam(
        [
            {"params": model.parameters(), "lr": config.finetune_lr},
            {"params": head.parameters(), "lr": config.finetune_head_lr},
        ]
    )
    generator = torch.Generator().manual_seed(seed)
    images, labels = ft
    model.train()
    for _ in range(config.finetune_epochs):
        order = torch.randperm(len(labels), generator=generator)
        for index in order.split(config.batch_size):
            optimizer.zero_grad()
            logits = head(model(images[index].to(device)))
            F.cross_entropy(logits, labels[index].to(device)).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = head(_features(model, test[0], 256))
    return classification_metrics(logits, test[1])
