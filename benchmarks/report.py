"""Render results.json as the Markdown tables of BENCHMARKS.md.

``python -m benchmarks.report`` prints the tables. With ``--update BENCHMARKS.md`` it replaces
the text between the ``<!-- BEGIN GENERATED -->`` and ``<!-- END GENERATED -->`` markers of
that file instead, so every number in the document comes from a results file.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["render", "update", "main"]

logger = logging.getLogger(__name__)

BEGIN = "<!-- BEGIN GENERATED -->"
END = "<!-- END GENERATED -->"
MIB = 2**20


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:,.1f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _mib(size: float | None) -> str:
    return "-" if size is None else f"{size / MIB:,.2f}"


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _machine(results: dict[str, Any]) -> str:
    meta = results["meta"]
    info = meta["machine"]
    seconds = ", ".join(f"{name} {value:.0f} s" for name, value
                        in meta.get("section_seconds", {}).items())
    load = f"{info['load_average_start']} -> {info.get('load_average_end', '-')}"
    rows = [
        ("command", f"`{meta['command']}`"),
        ("CPU", info["cpu_model"]),
        ("cores (logical / usable)", f"{info['logical_cores']} / {info['usable_cores']}"),
        ("device", info["device"] + (f" ({info['gpu']})" if "gpu" in info else "")),
        ("torch / Python", f"{info['torch']} / {info['python']}"),
        ("torch intra-op threads", info["torch_threads"]),
        ("metaopt / commit", f"{info['metaopt']} / {info['git_commit']}"),
        ("load average (1, 5, 15 min) at start -> end", load),
        ("wall time", f"{meta.get('total_seconds', 0):.0f} s ({seconds})"),
    ]
    errors = meta.get("errors") or {}
    for section, error in errors.items():
        rows.append((f"error in {section}", error.splitlines()[0]))
    return _table(("field", "value"), rows)


def _notes(row: dict[str, Any]) -> str:
    notes = []
    if row.get("hvps"):
        notes.append("HVPs " + "/".join(str(h) for h in row["hvps"]))
    if row.get("diverged"):
        notes.append("solver reported divergence")
    if row.get("warnings"):
        notes.append(f"{len(row['warnings'])} distinct warnings")
    if "recorded_pt_step" in row:
        notes.append(f"recorded PT step {_ms(row['recorded_pt_step']['median_s'])} ms")
    return "; ".join(notes)


def _cost(results: dict[str, Any]) -> str:
    parts = []
    for case in results.get("cost", []):
        pt = case["pt_step"]
        parts.append(
            f"**{case['problem']}** ({case['pt_parameters']:,} PT parameters, "
            f"{case['meta_parameters']:,} meta-parameters). Plain PT step (Adam): "
            f"{_ms(pt['time']['median_s'])} ms wall, {_ms(pt['time']['cpu_median_s'])} ms CPU, "
            f"tensor peak {_mib(pt['memory']['tensor_peak_bytes'])} MiB."
            + (" Heavy estimators skipped in this mode." if case.get("skipped_heavy") else ""))
        rows = [(r["label"], _ms(r["time"]["median_s"]), _ms(r["time"]["cpu_median_s"]),
                 _x(r["time_ratio"]), _x(r["cpu_ratio"]),
                 _mib(r["memory"]["tensor_peak_bytes"]), _x(r["memory_ratio"]),
                 _mib(r["memory"]["rss_peak_delta_bytes"]), _notes(r))
                for r in case["hypersteps"]]
        parts.append(_table(("hyperstep", "wall ms", "CPU ms", "wall / PT step",
                             "CPU / PT step", "tensor peak MiB", "/ PT step",
                             "RSS delta MiB", "notes"), rows))
    return "\n\n".join(parts)


def _amortised(results: dict[str, Any]) -> str:
    rows = []
    for case in results.get("cost", []):
        for r in case["amortised"]:
            reuse = r.get("reuse_cpu_ratio")
            rows.append((case["problem"], r["every"], r["steps"],
                         f"{r['plain']['median_s']:.2f}", f"{r['with_hypersteps']['median_s']:.2f}",
                         _x(r["ratio"]), _x(r["cpu_ratio"]), _x(r["predicted_cpu_ratio"]),
                         _x(r.get("reuse_ratio")), _x(reuse)))
    return _table(("problem", "M", "PT steps", "plain PT s", "with hypersteps s",
                   "wall ratio", "CPU ratio", "CPU ratio predicted from the rows above",
                   "wall ratio, reusing the step's loss", "CPU ratio, reusing the step's loss"),
                  rows)


def _reference(results: dict[str, Any]) -> str:
    rows = []
    for r in results.get("reference", []):
        times, memory, agree = r["time"], r["memory"], r["agreement"]
        rows.append((r["problem"], r["terms"], r["ft_steps"],
                     f"{_ms(times['metaopt']['median_s'])} / "
                     f"{_ms(times['metaopt']['cpu_median_s'])}",
                     f"{_ms(times['reference']['median_s'])} / "
                     f"{_ms(times['reference']['cpu_median_s'])}",
                     _x(r["time_ratio"]), _x(r["cpu_ratio"]),
                     _mib(memory["metaopt"]["tensor_peak_bytes"]),
                     _mib(memory["reference"]["tensor_peak_bytes"]), _x(r["memory_ratio"]),
                     _sci(agree["max_relative_difference"]),
                     f"{min(h['cosine'] for h in agree['hypersteps']):.9f}"))
    return _table(("problem", "J", "K", "metaopt ms (wall / CPU)", "reference ms (wall / CPU)",
                   "wall ratio", "CPU ratio", "metaopt MiB", "reference MiB", "memory ratio",
                   "max relative difference", "min cosine"), rows)


def _others(results: dict[str, Any]) -> str:
    data = results.get("others")
    if not data:
        return "Not run."
    if data.get("status") != "ok":
        return f"Not run: `{data.get('error')}`"
    rows = []
    for name in ("torchopt", "betty"):
        r = data.get(name, {})
        version = data.get("versions", {}).get(name) or "-"
        if r.get("status") != "ok":
            rows.append((name, version, "failed", "-", "-", "-", "-", f"`{r.get('error')}`"))
            continue
        rows.append((name, version, "ok", _sci(r["relative_difference"]),
                     _x(r["time_ratio"]), _x(r["cpu_ratio"]), _x(r["memory_ratio"]), ""))
    return (f"Problem {data['problem']}, Neumann J={data['terms']}, FT K={data['ft_steps']}; "
            "ratios are library / metaopt.\n\n"
            + _table(("library", "version", "status", "relative difference to metaopt",
                      "wall ratio", "CPU ratio", "memory ratio", "error"), rows))


def _accuracy(results: dict[str, Any]) -> str:
    data = results.get("accuracy")
    if not data:
        return "Not run."
    mlp, ridge = data["mlp"], data.get("ridge", {})
    ridge_rows = {(r["estimator"], r["value"]): r for r in ridge.get("rows", [])}
    rows = []
    for r in mlp["rows"]:
        other = ridge_rows.get((r["estimator"], r["value"]))
        rows.append((r["estimator"], r["value"], f"{r['cosine']:.6f}", _sci(r["relative_error"]),
                     f"{other['cosine']:.6f}" if other else "-",
                     _sci(other["relative_error"]) if other else "-"))
    head = (f"MLP: {mlp['pt_parameters']} PT parameters, Hessian eigenvalues "
            f"{mlp['lambda_min']:.2e} to {mlp['lambda_max']:.2e} (condition number "
            f"{mlp['condition_number']:.0f}), alpha = 1/lambda_max = {mlp['alpha']:.3g}. "
            f"Ridge: {ridge.get('pt_parameters', '-')} PT parameters, alpha = "
            f"{ridge.get('alpha', float('nan')):.3g}.")
    return head + "\n\n" + _table(("estimator", "J / iterations / T", "MLP cosine",
                                   "MLP relative error", "ridge cosine",
                                   "ridge relative error"), rows)


def _scaling(results: dict[str, Any]) -> str:
    data = results.get("scaling")
    if not data:
        return "Not run."
    size_rows = [(r["width"], f"{r['pt_parameters']:,}", _ms(r["pt_step"]["median_s"]),
                  _ms(r["hyperstep"]["median_s"]), _ms(r["pt_step"]["cpu_median_s"]),
                  _ms(r["hyperstep"]["cpu_median_s"]), _x(r["ratio"]), _x(r["cpu_ratio"]))
                 for r in data["model_size"]]
    meta_rows = []
    for r in data["meta_count"]:
        cpu = r["phases"]["cpu_s"]
        meta_rows.append((f"{r['meta_parameters']:,}", f"{r['pt_parameters']:,}",
                          _ms(r["pt_step"]["cpu_median_s"]), _ms(r["hyperstep"]["cpu_median_s"]),
                          _x(r["cpu_ratio"]), _ms(cpu["ft_stage"]), _ms(cpu["pt_gradient"]),
                          _ms(cpu["hvp"]), _ms(cpu["meta_vjp"])))
    return ("Model size (GIN, 3 layers, 32 tasks, default hyperstep):\n\n"
            + _table(("width", "PT parameters", "PT step wall ms", "hyperstep wall ms",
                      "PT step CPU ms", "hyperstep CPU ms", "wall ratio", "CPU ratio"),
                     size_rows)
            + "\n\nMeta-parameter count (GIN 3x64 with a rank-16 task head; CPU ms; the last "
              "four columns are the phases of the reference hyperstep):\n\n"
            + _table(("task weights", "PT parameters", "PT step", "hyperstep", "ratio",
                      "FT stage", "PT gradient (create_graph)", "HVP", "final VJP to phi"),
                     meta_rows))


def _flatness(results: dict[str, Any]) -> str:
    data = results.get("flatness")
    if not data:
        return "Not run."
    rows = []
    for label, trace in data["traces"].items():
        census = trace["census"]
        tracked = trace["tracked_bytes"]
        rows.append((label, data["hypersteps"],
                     f"{_mib(tracked[len(tracked) // 2])} -> {_mib(tracked[-1])}",
                     f"{trace['tracked_slope_bytes_per_hyperstep']:.1f}",
                     f"{_mib(trace['rss_bytes'][0])} -> {_mib(trace['rss_bytes'][-1])}",
                     f"{trace['rss_slope_bytes_per_hyperstep'] / 1024:.2f}",
                     f"{census[1]['tensors'] if len(census) > 1 else '-'} -> "
                     f"{census[-1]['tensors']}"))
    return (f"Problem {data['problem']}. Each iteration takes one PT step (T recorded steps for "
            "UnrolledPT) and one hyperstep; slopes are fitted over the second half.\n\n"
            + _table(("estimator", "hypersteps", "tracked tensor MiB (middle -> last)",
                      "tracked slope (bytes / hyperstep)", "RSS MiB (first -> last)",
                      "RSS slope (KiB / hyperstep)", "gc-reachable tensors (census 2 -> last)"),
                     rows))


def _profile(results: dict[str, Any]) -> str:
    data = results.get("profile")
    if not data:
        return "Not run."
    rows = [(f"`{r['function']}`", r["calls"], f"{100 * r['self_share']:.2f}",
             f"{100 * r['cumulative_share']:.2f}") for r in data["rows"]]
    return (f"{data['problem']}, {data['calls']} default hypersteps, clock: {data['clock']}. "
            f"Under the profiler metaopt took {_ms(data['metaopt_cpu_s_per_hyperstep'])} ms per "
            f"hyperstep and the reference formulation "
            f"{_ms(data['reference_cpu_s_per_hyperstep'])} ms. cProfile charges a cost per Python "
            "call, which weighs more on the reference's `higher` unroll, so section 2, not this "
            "ratio, compares their speed.\n\n"
            + _table(("function in metaopt/", "calls", "self %", "cumulative %"), rows))


def _key_results(results: dict[str, Any]) -> str:
    lines = []
    for r in results.get("reference", []):
        if r["terms"] == 1 and r["ft_steps"] == 1:
            lines.append(
                f"- Default hyperstep on {r['problem']}: metaopt / reference = "
                f"{_x(r['time_ratio'])} wall, {_x(r['cpu_ratio'])} CPU, {_x(r['memory_ratio'])} "
                f"tensor peak; hypergradients differ by at most "
                f"{_sci(r['agreement']['max_relative_difference'])} (relative).")
    for case in results.get("cost", []):
        for r in case["amortised"]:
            if r["every"] == 10:
                lines.append(f"- Training with a hyperstep every 10 PT steps on "
                             f"{case['problem']}: {_x(r['ratio'])} wall, {_x(r['cpu_ratio'])} "
                             f"CPU of plain PT with a fresh PT batch per hyperstep; "
                             f"{_x(r.get('reuse_ratio'))} wall, {_x(r.get('reuse_cpu_ratio'))} "
                             "CPU when the hyperstep reuses the PT step's loss.")
    for label, trace in (results.get("flatness") or {}).get("traces", {}).items():
        lines.append(f"- Memory over {results['flatness']['hypersteps']} hypersteps "
                     f"({label}): tracked tensor bytes change by "
                     f"{trace['tracked_slope_bytes_per_hyperstep']:.1f} bytes per hyperstep and "
                     f"the RSS by {trace['rss_slope_bytes_per_hyperstep'] / 1024:.2f} KiB per "
                     "hyperstep over the second half; gc-reachable tensor count change "
                     f"{trace['tensor_count_change']}.")
    return "\n".join(lines)


SECTION_RENDERERS = (
    ("Key results", _key_results),
    ("Machine and run", _machine),
    ("1. Cost of one hyperstep", _cost),
    ("1b. Amortised cost of training with a hyperstep every M PT steps", _amortised),
    ("2. Against the reference formulation", _reference),
    ("3. Against TorchOpt and Betty", _others),
    ("4. Accuracy against the exact hypergradient", _accuracy),
    ("5. Scaling", _scaling),
    ("6. Memory over many hypersteps", _flatness),
    ("7. Where metaopt's hyperstep spends its time", _profile),
)


def render(results: dict[str, Any], level: int = 3,
           quick: dict[str, Any] | None = None) -> str:
    """Return the Markdown tables for ``results``, then the run and key results of an optional
    ``--quick`` run."""
    parts = []
    for title, renderer in SECTION_RENDERERS:
        parts.append(f"{'#' * level} {title}\n\n{renderer(results)}")
    if quick is not None:
        parts.append(f"{'#' * level} The --quick run\n\n{_machine(quick)}\n\n"
                     f"{_key_results(quick)}")
    return "\n\n".join(parts) + "\n"


def update(document: Path, generated: str) -> None:
    """Replace the generated block of ``document`` with ``generated``."""
    text = document.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{document} has no {BEGIN} ... {END} block to replace.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    document.write_text(f"{head}{BEGIN}\n\n{generated}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    """Print the tables of a results file, or write them into a Markdown file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="Render benchmark results as Markdown.")
    parser.add_argument("--json", type=Path, default=Path("results/benchmarks/results.json"),
                        help="results file written by python -m benchmarks "
                             "(default: results/benchmarks/results.json)")
    parser.add_argument("--quick-json", type=Path, default=None,
                        help="results file of a --quick run whose wall time and key results "
                             "are appended (default: none)")
    parser.add_argument("--update", type=Path, default=None,
                        help="Markdown file whose generated block is replaced "
                             "(default: print to stdout)")
    args = parser.parse_args(argv)
    quick = json.loads(args.quick_json.read_text()) if args.quick_json else None
    generated = render(json.loads(args.json.read_text()), quick=quick)
    if args.update is None:
        print(generated)
    else:
        update(args.update, generated)
        logger.info("updated %s", args.update)


if __name__ == "__main__":
    main()
