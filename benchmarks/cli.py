"""Command line of ``python -m benchmarks``: run the sections, write JSON and plots."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import metaopt

from . import accuracy, cost, flatness, others, profiling, reference, scaling
from .cost import TimingPolicy
from .problems import ConvSize, GINSize, build_conv, build_gin

__all__ = ["main", "SECTIONS", "Plan", "plan_for"]

logger = logging.getLogger(__name__)

# Run order: the memory trace first, while the allocator keeps little freed memory.
SECTIONS = ("flatness", "accuracy", "scaling", "reference", "others", "cost", "profile")
DEFAULT_OUT = Path("results/benchmarks")
DEFAULT_OTHERS = Path("/tmp/others")

GIN_DEFAULT = GINSize(layers=3, hidden=64, tasks=128)
GIN_PAPER = GINSize(layers=5, hidden=300, tasks=5000)
CONV_DEFAULT = ConvSize(width=32, layers=3, images=32)
CONV_LARGE = ConvSize(width=64, layers=4, images=32)


@dataclasses.dataclass
class CostCase:
    """One problem of the cost section with its timing policy and amortised plan."""

    name: str
    build: Callable[[], Any]
    policy: TimingPolicy
    skip_heavy: bool
    amortised: list[tuple[int, int]]


@dataclasses.dataclass
class Plan:
    """Sizes and repeat counts of one benchmark mode."""

    cost_cases: list[CostCase]
    reference_cases: list[tuple[str, Callable[[], Any], int, int]]
    reference_repeats: int
    others_repeats: int
    scaling_policy: TimingPolicy
    phase_repeats: int
    flatness_hypersteps: int
    profile_calls: int


def plan_for(quick: bool, device: torch.device, seed: int) -> Plan:
    """Return the sizes of ``--quick`` (paper sizes skipped) or of the full run."""
    gin = functools.partial(build_gin, GIN_DEFAULT, device, seed)
    conv = functools.partial(build_conv, CONV_DEFAULT, device, seed)
    fast = TimingPolicy(warmup=1, min_repeats=2, max_repeats=5, budget_s=1.0)
    thorough = TimingPolicy(warmup=1, min_repeats=3, max_repeats=10, budget_s=3.0)
    large = TimingPolicy(warmup=1, min_repeats=2, max_repeats=3, budget_s=1.0)
    if quick:
        cases = [
            CostCase("gin-default", gin, fast, False, [(1, 10), (10, 30), (100, 100)]),
            CostCase("conv-default", conv, fast, True, [(10, 20)]),
        ]
        return Plan(cases, [("gin-default", gin, 1, 1), ("gin-default", gin, 5, 5),
                            ("conv-default", conv, 1, 1)],
                    reference_repeats=5, others_repeats=5, scaling_policy=fast,
                    phase_repeats=2, flatness_hypersteps=60, profile_calls=20)
    gin_paper = functools.partial(build_gin, GIN_PAPER, device, seed)
    conv_large = functools.partial(build_conv, CONV_LARGE, device, seed)
    cases = [
        CostCase("gin-default", gin, thorough, False, [(1, 20), (10, 50), (100, 200)]),
        CostCase("gin-paper", gin_paper, large, False, [(1, 5), (10, 20)]),
        CostCase("conv-default", conv, thorough, False, [(1, 10), (10, 30), (100, 100)]),
        CostCase("conv-large", conv_large, large, True, [(10, 20)]),
    ]
    return Plan(cases, [("gin-default", gin, 1, 1), ("gin-default", gin, 5, 5),
                        ("gin-default", gin, 20, 1), ("gin-paper", gin_paper, 1, 1),
                        ("conv-default", conv, 1, 1), ("conv-large", conv_large, 1, 1)],
                reference_repeats=7, others_repeats=7, scaling_policy=thorough,
                phase_repeats=5, flatness_hypersteps=200, profile_calls=40)


def _run_cost(plan: Plan, args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for case in plan.cost_cases:
        row = cost.run_problem(case.build, device, case.policy, skip_heavy=case.skip_heavy,
                               amortised_plan=case.amortised)
        row["case"] = case.name
        row["skipped_heavy"] = case.skip_heavy
        rows.append(row)
    return rows


def _run_reference(plan: Plan, args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for name, build, terms, ft_steps in plan.reference_cases:
        logger.info("reference: %s, J=%d, K=%d", name, terms, ft_steps)
        row = reference.compare(build, device, terms=terms, ft_steps=ft_steps,
                                repeats=plan.reference_repeats)
        row["case"] = name
        rows.append(row)
    return rows


def _run_others(plan: Plan, args: argparse.Namespace, device: torch.device) -> dict:
    logger.info("other libraries: from %s", args.others_path)
    return others.run(args.others_path, device, size=GIN_DEFAULT, terms=1, ft_steps=1,
                      repeats=plan.others_repeats, threads=args.threads, timeout_s=600)


def _run_accuracy(plan: Plan, args: argparse.Namespace, device: torch.device) -> dict:
    return accuracy.run(seed=args.seed)


def _run_scaling(plan: Plan, args: argparse.Namespace, device: torch.device) -> dict:
    return scaling.run(device, plan.scaling_policy, phase_repeats=plan.phase_repeats)


def _run_flatness(plan: Plan, args: argparse.Namespace, device: torch.device) -> dict:
    return flatness.run(device, plan.flatness_hypersteps)


def _run_profile(plan: Plan, args: argparse.Namespace, device: torch.device) -> dict:
    build = functools.partial(build_gin, GIN_DEFAULT, device, args.seed)
    return profiling.run(build, plan.profile_calls)


RUNNERS: dict[str, Callable[[Plan, argparse.Namespace, torch.device], Any]] = {
    "cost": _run_cost, "reference": _run_reference, "others": _run_others,
    "accuracy": _run_accuracy, "scaling": _run_scaling, "flatness": _run_flatness,
    "profile": _run_profile,
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    """Return the short commit, with ``+dirty`` when ``metaopt/`` has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, cwd=root).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "metaopt"],
                                capture_output=True, text=True, check=True, cwd=root).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if status.strip() else "")


def machine(device: torch.device) -> dict[str, Any]:
    """Describe the machine, the software versions and the current load."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "metaopt": metaopt.__version__,
        "git_commit": _git_commit(),
        "device": str(device),
        "load_average_start": os.getloadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure metaopt: cost per estimator, a reference formulation, TorchOpt "
                    "and Betty, accuracy, scaling and memory over many hypersteps.")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (paper sizes skipped)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder for results.json and the plots "
                             f"(default: {DEFAULT_OUT})")
    parser.add_argument("--device", default="cpu",
                        help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op CPU threads; 0 keeps torch's default. One thread "
                             "keeps CPU timings stable on a shared machine (default: 1)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of "
                             f"{','.join(SECTIONS)})")
    parser.add_argument("--others-path", type=Path, default=DEFAULT_OTHERS,
                        help="folder holding TorchOpt and Betty, installed with pip install "
                             f"--no-deps --target (default: {DEFAULT_OTHERS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of models and data")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    return args


def _write(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, default=str))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the requested sections; each one's result or error lands in the returned dict."""
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    plan = plan_for(args.quick, device, args.seed)
    results: dict[str, Any] = {"meta": {
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "quick": args.quick, "threads": args.threads, "sections": args.sections,
        "machine": machine(device), "section_seconds": {}, "errors": {},
    }}
    start = time.perf_counter()
    for section in args.sections:
        logger.info("section %s", section)
        began = time.perf_counter()
        try:
            results[section] = RUNNERS[section](plan, args, device)
        except Exception as error:  # noqa: BLE001 - keep the other sections' results
            logger.exception("section %s failed", section)
            results["meta"]["errors"][section] = f"{type(error).__name__}: {error}\n" + \
                traceback.format_exc(limit=6)
        results["meta"]["section_seconds"][section] = time.perf_counter() - began
        _write(results, path)
    results["meta"]["total_seconds"] = time.perf_counter() - start
    results["meta"]["machine"]["load_average_end"] = os.getloadavg()
    _write(results, path)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 1 when a section failed."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = run(args)
    if not args.no_plots:
        from . import plots

        for figure in plots.write_all(results, args.out):
            logger.info("wrote %s", figure)
    logger.info("wrote %s in %.0f s", args.out / "results.json",
                results["meta"]["total_seconds"])
    return 1 if results["meta"]["errors"] else 0
