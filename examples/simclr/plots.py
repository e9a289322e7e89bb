"""PNG plots of a SimCLR comparison run (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402

from .augment import LearnedWarp  # noqa: E402

__all__ = ["plot_augmentations", "plot_magnitude", "plot_test_metrics"]

logger = logging.getLogger(__name__)

ARM_COLOURS = {"fixed": "tab:gray", "meta": "tab:blue"}


def plot_test_metrics(summary: dict[str, Any], path: Path) -> None:
    """Plot test accuracy and AUROC per arm and evaluation.

    Bars show the mean over seeds with ±1 std error bars, and dots the single seeds.
    """
    evaluations = ("linear", "finetune")
    arms = list(ARM_COLOURS)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, label in zip(axes, ("accuracy", "auroc"), ("accuracy", "macro AUROC")):
        width = 0.8 / len(arms)
        for arm_index, arm in enumerate(arms):
            for eval_index, evaluation in enumerate(evaluations):
                stats = summary[arm][evaluation][metric]
                x = eval_index + (arm_index - (len(arms) - 1) / 2) * width
                ax.bar(x, stats["mean"], width, yerr=_finite(stats["std"]), capsize=3,
                       color=ARM_COLOURS[arm], label=arm if eval_index == 0 else None)
                ax.plot([x] * len(stats["values"]), stats["values"], "k.", markersize=4)
        ax.set_xticks(range(len(evaluations)), ["linear probe", "full fine-tune"])
        ax.set_ylabel(f"test {label}")
        low = min(v for arm in arms for e in evaluations for v in summary[arm][e][metric]["values"])
        ax.set_ylim(max(0.0, low - 0.05), 1.0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(arms))
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.9))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(value: float) -> float:
    # One seed gives a NaN std, which matplotlib cannot draw as an error bar.
    return value if value == value else 0.0


def plot_magnitude(records: Sequence[dict[str, Any]], init_magnitude: float, path: Path) -> None:
    """Plot the meta arm's learned global warp magnitude against PT steps, one line per seed."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for record in records:
        steps, values = zip(*record["arms"]["meta"]["history"]["magnitude"])
        ax.plot(steps, values, marker=".", label=f"meta, seed {record['seed']}")
    ax.axhline(init_magnitude, color=ARM_COLOURS["fixed"], linestyle="--", label="fixed arm")
    ax.set_xlabel("PT step")
    ax.set_ylabel("global warp magnitude\n(half-image-width units)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_augmentations(
    images: torch.Tensor,
    initial_state: dict[str, torch.Tensor],
    learned: LearnedWarp,
    path: Path,
    seed: int,
    columns: int = 10,
) -> None:
    """Show images, their warp before meta-learning and after it, with the same warp noise.

    Both networks run in train mode on all of ``images`` ``[N, 1, H, W]``, so their
    BatchNorm layers use batch statistics as during PT. The first ``columns`` images
    are shown, titled with their amplitude. The networks are copies, which leaves
    ``learned`` unchanged.
    """
    before = copy.deepcopy(learned)
    before.load_state_dict(initial_state)
    after = copy.deepcopy(learned)
    device = learned.magnitude.device
    batch = images.to(device)
    rows = [("original", batch, None)]
    with torch.no_grad():
        for name, warp in (("before", before), ("after", after)):
            generator = torch.Generator().manual_seed(seed)
            warped, amplitudes = warp.train().warp_with_amplitudes(batch, generator)
            rows.append((name, warped, amplitudes))

    columns = min(columns, len(images))
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns, 1.5 * len(rows)),
                             squeeze=False)
    for row, (name, row_images, amplitudes) in enumerate(rows):
        for column in range(columns):
            ax = axes[row][column]
            ax.imshow(row_images[column, 0].cpu().numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if amplitudes is not None:
                ax.set_title(f"{amplitudes[column].item():.3f}", fontsize=8)
        axes[row][0].set_ylabel(name)
    fig.suptitle("learned warp before and after meta-learning (titles: amplitude)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
