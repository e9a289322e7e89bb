"""TorchOpt's implicit differentiation and Betty's hypergradients on the GIN problem.

Each library computes the default hypergradient of Raghu et al. (2021): ``K`` unrolled SGD
steps of the FT head, then a truncated Neumann series with step ``alpha`` equal to the PT
learning rate. All start from the same state and batches as metaopt.

The comparison runs in a child process, ``python -m benchmarks.others``, with the libraries'
install folder on ``PYTHONPATH``, so that they never enter the main environment. :func:`run`
starts that process. A missing or failing library is recorded as an error entry, not raised.

- TorchOpt: ``torchopt.diff.implicit.custom_root`` with the optimality condition
  ``torch.func.grad`` of the PT loss (a ``functional_call`` of a copy of the model whose
  BatchNorm layers keep no running statistics, as ``torch.func`` forbids that mutation) and
  ``torchopt.linear_solve.solve_inv(ns=True, maxiter=J, alpha=alpha)``.
- Betty: an ``ImplicitProblem`` for PT (``Config(type="neumann")``) below an
  ``ImplicitProblem`` holding the task logits, whose loss is the FT val loss after the unrolled
  head steps. Betty takes ``dL/dtheta`` without ``allow_unused``, so the upper loss adds
  ``0 * sum(PT head parameters)``: the value and the gradients are unchanged.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import metaopt

from .measure import peak_memory, time_interleaved
from .problems import GINSize, Problem, RecordingSGD, build_gin, make_meta
from .reference import cosine, relative_difference

__all__ = ["run", "main"]

logger = logging.getLogger(__name__)

LIBRARIES = {"torchopt": "torchopt", "betty": "betty-ml"}


def _unrolled_head_val_loss(
    problem: Problem,
    features: Callable[[Any], torch.Tensor],
    train: list[Any],
    val: Any,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``len(train)`` differentiable SGD steps of the linear FT head; return the val loss
    and the final head tensors."""
    head = problem.head
    fast = [head.weight.detach().requires_grad_(), head.bias.detach().requires_grad_()]
    for graphs, labels in train:
        loss = F.binary_cross_entropy_with_logits(F.linear(features(graphs), *fast), labels)
        grads = torch.autograd.grad(loss, fast, create_graph=True)
        fast = [f - problem.ft_lr * g for f, g in zip(fast, grads)]
    graphs, labels = val
    return F.binary_cross_entropy_with_logits(F.linear(features(graphs), *fast), labels), fast


def _copy_head(problem: Problem, fast: list[torch.Tensor]) -> None:
    with torch.no_grad():
        problem.head.weight.copy_(fast[0])
        problem.head.bias.copy_(fast[1])


class _Batches:
    """The FT batches in metaopt's order: ``K`` train batches, then one val batch."""

    def __init__(self, problem: Problem, ft_steps: int) -> None:
        self._train = itertools.cycle(problem.ft_train)
        self._val = itertools.cycle(problem.ft_val)
        self.ft_steps = ft_steps

    def next(self) -> tuple[list[Any], Any]:
        return [next(self._train) for _ in range(self.ft_steps)], next(self._val)


class TorchOptHyperstep:
    """The default hyperstep with TorchOpt's ``custom_root`` and Neumann solver."""

    def __init__(self, problem: Problem, terms: int, ft_steps: int) -> None:
        torchopt = importlib.import_module("torchopt")
        from torch.func import functional_call, grad

        self.problem = problem
        self.batches = _Batches(problem, ft_steps)
        self.meta_optimizer = RecordingSGD(problem.meta_params, lr=0.0)
        model = problem.model
        pt_model = copy.deepcopy(model)
        torch.func.replace_all_batch_norm_modules_(pt_model)
        self.names = [name for name, _ in model.named_parameters()]
        logits = problem.meta_params[0]

        def objective(theta: tuple[torch.Tensor, ...], phi: torch.Tensor, batch: Any):
            graphs, labels = batch
            out = functional_call(pt_model, dict(zip(self.names, theta)), (graphs,))
            return _task_loss(out, labels, phi)

        def optimality(theta: tuple[torch.Tensor, ...], phi: torch.Tensor, batch: Any):
            return grad(objective, argnums=0)(theta, phi, batch)

        solver = torchopt.linear_solve.solve_inv(ns=True, maxiter=terms, alpha=problem.pt_lr)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solver)
        def solve(theta: tuple[torch.Tensor, ...], phi: torch.Tensor, batch: Any):
            return theta  # the PT weights are taken as the optimum, as in metaopt

        self._solve = solve
        self._logits = logits
        self._functional_call = functional_call

    def step(self, pt_batch: Any) -> list[torch.Tensor]:
        problem = self.problem
        theta = tuple(p.detach() for p in problem.model.parameters())
        theta_star = self._solve(theta, self._logits, pt_batch)
        params = dict(zip(self.names, theta_star))
        buffers = dict(problem.model.named_buffers())
        problem.model.eval()

        def features(graphs: Any) -> torch.Tensor:
            encoder = {**params, **buffers}
            return self._functional_call(problem.model, encoder, (graphs,),
                                         kwargs={"features_only": True})

        train, val = self.batches.next()
        val_loss, fast = _unrolled_head_val_loss(problem, features, train, val)
        (hypergrad,) = torch.autograd.grad(val_loss, [self._logits])
        problem.model.train()
        _copy_head(problem, fast)
        self._logits.grad = hypergrad
        self.meta_optimizer.step()
        self._logits.grad = None
        return [hypergrad]


def _task_loss(logits: torch.Tensor, labels: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (2 * torch.sigmoid(phi) * bce).mean()


class _GINWithHead(nn.Module):
    """``ModuleDict``-free view of the GIN problem's model for ``functional_call``."""

    def __init__(self, model: nn.ModuleDict) -> None:
        super().__init__()
        self.encoder = model["encoder"]
        self.pt_head = model["pt_head"]

    def forward(self, graphs: Any, features_only: bool = False) -> torch.Tensor:
        features = self.encoder(graphs)
        return features if features_only else self.pt_head(features)


def _gin_problem(size: GINSize, device: torch.device) -> Problem:
    """Build the GIN problem around a model that ``functional_call`` can run end to end."""
    problem = build_gin(size, device)
    problem.model = _GINWithHead(problem.model)
    model = problem.model

    def ft_loss(model: nn.Module, head: nn.Module, batch: Any) -> torch.Tensor:
        graphs, labels = batch
        return F.binary_cross_entropy_with_logits(head(model.encoder(graphs)), labels)

    logits = problem.meta_params[0]
    problem.pt_loss = lambda batch: _task_loss(model(batch[0]), batch[1], logits)
    problem.ft_loss = ft_loss
    return problem


class BettyHyperstep:
    """The default hyperstep through Betty's ``Engine`` and its Neumann hypergradient."""

    def __init__(self, problem: Problem, terms: int, ft_steps: int, device: torch.device):
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.problems import ImplicitProblem

        self.problem = problem
        self.batches = _Batches(problem, ft_steps)
        holder = nn.Module()
        holder.logits = problem.meta_params[0]
        state: dict[str, Any] = {}
        self._state = state
        model = problem.model

        class Lower(ImplicitProblem):
            def training_step(self, batch: Any) -> torch.Tensor:
                return problem.pt_loss(batch)

        class Upper(ImplicitProblem):
            def training_step(self, batch: Any) -> torch.Tensor:
                train, val = batch
                model.eval()
                val_loss, state["fast"] = _unrolled_head_val_loss(
                    problem, model.encoder, train, val)
                model.train()
                unused = sum(p.sum() for p in model.pt_head.parameters())
                return val_loss + 0.0 * unused

        lower_config = Config(type="neumann", neumann_iterations=terms,
                              neumann_alpha=problem.pt_lr, unroll_steps=1)
        self.lower = Lower(name="lower", config=lower_config, module=model,
                           optimizer=torch.optim.Adam(model.parameters(), lr=problem.pt_lr),
                           device=str(device))
        self.upper = Upper(name="upper", config=Config(retain_graph=True), module=holder,
                           optimizer=RecordingSGD(list(holder.parameters()), lr=0.0),
                           device=str(device))
        self.engine = Engine(
            problems=[self.upper, self.lower], config=EngineConfig(train_iters=1),
            dependencies={"u2l": {self.upper: [self.lower]}, "l2u": {self.lower: [self.upper]}},
        )

    def step(self, pt_batch: Any) -> list[torch.Tensor]:
        buffers = [(b, b.detach().clone()) for b in self.problem.model.buffers()]
        self.lower.cur_batch = pt_batch
        self.upper.one_step_descent(batch=self.batches.next())
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        _copy_head(self.problem, self._state.pop("fast"))
        return list(self.upper.optimizer.last_grads)


def _metaopt_step(problem: Problem, terms: int, ft_steps: int) -> Callable[[Any], list]:
    meta = make_meta(problem, metaopt.Neumann(terms=terms), ft_steps=ft_steps, meta_lr=0.0)

    def step(pt_batch: Any) -> list[torch.Tensor]:
        meta.hyperstep(lambda: problem.pt_loss(pt_batch))
        return meta.meta_optimizer.last_grads

    return step


def _builders(device: torch.device) -> dict[str, Callable[[Problem, int, int], Any]]:
    return {
        "torchopt": lambda p, j, k: TorchOptHyperstep(p, j, k).step,
        "betty": lambda p, j, k: BettyHyperstep(p, j, k, device).step,
    }


def _compare_library(
    name: str, size: GINSize, device: torch.device, terms: int, ft_steps: int, repeats: int
) -> dict[str, Any]:
    make = _builders(device)[name]
    ours, theirs = _gin_problem(size, device), _gin_problem(size, device)
    ours_step, theirs_step = _metaopt_step(ours, terms, ft_steps), make(theirs, terms, ft_steps)
    got, expected = theirs_step(theirs.pt_batch(0)), ours_step(ours.pt_batch(0))
    result: dict[str, Any] = {
        "status": "ok",
        "relative_difference": relative_difference(got, expected),
        "cosine": cosine(got, expected),
    }
    counter = itertools.count(1)
    calls = {
        "metaopt": lambda: ours_step(ours.pt_batch(next(counter))),
        name: lambda: theirs_step(theirs.pt_batch(next(counter))),
    }
    timings = time_interleaved(calls, device, warmup=1, repeats=repeats)
    memory = {key: peak_memory(fn, device) for key, fn in calls.items()}
    result["time"] = {key: t.as_dict() for key, t in timings.items()}
    result["memory"] = memory
    result["time_ratio"] = timings[name].median / timings["metaopt"].median
    result["cpu_ratio"] = timings[name].cpu_median / timings["metaopt"].cpu_median
    result["memory_ratio"] = (memory[name]["tensor_peak_bytes"]
                              / memory["metaopt"]["tensor_peak_bytes"])
    return result


def _library_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for module, distribution in LIBRARIES.items():
        try:
            versions[module] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[module] = None
    return versions


def compare_all(size: GINSize, device: torch.device, terms: int, ft_steps: int,
                repeats: int) -> dict[str, Any]:
    """Compare every library in turn; a library that fails is recorded with its error."""
    results: dict[str, Any] = {"problem": size.label, "terms": terms, "ft_steps": ft_steps,
                               "versions": _library_versions()}
    for name in LIBRARIES:
        try:
            results[name] = _compare_library(name, size, device, terms, ft_steps, repeats)
        except Exception as error:  # noqa: BLE001 - any failure of a third-party library
            logger.warning("%s failed: %s", name, error)
            results[name] = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc(limit=4)}
    return results


def run(
    others_path: Path,
    device: torch.device,
    *,
    size: GINSize,
    terms: int,
    ft_steps: int,
    repeats: int,
    threads: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Run the comparison in a child process with ``others_path`` on ``PYTHONPATH``.

    Returns the child's results, or ``{"status": "skipped"}`` or ``{"status": "failed"}`` with
    an ``"error"`` message.
    """
    if not others_path.is_dir():
        return {"status": "skipped",
                "error": f"{others_path} not found; install the libraries there with "
                         f"pip install --no-deps --target {others_path} torchopt optree "
                         "graphviz betty-ml"}
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(others_path), str(root),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "others.json"
        return _run_child(out, others_path, root, env, device, size, terms, ft_steps, repeats,
                          threads, timeout_s)


def _run_child(out: Path, others_path: Path, root: Path, env: dict[str, str],
               device: torch.device, size: GINSize, terms: int, ft_steps: int, repeats: int,
               threads: int, timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.others", "--json", str(out),
               "--device", str(device), "--layers", str(size.layers),
               "--hidden", str(size.hidden), "--terms", str(terms),
               "--ft-steps", str(ft_steps), "--repeats", str(repeats), "--threads", str(threads)]
    try:
        completed = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True,
                                   timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
    if completed.returncode != 0 or not out.exists():
        tail = completed.stderr.strip().splitlines()[-5:]
        return {"status": "failed", "error": " | ".join(tail),
                "returncode": completed.returncode}
    try:
        results = json.loads(out.read_text())
    except ValueError as error:
        return {"status": "failed", "error": f"unreadable results from the child: {error}"}
    results["status"] = "ok"
    results["others_path"] = str(others_path)
    return results


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.others",
        description="Compare TorchOpt's and Betty's hypergradients with metaopt's (child "
                    "process of python -m benchmarks).")
    parser.add_argument("--json", type=Path, required=True, help="output JSON file")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--layers", type=int, default=3, help="GIN layers (default: 3)")
    parser.add_argument("--hidden", type=int, default=64, help="GIN width (default: 64)")
    parser.add_argument("--terms", type=int, default=1, help="Neumann terms J (default: 1)")
    parser.add_argument("--ft-steps", type=int, default=1, help="FT steps K (default: 1)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed hypersteps per library (default: 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 0 keeps torch's default (default: 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the child process: write the comparison to ``--json``."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    size = GINSize(layers=args.layers, hidden=args.hidden)
    results = compare_all(size, torch.device(args.device), args.terms, args.ft_steps,
                          args.repeats)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
