"""`analyze`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from quantune_edge.analyze.analysis import LOCAL_SAMPLES
from quantune_edge.analyze.sensitivity import DEFAULT_METRIC, nan_low
from quantune_edge.cli.shared import DATA_HELP, ChannelOrder, InputSize, JsonOut, Mean, Preset, Quiet, Resize, Std, Verbose, app, both_names, fmt_count, fmt_db, one_line_errors, op_label, preprocessing_override, print_json
from quantune_edge.common.console import Reporter
from quantune_edge.compile import artifacts as layout
from quantune_edge.tasks.base import format_metric


def _print_analysis(reporter: Reporter, report, top: int) -> None:
    con = reporter.console
    oracle = {row["index"]: row for row in (report.oracle or {}).get("layers", [])}
    table = Table(title=f"{min(top, len(report.layers))} most sensitive of {len(report.layers)} layers (score: {report.metric})",
                  header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 1), caption="layer: ONNX node, TFLite op below; W/A dB: SQNR of weights/activation vs float; "
                  "Δ: SQNR the layer itself loses; own: RMS error of the layer on its own int8 input, in output LSBs; "
                  "out %: share of the int8 logit error that own error accounts for"
                  + ("; oracle: output SQNR gain with only this layer float" if oracle else ""))
    show_score = report.metric not in ("sqnr_delta", "local_rmse", "output_share")
    columns = ["rank", "#", "layer", "op", "params", "MMAC", "W dB", "A dB", "Δ dB", "own", "out %"] + (["score"] if show_score else []) + (["oracle"] if oracle else [])
    for col in columns:
        table.add_column(col, justify="left" if col in ("layer", "op") else "right", no_wrap=col != "layer",
                         min_width=16 if col == "layer" else None, overflow="fold" if col == "layer" else "ellipsis")
    scores = report.scores[report.metric]
    position = {layer["index"]: i for i, layer in enumerate(report.layers)}
    for rank, layer in enumerate(report.most_sensitive(top), 1):
        row = [str(rank), str(layer["index"]), both_names(layer), op_label(layer), fmt_count(layer["params"]), f"{layer['macs'] / 1e6:.1f}",
               fmt_db(layer["weight_sqnr_db"]), fmt_db(layer["act_sqnr_db"]), fmt_db(layer["sqnr_delta_db"]),
               f"{layer['local_rmse_lsb']:.2f}" if layer.get("local_rmse_lsb") is not None else "-",
               f"{100 * layer['output_share']:.1f}" if layer.get("output_share") is not None else "-"]
        if show_score:
            row.append(f"{scores[position[layer['index']]]:.3g}")
        if oracle:
            row.append(f"{oracle[layer['index']]['output_sqnr_gain_db']:+.2f}" if layer["index"] in oracle else "-")
        table.add_row(*row)
    con.print(table)
    out = report.model_output
    inv = report.invocations
    metric = out.get("metric", "top-1")
    if out.get("outputs_sqnr_db"):
        con.print("every output int8 vs float32 (each normalised by its own float32 RMS): "
                  + ", ".join(f"{name} {fmt_db(v)} dB" for name, v in out["outputs_sqnr_db"].items()) + f"; worst {out['worst_output']}",
                  markup=False)
    con.print(f"model output int8 vs float32: SQNR {out['sqnr_db']:.1f} dB"
              + (f", top-1 agreement {100 * out['top1_agreement']:.1f} %" if "top1_agreement" in out else "")
              + (f", {metric} float {format_metric(out['float32_top1'], metric)} / int8 {format_metric(out['int8_top1'], metric)}"
                 if out.get("int8_top1") is not None else ""))
    con.print(f"cost: {inv['float32']} float32 + {inv['int8']} int8 invocations, {report.timings_s['analysis']:.2f} s "
              f"(+{inv.get('layer_kernels', 0)} of the layer-kernel model for the local errors, "
              f"+{inv.get('backward', 0)} of the adjoint model for the backward passes, "
              f"+{report.preserve_all_tensors_check['invocations']} to check that keeping all tensors changes nothing)")
    parts = report.timings_s.get("analysis_parts") or {}
    if parts:
        con.print("of which " + ", ".join(f"{name.replace('_', ' ')} {seconds:.2f} s" for name, seconds in parts.items()))
    unmatched = report.unmatched
    if unmatched["int8"] or unmatched["float32"]:
        con.print(f"[yellow]unmatched ops: int8 {len(unmatched['int8'])}, float32 {len(unmatched['float32'])} (listed in analysis.json)[/]")
    if report.oracle:
        o = report.oracle
        rho = Table(title=f"vs the one-layer-float oracle ({o['builds']} builds, {o['wall_time_s']:.1f} s = "
                          f"{o['time_ratio_oracle_over_analysis']:.0f}x the analysis)", header_style="bold")
        rho.add_column("metric")
        rho.add_column("Spearman ρ", justify="right")
        for k in next(iter(o["top_k_capture"].values()), {}):
            rho.add_column(f"gain captured by {k}", justify="right")
        for name, value in sorted(o["spearman"].items(), key=lambda kv: -nan_low(kv[1])):
            cap = o["top_k_capture"][name]
            rho.add_row(name + (" (selected)" if name == report.metric else ""), f"{value:+.2f}", *[f"{v:.2f}" for v in cap.values()])
        con.print(rho)
        rep = o.get("repeatability")
        if rep and math.isfinite(rep["spearman_between_halves"]):
            ceiling = (f"any ranking can expect ρ ≈ {rep['rho_ceiling']:.2f} at best" if math.isfinite(rep["rho_ceiling"])
                       else "no ranking can be expected to agree with it")
            con.print(f"oracle repeatability: its rankings on two halves of the samples ({rep['samples_per_half']} each) agree at "
                      f"ρ {rep['spearman_between_halves']:+.2f}, so {ceiling}")


def _analyze(folder: Path, calib: Path, options, *, top: int, quiet: bool, verbose: bool, json_out: bool):
    from quantune_edge.analyze.analysis import analyze

    reporter = Reporter(quiet=quiet or json_out, verbose=verbose)
    with one_line_errors():
        report = analyze(folder, calib, options, reporter)
    if json_out:
        print_json(report.to_dict())
    elif not quiet:
        _print_analysis(reporter, report, top)
        reporter.console.print(f"wrote {folder / layout.ANALYSIS_JSON}, {layout.ANALYSIS_CSV}, {layout.ANALYSIS_PNG}")
    return report


@app.command("analyze")
def analyze_cmd(
    folder: Annotated[Path, typer.Argument(help="Output folder of 'quantune-edge compile'.")],
    calib: Annotated[Path, typer.Option("--calib", help=DATA_HELP)],
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples for the one float + one int8 pass.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the deterministic sample choice.")] = 0,
    local_samples: Annotated[int, typer.Option("--local-samples", help="Of those, samples on which each layer's own error is measured and traced to the logits (one kernel-model and one adjoint-model invocation each).")] = LOCAL_SAMPLES,
    metric: Annotated[str, typer.Option("--metric", help="Sensitivity score: output_share (default), local_rmse, sqnr_delta, act_sqnr, weight_sqnr, act_nmse, act_mse, weight_mse, quantune.")] = DEFAULT_METRIC,
    oracle: Annotated[bool, typer.Option("--oracle", help="Also build and run one model per layer kept float (n+1 builds) and correlate.")] = False,
    top: Annotated[int, typer.Option("--top", help="Rows of the most-sensitive table.")] = 10,
    threads: Annotated[int, typer.Option("--threads", help="Interpreter threads.")] = 2,
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
    """Per-layer local metrics from one float32 and one int8 pass, and the sensitivity ranking."""
    from quantune_edge.analyze.analysis import AnalysisOptions

    with one_line_errors():
        options = AnalysisOptions(num_samples=num_samples, seed=seed, threads=threads, metric=metric, oracle=oracle, verbose=verbose,
                                  local_samples=local_samples,
                                  preprocessing=preprocessing_override(preset, mean, std, input_size, resize, channel_order))
    _analyze(folder, calib, options, top=top, quiet=quiet, verbose=verbose, json_out=json_out)
