"""PNG plots of a finished experiment (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before this import)
import numpy as np  # noqa: E402

__all__ = ["plot_auroc", "plot_task_weights", "plot_val_loss"]

logger = logging.getLogger(__name__)

ARM_COLORS = {"uniform": "tab:blue", "meta": "tab:orange"}
EVALUATIONS = (("linear", "linear evaluation"), ("full", "full fine-tuning"))


def plot_auroc(runs: Sequence[dict], path: Path) -> Path:
    """Plot test AUROC per arm and seed, one panel per evaluation, with each seed's arms joined."""
    figure, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=False)
    arms = [arm for arm in ARM_COLORS if any(run["arm"] == arm for run in runs)]
    for axis, (evaluation, title) in zip(axes, EVALUATIONS):
        by_seed: dict[int, dict[str, float]] = {}
        for run in runs:
            by_seed.setdefault(run["seed"], {})[run["arm"]] = run[evaluation]["test_auroc"]
        for seed, values in sorted(by_seed.items()):
            xs = [arms.index(arm) for arm in arms if arm in values]
            ys = [values[arm] for arm in arms if arm in values]
            axis.plot(xs, ys, color="0.7", zorder=1)
            axis.scatter(xs, ys, c=[ARM_COLORS[a] for a in arms if a in values], zorder=2)
            axis.annotate(f"seed {seed}", (xs[-1], ys[-1]), xytext=(5, 0),
                          textcoords="offset points", fontsize=7)
        axis.set_xticks(range(len(arms)), arms)
        axis.set_xlim(-0.5, len(arms) - 0.5)
        axis.set_title(title)
        axis.set_ylabel("test AUROC (B3DB BBB)")
    return _save(figure, path)


def plot_task_weights(
    names: Sequence[str], weights: np.ndarray, noise: Sequence[bool], path: Path
) -> Path:
    """Plot learned task weights sorted by their mean over seeds, with noise tasks in red.

    `weights` is [num_seeds, num_tasks]. Error bars are the std over seeds.
    """
    weights = np.atleast_2d(weights)
    mean = weights.mean(axis=0)
    spread = weights.std(axis=0) if len(weights) > 1 else np.zeros_like(mean)
    order = np.argsort(mean)[::-1]
    colors = ["tab:red" if noise[i] else "tab:green" for i in order]
    figure, axis = plt.subplots(figsize=(max(8, 0.16 * len(names)), 4.5))
    axis.bar(range(len(order)), mean[order], yerr=spread[order], color=colors, width=0.8)
    axis.axhline(1.0, color="0.3", linestyle="--", linewidth=1, label="initial weight 1")
    axis.set_xticks(range(len(order)), [names[i] for i in order], rotation=90, fontsize=6)
    axis.set_ylabel("task weight 2*sigmoid(logit)")
    axis.set_title("Learned PT task weights (red: label-shuffled noise tasks)")
    axis.legend(loc="upper right")
    return _save(figure, path)


def plot_val_loss(curves: dict[int, tuple[Sequence[int], Sequence[float]]], path: Path) -> Path:
    """Plot the meta-FT val loss of every hyperstep against the PT step, one line per seed."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for index, (seed, (steps, losses)) in enumerate(sorted(curves.items())):
        color = f"C{index % 10}"
        axis.plot(steps, losses, color=color, alpha=0.3, linewidth=1)
        window = min(10, len(losses))
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            axis.plot(steps[window - 1:], smooth, color=color, linewidth=2,
                      label=f"seed {seed} (moving mean of {window})")
        else:
            axis.plot(steps, losses, color=color, marker="o", label=f"seed {seed}")
    axis.set_xlabel("PT step")
    axis.set_ylabel("meta-FT val loss (BCE)")
    axis.set_title("Meta-FT validation loss at each hyperstep (meta arm)")
    if curves:
        axis.legend()
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    logger.info("wrote plot %s", path)
    return path
