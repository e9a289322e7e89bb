"""PNG plots of a results dict (as written to results.json) with matplotlib's Agg backend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["write_all"]

logger = logging.getLogger(__name__)

MB = 2**20


def _clock(results: dict[str, Any]) -> tuple[str, str, str]:
    """Return the timing key, the ratio key and the axis word: CPU time on a CPU device (less
    sensitive to a shared machine), wall time on an accelerator."""
    if results["meta"]["machine"]["device"].startswith("cpu"):
        return "cpu_median_s", "cpu_ratio", "CPU"
    return "median_s", "time_ratio", "wall"


def _cost(results: dict[str, Any], path: Path) -> Path | None:
    cases = results.get("cost")
    if not cases:
        return None
    _, ratio_key, word = _clock(results)
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        labels = [row["label"] for row in case["hypersteps"]]
        ratios = [row[ratio_key] for row in case["hypersteps"]]
        ax.barh(range(len(labels)), ratios, color="tab:blue")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        for index, ratio in enumerate(ratios):
            ax.text(ratio, index, f" {ratio:.1f}", va="center", fontsize=7)
        ax.set_xlim(0, 1.15 * max(ratios))
        ax.set_xlabel(f"hyperstep {word} time / plain PT step {word} time")
        ax.set_title(f"{case['problem']} ({case['pt_parameters']:,} PT params)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _scaling(results: dict[str, Any], path: Path) -> Path | None:
    data = results.get("scaling")
    if not data:
        return None
    time_key, _, word = _clock(results)
    phase_key = "cpu_s" if word == "CPU" else "wall_s"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    params = [row["pt_parameters"] for row in data["model_size"]]
    for key, label in (("pt_step", "PT step"), ("hyperstep", "hyperstep (default)")):
        left.plot(params, [row[key][time_key] for row in data["model_size"]], "o-",
                  label=label)
    left.set(xscale="log", yscale="log", xlabel="PT parameters",
             ylabel=f"median {word} time (s)", title="time vs model size (GIN, width sweep)")
    left.legend()
    counts = [row["meta_parameters"] for row in data["meta_count"]]
    for key, label in (("pt_step", "PT step"), ("hyperstep", "hyperstep (default)")):
        right.plot(counts, [row[key][time_key] for row in data["meta_count"]], "o-",
                   label=label)
    right.plot(counts, [row["phases"][phase_key]["meta_vjp"] for row in data["meta_count"]],
               "s--", label="final VJP (reference phases)")
    right.set(xscale="log", yscale="log", xlabel="meta-parameters (task weights)",
              ylabel=f"median {word} time (s)",
              title="time vs meta-parameter count (GIN 3x64)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _accuracy(results: dict[str, Any], path: Path) -> Path | None:
    data = results.get("accuracy")
    if not data:
        return None
    problems = [(name, data[name]) for name in ("mlp", "ridge") if "rows" in data.get(name, {})]
    fig, axes = plt.subplots(1, len(problems), figsize=(5 * len(problems), 4), squeeze=False)
    for ax, (name, problem) in zip(axes[0], problems):
        for family in ("Neumann J", "CG iterations", "UnrolledPT T"):
            rows = [r for r in problem["rows"] if r["estimator"] == family]
            ax.plot([max(r["value"], 0.5) for r in rows],
                    [max(r["relative_error"], 1e-17) for r in rows], "o-", label=family)
        ax.set(xscale="log", yscale="log", xlabel="J, CG iterations or T (J=0 drawn at 0.5)",
               ylabel="relative error vs exact", title=f"{name} problem (float64)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _memory(results: dict[str, Any], path: Path) -> Path | None:
    data = results.get("flatness")
    if not data:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, trace in data["traces"].items():
        tracked = [value / MB for value in trace["tracked_bytes"]]
        rss = [value / MB for value in trace["rss_bytes"]]
        left.plot(range(1, len(tracked) + 1), tracked, label=label)
        right.plot(range(1, len(rss) + 1), rss, label=label)
    left.set(xlabel="hyperstep", ylabel="tensor storages alive, created in the loop (MiB)",
             title=f"tracked tensor memory ({data['problem']})")
    right.set(xlabel="hyperstep", ylabel="process RSS (MiB)", title="process RSS")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    """Write every plot whose section is in ``results``; return the written paths."""
    written = []
    for name, draw in (("cost", _cost), ("scaling", _scaling), ("accuracy", _accuracy),
                       ("memory", _memory)):
        try:
            figure = draw(results, out / f"{name}.png")
        except (KeyError, TypeError, ValueError) as error:
            logger.warning("plot %s failed: %s", name, error)
            continue
        if figure is not None:
            written.append(figure)
    return written
