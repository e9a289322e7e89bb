"""One experiment: prepare the data, pre-train both arms per seed, evaluate and write results.

PT: multitask prediction of RDKit-derived fragment and descriptor labels on ChEMBL and NCI
molecules. FT: blood-brain-barrier permeability of B3DB with a scaffold split. The uniform arm
keeps every task weight at 1. The meta arm learns the weights with metaopt hypersteps on the
meta-FT train and val splits. Both arms are evaluated on the test split by linear evaluation
and full fine-tuning.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data

from .config import ARMS, ExperimentConfig
from .data import MoleculeData, load_molecule_data, scaffold_split
from .evaluate import full_finetune, linear_evaluation, summarise
from .plots import plot_auroc, plot_task_weights, plot_val_loss
from .tasks import add_noise_tasks, is_noise_task, select_tasks_by_prevalence
from .train import PTResult, pretrain, task_weights

__all__ = ["PreparedData", "prepare_data", "run"]

logger = logging.getLogger(__name__)

NOISE_TASK_SEED = 0  # one fixed shuffle, so both arms and all seeds see the same noise tasks
MIN_REAL_TASKS = 50


@dataclass
class PreparedData:
    """PT graphs with task labels and the three FT splits, ready for training."""

    pt_graphs: list[Data]  # y: [1, num_tasks] float32
    task_names: list[str]
    task_prevalence: list[float]
    splits: tuple[list[Data], list[Data], list[Data]]  # meta-FT train, meta-FT val, test
    description: dict[str, object]


def prepare_data(config: ExperimentConfig) -> PreparedData:
    """Load or build the molecule graphs, derive the PT tasks and split the FT molecules."""
    data = load_molecule_data(
        config.cache_dir, config.moses, config.max_ft_molecules, config.max_pt_molecules
    )
    names, labels = select_tasks_by_prevalence(
        data.task_names, data.pt_labels, config.min_prevalence, config.max_prevalence
    )
    if len(names) < MIN_REAL_TASKS:
        logger.warning(
            "only %d PT tasks pass the prevalence filter (expected >= %d with the full data)",
            len(names), MIN_REAL_TASKS,
        )
    names, labels = add_noise_tasks(names, labels, config.noise_tasks, NOISE_TASK_SEED)
    targets = torch.from_numpy(labels.astype(np.float32))
    for graph, row in zip(data.pt_graphs, targets):
        graph.y = row.unsqueeze(0)
    for graph, label in zip(data.ft_graphs, data.ft_labels):
        graph.y = torch.tensor([float(label)])
    indices = scaffold_split(data.ft_scaffolds, config.split_fractions, config.split_seed)
    splits = tuple([data.ft_graphs[i] for i in split] for split in indices)
    return PreparedData(
        pt_graphs=data.pt_graphs,
        task_names=names,
        task_prevalence=labels.mean(axis=0).tolist(),
        splits=splits,
        description=_describe(data, names, indices),
    )


def _describe(
    data: MoleculeData, names: Sequence[str], indices: Sequence[np.ndarray]
) -> dict[str, object]:
    split_names = ("meta_ft_train", "meta_ft_val", "test")
    splits = {}
    for name, split in zip(split_names, indices):
        splits[name] = {
            "molecules": len(split),
            "scaffolds": len({data.ft_scaffolds[i] for i in split}),
            "bbb_positive_fraction": float(data.ft_labels[split].mean()) if len(split) else None,
        }
    return {
        "sources": dict(data.stats),
        "loaded_from_cache": data.from_cache,
        "pt_molecules": len(data.pt_graphs),
        "real_tasks": sum(not is_noise_task(n) for n in names),
        "noise_tasks": sum(is_noise_task(n) for n in names),
        "splits": splits,
    }


def _save_checkpoint(result: PTResult, config: ExperimentConfig) -> Path:
    path = config.out / "checkpoints" / f"{result.arm}-seed{result.seed}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": result.model.state_dict(),
            "task_logits": result.task_logits.cpu(),
            "meta_optimizer": result.meta_state,
            "config": config.to_json(),
        },
        path,
    )
    return path


def _run_one(
    arm: str, seed: int, config: ExperimentConfig, prepared: PreparedData, quiet: bool
) -> dict[str, object]:
    result = pretrain(arm, seed, config, prepared.pt_graphs, prepared.splits[:2], quiet)
    checkpoint = _save_checkpoint(result, config)
    start = time.perf_counter()
    linear = linear_evaluation(result.model.encoder, prepared.splits, config, seed)
    full = full_finetune(result.model.encoder, prepared.splits, config, seed)
    logger.info(
        "%s seed %d: test AUROC linear %.4f, full FT %.4f (evaluation %.1f s)",
        arm, seed, linear["test_auroc"], full["test_auroc"], time.perf_counter() - start,
    )
    return {
        "arm": arm,
        "seed": seed,
        "pt_seconds": result.seconds,
        "eval_seconds": time.perf_counter() - start,
        "pt_losses": result.pt_losses,
        "hypersteps": result.hypersteps,
        "task_logits": result.task_logits.cpu().tolist(),
        "task_weights": task_weights(result.task_logits).cpu().tolist(),
        "linear": linear,
        "full": full,
        "checkpoint": str(checkpoint),
    }


def _weight_summary(runs: Sequence[dict], names: Sequence[str]) -> dict[str, object]:
    """Compare the learned weights of real and noise tasks, per meta seed and over seeds.

    "noise_percentile" is the mean percentile rank of the noise tasks' weights among all tasks
    (0 = lowest weight, 1 = highest). Weights unrelated to noise give about 0.5.
    """
    noise = np.array([is_noise_task(n) for n in names])
    per_seed = {}
    for run in runs:
        if run["arm"] != "meta":
            continue
        weights = np.asarray(run["task_weights"])
        percentiles = weights.argsort().argsort() / max(len(weights) - 1, 1)
        per_seed[run["seed"]] = {
            "real_mean": float(weights[~noise].mean()) if (~noise).any() else math.nan,
            "noise_mean": float(weights[noise].mean()) if noise.any() else math.nan,
            "noise_percentile": float(percentiles[noise].mean()) if noise.any() else math.nan,
        }
    summary: dict[str, object] = {"per_seed": per_seed}
    for key in ("real_mean", "noise_mean", "noise_percentile"):
        values = [entry[key] for entry in per_seed.values()]
        summary[key] = float(np.mean(values)) if values else math.nan
    return summary


def _plot(runs: Sequence[dict], names: Sequence[str], out: Path) -> dict[str, str]:
    plots = {"auroc": str(plot_auroc(runs, out / "test_auroc.png"))}
    meta_runs = [run for run in runs if run["arm"] == "meta"]
    if meta_runs:
        weights = np.array([run["task_weights"] for run in meta_runs])
        noise = [is_noise_task(n) for n in names]
        plots["task_weights"] = str(plot_task_weights(names, weights, noise,
                                                      out / "task_weights.png"))
        curves = {
            run["seed"]: ([h["step"] for h in run["hypersteps"]],
                          [h["val_loss"] for h in run["hypersteps"]])
            for run in meta_runs
        }
        plots["val_loss"] = str(plot_val_loss(curves, out / "meta_ft_val_loss.png"))
    return plots


def _number(value: float | None, spec: str) -> str:
    """Format a statistic, or "n/a" where one seed leaves it undefined (NaN or None)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def _cell(stats: dict, signed: bool = False) -> str:
    mean = format(stats["mean"], "+.4f" if signed else ".4f")
    return f"{mean:>15} ± {_number(stats['std'], '.4f'):<6}"


def _format_summary(summary: dict, weights: dict, seeds: Sequence[int]) -> str:
    lines = [
        f"test AUROC, mean ± std over seeds {', '.join(map(str, seeds))}",
        f"{'arm':<10}{'linear evaluation':>24}{'full fine-tuning':>24}",
    ]
    for arm in ARMS:
        if arm not in summary["linear"]:
            continue
        cells = [summary[e][arm] for e in ("linear", "full")]
        row = "".join(_cell(c) for c in cells)
        lines.append(f"{arm:<10}{row}")
    if "paired" in summary["linear"]:
        cells = [summary[e]["paired"] for e in ("linear", "full")]
        row = "".join(_cell(c, signed=True) for c in cells)
        lines.append(f"{'meta-unif':<10}{row}")
        p_values = "".join(f"{'p = ' + _number(c['t_test_p'], '.3g'):>24}" for c in cells)
        lines.append(f"{'paired t':<10}{p_values}")
    if weights["per_seed"]:
        lines.append(
            f"mean learned task weight: real tasks {weights['real_mean']:.4f}, "
            f"noise tasks {weights['noise_mean']:.4f} (initial 1), mean percentile rank of "
            f"noise tasks {weights['noise_percentile']:.2f} (0.5 = no preference)"
        )
    return "\n".join(lines)


def _finite_or_none(value: object) -> object:
    """Replace NaN and infinite floats by None, recursively, so the JSON output is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def run(config: ExperimentConfig, quiet: bool = False) -> dict[str, object]:
    """Run every arm for every seed, evaluate, write results.json, checkpoints and plots."""
    config.validate()
    start = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(config)
    runs = []
    for seed in config.seeds:
        for arm in config.arms:
            runs.append(_run_one(arm, seed, config, prepared, quiet))
    summary = summarise(runs, config.arms)
    weights = _weight_summary(runs, prepared.task_names)
    results = {
        "config": config.to_json(),
        "data": prepared.description,
        "tasks": {"names": prepared.task_names, "prevalence": prepared.task_prevalence},
        "runs": runs,
        "summary": summary,
        "task_weight_summary": weights,
        "plots": _plot(runs, prepared.task_names, config.out),
        "seconds": time.perf_counter() - start,
    }
    path = config.out / "results.json"
    path.write_text(json.dumps(_finite_or_none(results), indent=1, allow_nan=False))
    logger.info("wrote %s (%.1f s in total)", path, results["seconds"])
    print(_format_summary(summary, weights, config.seeds))
    return results
