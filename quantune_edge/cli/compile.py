"""`compile` and `layers`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from quantune_edge.cli.shared import (
    DATA_HELP,
    ChannelOrder,
    Classes,
    Decoder,
    InputPrep,
    InputShape,
    InputSize,
    JsonOut,
    Labels,
    Mean,
    Metric,
    NmsIou,
    PadValue,
    Placement,
    Preset,
    Quiet,
    Resize,
    ResizeMode,
    Std,
    TaskName,
    Verbose,
    app,
    fmt_count,
    make_judge,
    one_line_errors,
    op_label,
    print_json,
)
from quantune_edge.common.console import Reporter
from quantune_edge.tasks.base import format_metric


def _print_compile_summary(reporter: Reporter, report, out: Path) -> None:
    con = reporter.console
    table = Table(title=f"compiled -> {out}", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("ONNX (orig / prepared)", justify="right")
    table.add_column("TFLite float32", justify="right")
    table.add_column("TFLite int8", justify="right")
    table.add_row(
        "ops",
        f"{report.onnx_ops['original_count']} / {report.onnx_ops['prepared_count']}",
        str(report.tflite_ops["float32_count"]),
        str(report.tflite_ops["int8_count"]),
    )
    sizes = report.sizes_bytes
    table.add_row("size (MB)", f"{sizes['onnx'] / 1e6:.2f}", f"{sizes['float32'] / 1e6:.2f}", f"{sizes['int8'] / 1e6:.2f}")
    acc = report.accuracy
    if "tflite_float32" in acc:
        scores = acc.get("scores") or {}
        names = list(scores.get("tflite_float32") or {}) or [acc.get("metric", "top-1")]
        for name in names:
            row = [scores[k][name] if scores.get(k) else acc[k] for k in ("onnxruntime_float32", "tflite_float32", "tflite_int8")]
            judged = acc["labelled"] if acc.get("judged_against", "labels") == "labels" else acc["samples"]
            table.add_row(f"{name} ({judged} calib. samples)", *(format_metric(v, name) for v in row))
    check = report.verification["float32_vs_onnxruntime"]
    q = report.verification["int8_vs_onnxruntime"]
    outputs = report.verification.get("outputs", {})
    if len(outputs) > 1:
        for name, both in outputs.items():
            table.add_row(f"{name}: cos min", "", f"{both['float32']['cosine_min']:.6f}", f"{both['int8']['cosine_min']:.4f}")
    else:
        table.add_row("vs ONNX Runtime: cos min", "", f"{check['cosine_min']:.6f}", f"{q['cosine_min']:.4f}")
    if "top1_agreement" in check:
        table.add_row("vs ONNX Runtime: top-1 agree", "", f"{100 * check['top1_agreement']:.1f} %", f"{100 * q['top1_agreement']:.1f} %")
    con.print(table)
    fus = report.fusions
    patterns = ", ".join(f"{p['pattern']} {p['fused']}/{p['in_onnx']}" for p in fus["int8"]["patterns"] if p["in_onnx"])
    con.print(f"fusions (fused/found in ONNX): {patterns or 'none to do'}; "
              f"left unfused: float32 {len(fus['float32']['unfused'])}, int8 {len(fus['int8']['unfused'])}")
    con.print(f"int8 graph: {report.quantize_ops['int8_quantize']} QUANTIZE, {report.quantize_ops['int8_dequantize']} DEQUANTIZE; "
              f"weights {report.quantization['weights']}")
    trace = report.trace or {}
    if trace.get("error"):
        con.print(f"[yellow]TFLite ops not traced to ONNX nodes: {trace['error']}[/]")
    elif trace:
        untraced = trace["untraced"]["float32"]
        con.print(f"traced to ONNX nodes: {len(trace['float32']) - len(untraced)} of {len(trace['float32'])} float32 ops")
    con.print("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings_s.items()))


def _compile(model: Path, calib: Path, out: Path, *, num_calib, seed, per_tensor, int8_io, label_offset, force,
             preset, mean, std, input_size, resize, channel_order, resize_mode, pad_value, placement,
             task, decoder, labels, nms_iou, classes, metric, input_shape, input_prep, quiet, verbose, json_out) -> None:
    from quantune_edge.common.preprocessing import make_preprocessing
    from quantune_edge.compile.compiler import CompileOptions, compile_model
    from quantune_edge.model.onnx_model import parse_input_shapes

    reporter = Reporter(quiet=quiet or json_out, verbose=verbose)
    with one_line_errors():
        prep = make_preprocessing(preset, mean, std, input_size, resize, channel_order, resize_mode, pad_value, placement, input_prep or [])
        options = CompileOptions(
            preprocessing=prep, num_calib=num_calib, seed=seed, per_channel=not per_tensor, int8_io=int8_io,
            label_offset=label_offset, force=force, verbose=verbose, input_shapes=parse_input_shapes(input_shape or []),
            judge=make_judge(task, label_offset, decoder, labels, nms_iou, classes, metric),
        )
        report = compile_model(model, calib, out, options, reporter)
    if skipped := report.calibration["skipped"]:  # said once, even with --quiet: the calibration is not what was asked
        used = report.calibration["num_samples"]
        typer.echo(f"warning: {used} of {used + len(skipped)} calibration images used; unreadable: "
                   + "; ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""), err=True)
    if json_out:
        print_json(report.to_dict())
    elif not quiet:
        _print_compile_summary(reporter, report, out)


@app.command("compile")
def compile_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX model: image inputs (NCHW or NHWC) are preprocessed, other inputs fed as given.")],
    calib: Annotated[Path, typer.Option("--calib", help=DATA_HELP)],
    out: Annotated[Path, typer.Option("--out", help="Output folder (must not exist unless --force).")],
    num_calib: Annotated[int, typer.Option("--num-calib", help="Number of calibration samples (deterministic subset).")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the deterministic sample choice.")] = 0,
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="Per-tensor int8 weights (for kernels without per-channel support).")] = False,
    int8_io: Annotated[bool, typer.Option("--int8-io", help="int8 model input/output instead of float32.")] = False,
    label_offset: Annotated[int, typer.Option("--label-offset", help="Output index = class_index + offset (1 for 1001-class models).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    preset: Preset = None,
    mean: Mean = None,
    std: Std = None,
    input_size: InputSize = None,
    resize: Resize = None,
    channel_order: ChannelOrder = None,
    resize_mode: ResizeMode = None,
    pad_value: PadValue = None,
    placement: Placement = None,
    task: TaskName = "classify",
    decoder: Decoder = "yolov5",
    labels: Labels = None,
    nms_iou: NmsIou = 0.6,
    classes: Classes = 80,
    metric: Metric = None,
    input_shape: InputShape = None,
    input_prep: InputPrep = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
    json_out: JsonOut = False,
) -> None:
    """Compile an ONNX model to float32 and calibrated full-int8 TFLite, fused and verified."""
    _compile(model, calib, out, num_calib=num_calib, seed=seed, per_tensor=per_tensor, int8_io=int8_io,
             label_offset=label_offset, force=force, preset=preset, mean=mean, std=std, input_size=input_size,
             resize=resize, channel_order=channel_order, resize_mode=resize_mode, pad_value=pad_value, placement=placement,
             task=task, decoder=decoder, labels=labels, nms_iou=nms_iou, classes=classes, metric=metric,
             input_shape=input_shape, input_prep=input_prep, quiet=quiet, verbose=verbose, json_out=json_out)


@app.command("layers")
def layers_cmd(
    folder: Annotated[Path, typer.Argument(help="Compile folder.")],
    json_out: JsonOut = False,
) -> None:
    """Every layer traced to its ONNX nodes: index, TFLite op, ONNX nodes, params, MACs, int8 scale."""
    from rich.markup import escape

    from quantune_edge.compile.artifacts import layer_table

    reporter = Reporter(quiet=json_out)
    with one_line_errors():
        data = layer_table(folder)
    if json_out:
        print_json(data)
        return
    table = Table(title=f"{len(data['layers'])} layers of {folder} (ONNX: {Path(data['onnx_model']).name})", box=box.SIMPLE_HEAD,
                  header_style="bold", padding=(0, 1))
    for col in ("#", "TFLite op", "ONNX nodes", "params", "MMAC", "int8 scale"):
        table.add_column(col, justify="left" if col in ("TFLite op", "ONNX nodes") else "right", overflow="fold")
    for row in data["layers"]:
        nodes = "\n".join(f"{escape(n)} [dim]{o}[/]" for n, o in zip(row["onnx_nodes"], row["onnx_ops"])) or "[yellow]not traced[/]"
        unit = f"\n[yellow]{escape(row['unit'])}[/]" if row.get("unit") else ""
        table.add_row(str(row["index"]), f"{op_label(row)}\n[dim]{escape(row['short_name'])}[/]{unit}", nodes, fmt_count(row["params"]),
                      f"{row['macs'] / 1e6:.2f}", f"{row['int8_scale']:.4g}" if row["int8_scale"] else "-")
    reporter.console.print(table)
    if data.get("error"):
        reporter.warn(f"tracing failed: {data['error']}")
    for model, ops in (data.get("untraced") or {}).items():
        for u in ops:
            reporter.console.print(f"[yellow]{model} op {u['op']} {u['op_type']} not traced[/]: {escape(u['reason'])}")
    if data["onnx_nodes_without_op"]:
        reporter.console.print(f"[yellow]ONNX nodes no TFLite op computes[/]: {escape(', '.join(data['onnx_nodes_without_op'][:10]))}")
