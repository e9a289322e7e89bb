"""Binary pre-training tasks derived from RDKit descriptors.

Each RDKit `fr_*` fragment counter gives a task "fragment present" (count > 0). A few whole-
molecule descriptors are thresholded into further tasks. No task uses a measured label, so
the tasks can be computed for any unlabelled molecule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from rdkit import Chem
from rdkit.Chem import Descriptors

__all__ = [
    "NOISE_PREFIX",
    "THRESHOLD_TASKS",
    "ThresholdTask",
    "add_noise_tasks",
    "compute_task_labels",
    "fragment_task_names",
    "is_noise_task",
    "select_tasks_by_prevalence",
]

logger = logging.getLogger(__name__)

NOISE_PREFIX = "noise:"


@dataclass(frozen=True)
class ThresholdTask:
    """A task that is positive when an RDKit descriptor exceeds a threshold."""

    descriptor: str  # attribute name in rdkit.Chem.Descriptors
    threshold: float  # positive when the descriptor value is > threshold

    @property
    def name(self) -> str:
        return f"{self.descriptor}>{self.threshold:g}"


# Thresholds are common medicinal-chemistry cut-offs (Lipinski and Veber rules, TPSA 90 A^2
# for brain penetration), chosen before looking at any FT result.
THRESHOLD_TASKS: tuple[ThresholdTask, ...] = (
    ThresholdTask("TPSA", 90.0),
    ThresholdTask("MolLogP", 3.0),
    ThresholdTask("MolWt", 450.0),
    ThresholdTask("NumHDonors", 3.0),
    ThresholdTask("NumHAcceptors", 7.0),
    ThresholdTask("NumRotatableBonds", 8.0),
    ThresholdTask("RingCount", 3.0),
    ThresholdTask("NumAromaticRings", 1.0),
    ThresholdTask("FractionCSP3", 0.5),
    ThresholdTask("HeavyAtomCount", 30.0),
)


def _fragment_functions() -> list[tuple[str, Callable[[Chem.Mol], int]]]:
    return [(name, fn) for name, fn in Descriptors._descList if name.startswith("fr_")]


def fragment_task_names() -> list[str]:
    """Return the names of the RDKit `fr_*` fragment counters (85 in RDKit 2026.09)."""
    return [name for name, _ in _fragment_functions()]


def compute_task_labels(molecules: Sequence[Chem.Mol]) -> tuple[list[str], np.ndarray]:
    """Compute every candidate task for every molecule.

    Returns the task names and a uint8 label matrix [num_molecules, num_tasks], fragment tasks
    first, then THRESHOLD_TASKS.
    """
    fragments = _fragment_functions()
    thresholds = [(task, getattr(Descriptors, task.descriptor)) for task in THRESHOLD_TASKS]
    names = [name for name, _ in fragments] + [task.name for task, _ in thresholds]
    labels = np.zeros((len(molecules), len(names)), dtype=np.uint8)
    for row, mol in enumerate(molecules):
        for column, (_, count_fragments) in enumerate(fragments):
            labels[row, column] = count_fragments(mol) > 0
        for offset, (task, compute) in enumerate(thresholds):
            labels[row, len(fragments) + offset] = compute(mol) > task.threshold
    return names, labels


def select_tasks_by_prevalence(
    names: Sequence[str],
    labels: np.ndarray,
    min_prevalence: float = 0.01,
    max_prevalence: float = 0.99,
) -> tuple[list[str], np.ndarray]:
    """Keep the tasks whose fraction of positives lies in [min_prevalence, max_prevalence].

    `labels` is [num_molecules, num_tasks]. Returns the kept names and label columns.
    """
    if labels.shape[1] != len(names):
        raise ValueError(
            f"labels has {labels.shape[1]} columns but {len(names)} task names were given: "
            "pass one name per label column"
        )
    if not 0.0 <= min_prevalence < max_prevalence <= 1.0:
        raise ValueError(
            f"invalid prevalence range [{min_prevalence}, {max_prevalence}], "
            "expected 0 <= min < max <= 1"
        )
    prevalence = labels.mean(axis=0) if len(labels) else np.zeros(len(names))
    keep = (prevalence >= min_prevalence) & (prevalence <= max_prevalence)
    logger.info(
        "kept %d of %d PT tasks with prevalence in [%g, %g]",
        int(keep.sum()), len(names), min_prevalence, max_prevalence,
    )
    kept_names = [name for name, flag in zip(names, keep) if flag]
    return kept_names, labels[:, keep]


def add_noise_tasks(
    names: Sequence[str], labels: np.ndarray, count: int, seed: int
) -> tuple[list[str], np.ndarray]:
    """Append `count` label-shuffled copies of real tasks.

    Copy i shuffles the labels of task i mod num_tasks across molecules with a seeded
    permutation, so it keeps that task's prevalence but carries no information about the
    molecule. Noise task names start with "noise:".
    """
    if count < 0:
        raise ValueError(f"noise task count must be >= 0, got {count}")
    if count == 0:
        return list(names), labels
    if labels.shape[1] == 0:
        raise ValueError("cannot add noise tasks: there are no real tasks to copy")
    rng = np.random.default_rng(seed)
    columns = []
    noise_names = []
    for copy in range(count):
        source = copy % labels.shape[1]
        columns.append(labels[rng.permutation(len(labels)), source])
        noise_names.append(f"{NOISE_PREFIX}{names[source]}#{copy}")
    noise = np.stack(columns, axis=1).astype(labels.dtype)
    return list(names) + noise_names, np.concatenate([labels, noise], axis=1)


def is_noise_task(name: str) -> bool:
    """Return whether a task name was produced by add_noise_tasks."""
    return name.startswith(NOISE_PREFIX)
