"""Command line of the molecular task-weighting example.

Run from the repository root: `python -m examples.molecules --help`. See experiment.py for what
a run does.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from .config import ARMS, ESTIMATORS, FT_MODES, ExperimentConfig
from .data import DEFAULT_CACHE_DIR, find_package_dir
from .experiment import run
from .model import POOLINGS

__all__ = ["build_parser", "config_from_args", "main"]

logger = logging.getLogger(__name__)

PAPER_LAYERS, PAPER_HIDDEN = 5, 300  # GIN size used by Raghu et al. 2021


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser. Every option maps to an ExperimentConfig field."""
    defaults = ExperimentConfig()
    parser = argparse.ArgumentParser(
        prog="python -m examples.molecules",
        description=(
            "Learn PT task weights for a molecular GIN with metaopt and compare them with "
            "uniform weights on B3DB blood-brain-barrier permeability (scaffold split)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_run_options(parser, defaults)
    _add_data_options(parser, defaults)
    _add_model_options(parser, defaults)
    _add_training_options(parser, defaults)
    _add_evaluation_options(parser, defaults)
    return parser


def _add_run_options(parser: argparse.ArgumentParser, d: ExperimentConfig) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", type=Path, default=d.out,
                       help="results directory (results.json, checkpoints/, PNG plots)")
    group.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                       help="folder for the featurised molecule graphs")
    group.add_argument("--no-cache", action="store_true",
                       help="featurise the molecules again and write no cache")
    group.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda:0")
    group.add_argument("--threads", type=int, default=d.threads,
                       help="CPU threads for torch ops, 0 for torch's default. One thread is "
                            "the default because batches of small graphs give each op little "
                            "work, and extra threads waiting on busy cores slow every op")
    group.add_argument("--seeds", type=int, nargs="+", default=d.seeds,
                       help="seeds (each arm runs once per seed)")
    group.add_argument("--arms", nargs="+", choices=ARMS, default=d.arms, help="arms to run")
    group.add_argument("--quiet", action="store_true",
                       help="hide progress bars and log only warnings")


def _add_data_options(parser: argparse.ArgumentParser, d: ExperimentConfig) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--max-ft-molecules", type=int, default=d.max_ft_molecules,
                       help="use a seeded random subset of this many B3DB rows (default: all)")
    group.add_argument("--max-pt-molecules", type=int, default=d.max_pt_molecules,
                       help="use a seeded random subset of this many PT rows (default: all)")
    group.add_argument("--moses", type=int, default=d.moses, metavar="N",
                       help="add the first N MOSES training molecules to PT (needs molsets)")
    group.add_argument("--noise-tasks", type=int, default=d.noise_tasks, metavar="N",
                       help="add N label-shuffled copies of real tasks")
    group.add_argument("--min-prevalence", type=float, default=d.min_prevalence,
                       help="drop PT tasks with a smaller fraction of positives")
    group.add_argument("--max-prevalence", type=float, default=d.max_prevalence,
                       help="drop PT tasks with a larger fraction of positives")
    group.add_argument("--split-seed", type=int, default=d.split_seed,
                       help="shuffle scaffold groups with this seed (default: deterministic "
                            "largest-scaffold-first split)")


def _add_model_options(parser: argparse.ArgumentParser, d: ExperimentConfig) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--layers", type=int, default=d.layers, help="GIN layers")
    group.add_argument("--hidden", type=int, default=d.hidden, help="GIN width (features)")
    group.add_argument("--dropout", type=float, default=d.dropout, help="dropout probability")
    group.add_argument("--pooling", choices=sorted(POOLINGS), default=d.pooling,
                       help="graph pooling")
    group.add_argument("--paper-size", action="store_true",
                       help=f"use a {PAPER_LAYERS}-layer, {PAPER_HIDDEN}-wide GIN "
                            "(overrides --layers and --hidden)")


def _add_training_options(parser: argparse.ArgumentParser, d: ExperimentConfig) -> None:
    group = parser.add_argument_group("pre-training and meta-learning")
    group.add_argument("--pt-steps", type=int, default=d.pt_steps, help="PT steps per arm")
    group.add_argument("--pt-batch-size", type=int, default=d.pt_batch_size,
                       help="PT batch size (molecules)")
    group.add_argument("--pt-lr", type=float, default=d.pt_lr, help="PT Adam learning rate")
    group.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                       help="PT steps before the first hyperstep (meta-FT head trains plainly)")
    group.add_argument("--hyper-interval", type=int, default=d.hyper_interval, metavar="M",
                       help="PT steps between hypersteps")
    group.add_argument("--meta-lr", type=float, default=d.meta_lr,
                       help="Adam learning rate of the task logits")
    group.add_argument("--pt-estimator", choices=ESTIMATORS, default=d.pt_estimator,
                       help="PT-stage hypergradient estimator")
    group.add_argument("--neumann-terms", type=int, default=d.neumann_terms,
                       help="Neumann series terms J")
    group.add_argument("--cg-iterations", type=int, default=d.cg_iterations,
                       help="conjugate gradient iterations")
    group.add_argument("--cg-damping", type=float, default=d.cg_damping,
                       help="ridge added to the PT Hessian by the conjugate gradient estimator "
                            "(use > 0 when it reports negative curvature)")
    group.add_argument("--unroll-steps", type=int, default=d.unroll_steps,
                       help="PT steps differentiated through by the unrolled estimator")
    group.add_argument("--ft-mode", choices=FT_MODES, default=d.ft_mode,
                       help="meta FT stage: head (unrolled head), full (unrolled encoder and "
                            "head) or implicit (implicit function theorem on the head)")
    group.add_argument("--ft-steps", type=int, default=d.ft_steps, metavar="K",
                       help="FT steps per hyperstep")
    group.add_argument("--meta-ft-lr", type=float, default=d.meta_ft_lr,
                       help="Adam learning rate of the meta-FT head")
    group.add_argument("--meta-ft-batch-size", type=int, default=d.meta_ft_batch_size,
                       help="meta-FT train and val batch size (molecules)")


def _add_evaluation_options(parser: argparse.ArgumentParser, d: ExperimentConfig) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                       help="batch size of evaluation and full fine-tuning (molecules)")
    group.add_argument("--linear-steps", type=int, default=d.linear_steps,
                       help="full-batch Adam steps of the linear evaluation head")
    group.add_argument("--linear-lr", type=float, default=d.linear_lr,
                       help="Adam learning rate of the linear evaluation head")
    group.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                       help="epochs of full fine-tuning over the meta-FT train split")
    group.add_argument("--finetune-lr", type=float, default=d.finetune_lr,
                       help="Adam learning rate of full fine-tuning")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Build an ExperimentConfig from parsed arguments."""
    config = ExperimentConfig()
    for name in vars(config):
        if hasattr(args, name):
            setattr(config, name, getattr(args, name))
    config.cache_dir = None if args.no_cache else args.cache_dir
    if args.paper_size:
        config.layers, config.hidden = PAPER_LAYERS, PAPER_HIDDEN
    return config


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Parse the command line, run the experiment and return the results dictionary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    config = config_from_args(args)
    try:
        config.validate()
        if config.moses > 0:
            find_package_dir("moses", "pip install --no-deps molsets")
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    with logging_redirect_tqdm():
        return run(config, quiet=args.quiet)
