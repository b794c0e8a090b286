"""`tune`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from quantune_edge.cli.shared import DATA_HELP, ChannelOrder, InputSize, JsonOut, Mean, Preset, Quiet, Resize, Std, TargetsDir, Verbose, app, load_targets, one_line, one_line_errors, preprocessing_override, print_json
from quantune_edge.common.console import Reporter
from quantune_edge.compile import artifacts as layout
from quantune_edge.tasks.base import format_metric


def fmt_drop(points: float) -> str:
    """A drop in points; "-" when the metric has no finite float32 value (fidelity: float32 is the reference)."""
    return f"{points:.2f}" if math.isfinite(points) else "-"


@app.command("tune")
def tune_cmd(
    folder: Annotated[Path, typer.Argument(help="Compile folder with an analysis.json (run 'analyze' first).")],
    eval_data: Annotated[Path, typer.Option("--eval", help=DATA_HELP)],
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Accuracy budget: top-1 points below float32 (default 1.0).")] = None,
    min_sqnr: Annotated[Optional[float], typer.Option("--min-sqnr", help="The fidelity task's budget: the worst output's SQNR vs float32, dB.")] = None,
    max_latency_ratio: Annotated[Optional[float], typer.Option("--max-latency-ratio", help="Latency budget vs full int8, on this host (or on --latency-source).")] = None,
    float_layers: Annotated[Optional[int], typer.Option("--float-layers", help="Keep exactly the K most sensitive layers float.")] = None,
    keep_float: Annotated[Optional[list[str]], typer.Option("--keep-float", help="Always float: ONNX node or TFLite name, glob, or re:REGEX (repeatable).")] = None,
    keep_int8: Annotated[Optional[list[str]], typer.Option("--keep-int8", help="Never float: ONNX node or TFLite name, glob, or re:REGEX (repeatable).")] = None,
    num_eval: Annotated[int, typer.Option("--num-eval", help="Evaluation samples (deterministic subset).")] = 200,
    metric: Annotated[Optional[str], typer.Option("--metric", help="Rank layers by this analysis score (default: the analysis's own).")] = None,
    rerank: Annotated[Optional[int], typer.Option("--rerank", help="Re-analyse the mixed model after each of the first R picks and take the next from it (0: the analysis order; default 10 when ranking by output share).")] = None,
    latency_source: Annotated[Optional[str], typer.Option("--latency-source", help="Target whose measured layer costs price the choice, where the chosen model and a --max-latency-ratio budget are timed (default: this host).")] = None,
    targets_dir: TargetsDir = None,
    seed: Annotated[int, typer.Option("--seed")] = 1,
    threads: Annotated[int, typer.Option("--threads", help="Interpreter threads for evaluation and latency.")] = 2,
    naive: Annotated[bool, typer.Option("--naive", help="Plain ranking prefix, no fusion-aware regions (for comparison).")] = False,
    best_effort: Annotated[bool, typer.Option("--best-effort", help="Exit 0 with the best model found when the budget is unreachable.")] = False,
    pareto: Annotated[bool, typer.Option("--pareto", help="Also evaluate k = 0…n (sampled for big models) and plot pareto.png.")] = False,
    remeasure: Annotated[bool, typer.Option("--remeasure", help="Measure this host's float32/int8 latencies again instead of reusing DIR/host_latency.json.")] = False,
    preset: Preset = None,
    mean: Mean = None,
    std: Std = None,
    input_size: InputSize = None,
    resize: Resize = None,
    channel_order: ChannelOrder = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
    json_out: JsonOut = False,
) -> None:
    """Choose the float layers to meet an accuracy or latency budget and emit model_mixed.tflite."""
    from quantune_edge.tune.tuning import TuneOptions, tune

    reporter = Reporter(quiet=quiet or json_out, verbose=verbose)
    with one_line_errors():
        source = load_targets(latency_source, targets_dir)[0] if latency_source else None
        options = TuneOptions(latency_source=source, max_drop=max_drop, min_sqnr=min_sqnr, max_latency_ratio=max_latency_ratio, float_layers=float_layers,
                              keep_float=list(keep_float or []), keep_int8=list(keep_int8 or []), metric=metric, num_eval=num_eval, seed=seed, threads=threads,
                              rerank=rerank, fusion_aware=not naive, best_effort=best_effort, pareto=pareto, verbose=verbose,
                              remeasure=remeasure, preprocessing=preprocessing_override(preset, mean, std, input_size, resize, channel_order))
        report = tune(folder, eval_data, options, reporter)
    if json_out:
        print_json(report.to_dict())
    elif not quiet:
        _print_tune(reporter, report)


def _print_tune(reporter: Reporter, report) -> None:
    ref, c = report.reference, report.chosen
    table = Table(title=f"mixed precision, chosen: accuracy = {ref['accuracy_is']} on {ref['eval_samples']} images; "
                        f"p50 latency on the host, {ref['threads']} threads (mixed: its ratio to int8, timed paired, "
                        f"× int8's ms); SQNR of the model output",
                  box=box.SIMPLE_HEAD, header_style="bold")
    # Short headers: the table fits an 80-column terminal.
    for col in ("model", "float layers", "accuracy", "drop pts", "SQNR dB", "ms", "vs int8", "Q/DQ"):
        table.add_column(col, justify="right", no_wrap=True)
    int8 = ref.get("int8")
    metric = ref["accuracy_is"]
    table.add_row("float32", "all", format_metric(ref['float32_accuracy'], metric), "0.00", "inf", f"{ref['float32_latency_ms']:.2f}",
                  f"{ref['float32_latency_ms'] / ref['int8_latency_ms']:.2f}x", "0")
    if int8:
        table.add_row("int8", "0", format_metric(int8['accuracy'], metric), fmt_drop(int8['drop_points']), f"{int8['output_sqnr_db']:.1f}",
                      f"{ref['int8_latency_ms']:.2f}", "1.00x", str(int8["quantize_ops"]))
    table.add_row("[bold]mixed[/]", f"{len(c['float_layers'])} ({100 * c['share_of_layers_float']:.0f} %)",
                  format_metric(c['accuracy'], metric), fmt_drop(c['drop_points']), f"{c['output_sqnr_db']:.1f}", f"{c['latency_ratio'] * ref['int8_latency_ms']:.2f}",
                  f"{c['latency_ratio']:.2f}x", str(c["quantize_ops"]))
    reporter.console.print(table)
    if not math.isfinite(ref["float32_accuracy"]):
        reporter.console.print(f"drop: none, {metric} is measured against float32 itself; the budget is --min-sqnr", markup=False)
    reporter.console.print("float layers: " + (", ".join(f"{l['index']}:{one_line(l)}" for l in c["layers"]) or "none"), markup=False)
    if "device_latency_ms" in c:
        target = report.budget["latency_source"]["target"]["name"]
        reporter.console.print(f"on {target}: mixed {c['device_latency_ms']:.2f} ms, {c['device_latency_ratio']:.2f}x full int8 "
                               f"(p50, timed side by side{', median of 3' if c['device_latency_measurements'] > 1 else ''})"
                               + ("; the latency budget is measured there" if "max_latency_ratio" in report.budget else ""), markup=False)
    vs = c.get("vs_float32")
    if vs:
        lo, hi = vs["drop_points_ci95"]
        reporter.console.print(f"vs float32, image by image: mixed gets {vs['images_lost']} wrong that float32 gets right and "
                               f"{vs['images_won']} the other way; on new images like these the drop is {lo:.1f} to {hi:.1f} points (95 %)")
    s = report.search
    if s.get("rerank"):
        r = s["rerank"]
        reporter.console.print(f"re-ranked with {r['analyses']} analysis round(s), each of the mixed model so far "
                               f"({r['samples']} images, {r['wall_time_s']:.1f} s)")
    sweep = f", {s['pareto_evaluations']} more for the Pareto sweep" if s.get("pareto_evaluations") else ""
    reporter.console.print(f"{s['evaluations']} model evaluation{'' if s['evaluations'] == 1 else 's'} (bound {s['bound']} for {s['layers']} layers){sweep}, {s['wall_time_s']:.1f} s; "
                           f"wrote {report.files['model']} and {layout.TUNE_JSON}" + (f" and {layout.PARETO_PNG}" if report.pareto else ""))
