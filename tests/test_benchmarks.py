"""Smoke tests of the benchmark machinery at minimal sizes (behaviour only, no timing checks)."""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import pytest
import torch

import metaopt

pytest.importorskip("torch_geometric")
pytest.importorskip("psutil")

from benchmarks import (  # noqa: E402
    accuracy, cli, cost, flatness, measure, others, reference, report,
)
from benchmarks.cost import TimingPolicy  # noqa: E402
from benchmarks.problems import ConvSize, GINSize, build_conv, build_gin  # noqa: E402

CPU = torch.device("cpu")
TINY_GIN = GINSize(layers=1, hidden=8, tasks=4, graphs=4, nodes=8)
TINY_CONV = ConvSize(width=4, layers=2, images=4)
ONCE = TimingPolicy(warmup=0, min_repeats=1, max_repeats=1, budget_s=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Run single-threaded, as the benchmark does: two OpenMP threads on a loaded two-core
    machine can make torch_geometric's scatter kernels orders of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_gin() -> object:
    return build_gin(TINY_GIN, CPU, pools=(3, 2, 2))


def _tiny_conv() -> object:
    return build_conv(TINY_CONV, CPU, pools=(3, 2, 2))


@pytest.mark.parametrize("build", [_tiny_gin, _tiny_conv], ids=["gin", "conv"])
def test_reference_agrees_with_metaopt(build) -> None:
    result = reference.compare(build, CPU, terms=2, ft_steps=2, repeats=1, hypersteps=2)
    agreement = result["agreement"]
    assert len(agreement["hypersteps"]) == 2
    assert agreement["max_relative_difference"] < 1e-5
    assert agreement["head_max_abs_difference"] < 1e-6
    for row in agreement["hypersteps"]:
        assert row["norm"] > 0
        assert row["cosine"] > 1 - 1e-9
    assert result["time_ratio"] > 0
    assert result["memory"]["metaopt"]["tensor_peak_bytes"] > 0
    assert result["memory"]["reference"]["tensor_peak_bytes"] > 0


def test_builds_are_identical() -> None:
    first, second = _tiny_gin(), _tiny_gin()
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(first.pt_batch(1)[1], second.pt_batch(1)[1])


def test_cost_rows_have_fields() -> None:
    result = cost.run_problem(_tiny_gin, CPU, ONCE, skip_heavy=True, amortised_plan=[(2, 2)],
                              amortised_repeats=1)
    labels = [row["label"] for row in result["hypersteps"]]
    assert labels == [spec.label for spec in cost.ESTIMATORS if not spec.heavy]
    for row in result["hypersteps"]:
        assert row["time_ratio"] > 0
        assert row["cpu_ratio"] > 0
        assert row["memory_ratio"] > 0
    cg = next(row for row in result["hypersteps"] if row["label"].startswith("CG 5"))
    assert cg["hvps"] == [5]
    unrolled = next(row for row in result["hypersteps"] if row["label"] == "UnrolledPT T=5")
    assert "recorded_pt_step" in unrolled
    (amortised,) = result["amortised"]
    assert amortised["every"] == 2
    assert amortised["ratio"] > 0
    assert amortised["predicted_ratio"] > 1
    assert amortised["reuse_ratio"] > 0


def test_peak_memory_counts_new_tensor() -> None:
    def allocate() -> None:
        big = torch.ones(1_000_000)  # 4 MB of float32
        (big * 2).sum()

    result = measure.peak_memory(allocate, CPU)
    assert result["tensor_peak_bytes"] >= 8_000_000
    assert result["tensor_peak_bytes"] < 12_100_000
    assert result["rss_peak_delta_bytes"] >= 0


def test_peak_memory_ignores_freed_tensors() -> None:
    def allocate_in_turn() -> None:
        for _ in range(5):
            torch.ones(1_000_000)

    result = measure.peak_memory(allocate_in_turn, CPU)
    assert result["tensor_peak_bytes"] == 4_000_000


def test_exact_hypergradient_matches_exact_solve() -> None:
    problem = accuracy.build_mlp(hidden=4, tasks=2, examples=32, train_steps=500)
    state = [p.detach().clone() for p in problem.model.parameters()]
    head = [p.detach().clone() for p in problem.head.parameters()]
    exact, spectrum = accuracy.exact_hypergradient(problem)
    assert spectrum["lambda_min"] > 0
    with torch.no_grad():
        for param, saved in zip([*problem.model.parameters(), *problem.head.parameters()],
                                [*state, *head]):
            param.copy_(saved)
    got = accuracy._metaopt_hypergradient(problem, metaopt.ExactSolve())
    assert reference.relative_difference(got, exact) < 1e-8


def test_flatness_trace_fields() -> None:
    result = flatness.run(CPU, hypersteps=4, census_every=2, size=TINY_GIN)
    assert set(result["traces"]) == set(flatness.ESTIMATORS)
    for trace in result["traces"].values():
        assert len(trace["rss_bytes"]) == 4
        assert len(trace["tracked_bytes"]) == 4
        assert min(trace["tracked_bytes"]) > 0
        assert math.isfinite(trace["rss_slope_bytes_per_hyperstep"])
        assert [c["hyperstep"] for c in trace["census"]] == [0, 2, 3]


def test_slope_of_line() -> None:
    assert flatness.slope([1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    assert flatness.slope([4.0]) == 0.0


def test_others_skipped_without_install(tmp_path: Path) -> None:
    result = others.run(tmp_path / "missing", CPU, size=TINY_GIN, terms=1, ft_steps=1,
                        repeats=1, threads=1, timeout_s=60)
    assert result["status"] == "skipped"
    assert "pip install" in result["error"]


def _tiny_plan(quick: bool, device: torch.device, seed: int) -> cli.Plan:
    gin = functools.partial(build_gin, TINY_GIN, device, seed, (3, 2, 2))
    case = cli.CostCase("tiny", gin, ONCE, True, [(2, 2)])
    return cli.Plan([case], [("tiny", gin, 1, 1)], reference_repeats=1, others_repeats=1,
                    scaling_policy=ONCE, phase_repeats=1, flatness_hypersteps=3,
                    profile_calls=2)


def test_cli_writes_json_report_and_plots(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cli, "plan_for", _tiny_plan)
    monkeypatch.setattr(cli, "GIN_DEFAULT", TINY_GIN)
    args = argparse.Namespace(
        quick=True, out=tmp_path, device="cpu", threads=0, seed=0, no_plots=False,
        sections=["cost", "reference", "others", "flatness", "profile"],
        others_path=tmp_path / "missing")
    results = cli.run(args)
    assert results["meta"]["errors"] == {}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"meta", "cost", "reference", "others", "flatness", "profile"}
    assert saved["meta"]["machine"]["cpu_model"]
    assert saved["reference"][0]["agreement"]["max_relative_difference"] < 1e-5
    assert saved["others"]["status"] == "skipped"
    assert any(row["function"].startswith("_optimizer.py") for row in saved["profile"]["rows"])

    text = report.render(saved)
    for title, _ in report.SECTION_RENDERERS:
        assert f"### {title}" in text
    document = tmp_path / "BENCHMARKS.md"
    document.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
    report.update(document, text)
    updated = document.read_text()
    assert "old" not in updated
    assert updated.startswith("intro\n")
    assert updated.endswith("outro\n")

    from benchmarks import plots

    written = plots.write_all(saved, tmp_path)
    assert {path.name for path in written} == {"cost.png", "memory.png"}


def test_cli_rejects_unknown_section() -> None:
    with pytest.raises(SystemExit):
        cli._parse(["--sections", "cost,nonsense"])
