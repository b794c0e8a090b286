"""The ``quantune-edge`` command line: a thin layer over the Python API (typer + rich)."""
from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from quantune_edge import __version__
from quantune_edge.analyze.analysis import LOCAL_SAMPLES
from quantune_edge.analyze.sensitivity import DEFAULT_METRIC, nan_low
from quantune_edge.common.console import Reporter
from quantune_edge.common.records import jsonable
from quantune_edge.compile import artifacts as layout
from quantune_edge.errors import InputError, QuantuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Mixed-precision post-training quantization (QuantuneV2) from ONNX to ARM edge devices.",
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO_ROOT / "demo"
DEMO_MODEL = DEMO_DIR / "models" / "efficientnet-lite0.onnx"
DEMO_IMAGES = DEMO_DIR / "images"
# The shipped EfficientNet-Lite0 was trained on (pixel - 127) / 128, RGB.
DEMO_PREPROCESSING = {"mean": "127,127,127", "std": "128,128,128"}

# Preprocessing options shared by every command that reads images.
InputSize = Annotated[Optional[int], typer.Option("--input-size", help="Center-crop size S (default: the model's input size).")]
Resize = Annotated[Optional[int], typer.Option("--resize", help="Resize the shorter side to R before the crop (default round(S/0.875)).")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean a,b,c in 0-255 pixel units, model channel order.")]
Std = Annotated[Optional[str], typer.Option("--std", help="Per-channel std a,b,c in 0-255 pixel units: x = (pixel - mean) / std.")]
Preset = Annotated[Optional[str], typer.Option("--preset", help="torch | tf | raw | caffe (BGR, mean 104,117,123). Default torch.")]
ChannelOrder = Annotated[Optional[str], typer.Option("--channel-order", help="rgb | bgr: channel order the model expects.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary; errors only.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show TensorFlow/onnx2tf logs.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
TargetsDir = Annotated[Optional[Path], typer.Option("--targets-dir", help="Folder of target TOML files (default ./targets).")]
TrustNew = Annotated[bool, typer.Option("--trust-new-host-key", help="Trust an unknown host key on first use and record it in known_hosts.")]
InstallRuntime = Annotated[bool, typer.Option("--install-runtime", help="pip-install tflite-runtime on the device if it has no TFLite runtime.")]


def _print_json(data: dict) -> None:
    """--json output: the result alone on stdout (human output goes to stderr)."""
    sys.stdout.write(json.dumps(jsonable(data), indent=2) + "\n")


def _fail(exc: QuantuneError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


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
        fmt = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        table.add_row(f"top-1 ({acc['labelled']} calib. samples)", fmt(acc["onnxruntime_float32"]), fmt(acc["tflite_float32"]), fmt(acc["tflite_int8"]))
    check = report.verification["float32_vs_onnxruntime"]
    q = report.verification["int8_vs_onnxruntime"]
    table.add_row("vs ONNX Runtime: cos min", "", f"{check['cosine_min']:.6f}", f"{q['cosine_min']:.4f}")
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
             preset, mean, std, input_size, resize, channel_order, quiet, verbose, json_out) -> None:
    from quantune_edge.common.preprocessing import make_preprocessing
    from quantune_edge.compile.compiler import CompileOptions, compile_model

    reporter = Reporter(quiet=quiet or json_out, verbose=verbose)
    try:
        prep = make_preprocessing(preset, mean, std, input_size, resize, channel_order)
        options = CompileOptions(
            preprocessing=prep, num_calib=num_calib, seed=seed, per_channel=not per_tensor, int8_io=int8_io,
            label_offset=label_offset, force=force, verbose=verbose,
        )
        report = compile_model(model, calib, out, options, reporter)
    except QuantuneError as exc:
        _fail(exc)
    if skipped := report.calibration["skipped"]:  # said once, even with --quiet: the calibration is not what was asked
        used = report.calibration["num_samples"]
        typer.echo(f"warning: {used} of {used + len(skipped)} calibration images used; unreadable: "
                   + "; ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""), err=True)
    if json_out:
        _print_json(report.to_dict())
    elif not quiet:
        _print_compile_summary(reporter, report, out)


@app.command("compile")
def compile_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX image model (NCHW or NHWC).")],
    calib: Annotated[Path, typer.Option("--calib", help="Folder of images (labels.csv optional) or a preprocessed .npy.")],
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
    quiet: Quiet = False,
    verbose: Verbose = False,
    json_out: JsonOut = False,
) -> None:
    """Compile an ONNX model to float32 and calibrated full-int8 TFLite, fused and verified."""
    _compile(model, calib, out, num_calib=num_calib, seed=seed, per_tensor=per_tensor, int8_io=int8_io,
             label_offset=label_offset, force=force, preset=preset, mean=mean, std=std, input_size=input_size,
             resize=resize, channel_order=channel_order, quiet=quiet, verbose=verbose, json_out=json_out)


def _preprocessing_override(preset, mean, std, input_size, resize, channel_order):
    """None (= reuse compile.json's preprocessing) unless a flag was given."""
    from quantune_edge.common.preprocessing import make_preprocessing

    if all(v is None for v in (preset, mean, std, input_size, resize, channel_order)):
        return None
    return make_preprocessing(preset, mean, std, input_size, resize, channel_order)


def _db(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    return "inf" if v == float("inf") else f"{v:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


_OP_ABBREV = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "dwconv", "FULLY_CONNECTED": "fc", "TRANSPOSE_CONV": "deconv"}


def _op_label(layer: dict) -> str:
    """``dwconv+relu6``: the TFLite op, short, with its fused activation."""
    op = _OP_ABBREV.get(layer["op_type"], layer["op_type"].lower())
    return op + (f"+{layer['fused_activation'].lower()}" if layer["fused_activation"] not in (None, "NONE") else "")


def _both_names(layer: dict) -> str:
    """The layer's short ONNX name with its TFLite short name below (or the TFLite name alone)."""
    from rich.markup import escape

    from quantune_edge.compile.tracing import onnx_label

    onnx = onnx_label(layer)
    return f"{escape(onnx)}\n[dim]{escape(layer['short_name'])}[/]" if onnx else escape(layer["short_name"])


def _one_line(layer: dict) -> str:
    from quantune_edge.compile.tracing import onnx_label

    onnx = onnx_label(layer)
    return f"{onnx} ({layer['short_name']})" if onnx else layer["short_name"]


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
        row = [str(rank), str(layer["index"]), _both_names(layer), _op_label(layer), _count(layer["params"]), f"{layer['macs'] / 1e6:.1f}",
               _db(layer["weight_sqnr_db"]), _db(layer["act_sqnr_db"]), _db(layer["sqnr_delta_db"]),
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
    con.print(f"model output int8 vs float32: SQNR {out['sqnr_db']:.1f} dB, top-1 agreement {100 * out['top1_agreement']:.1f} %"
              + (f", top-1 float {100 * out['float32_top1']:.1f} % / int8 {100 * out['int8_top1']:.1f} %" if "int8_top1" in out else ""))
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
    try:
        report = analyze(folder, calib, options, reporter)
    except QuantuneError as exc:
        _fail(exc)
    if json_out:
        _print_json(report.to_dict())
    elif not quiet:
        _print_analysis(reporter, report, top)
        reporter.console.print(f"wrote {folder / layout.ANALYSIS_JSON}, {layout.ANALYSIS_CSV}, {layout.ANALYSIS_PNG}")
    return report


@app.command("analyze")
def analyze_cmd(
    folder: Annotated[Path, typer.Argument(help="Output folder of 'quantune-edge compile'.")],
    calib: Annotated[Path, typer.Option("--calib", help="Folder of images (labels.csv optional) or a preprocessed .npy.")],
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

    try:
        options = AnalysisOptions(num_samples=num_samples, seed=seed, threads=threads, metric=metric, oracle=oracle, verbose=verbose,
                                  local_samples=local_samples,
                                  preprocessing=_preprocessing_override(preset, mean, std, input_size, resize, channel_order))
    except QuantuneError as exc:
        _fail(exc)
    _analyze(folder, calib, options, top=top, quiet=quiet, verbose=verbose, json_out=json_out)


@app.command("layers")
def layers_cmd(
    folder: Annotated[Path, typer.Argument(help="Compile folder.")],
    json_out: JsonOut = False,
) -> None:
    """Every layer traced to its ONNX nodes: index, TFLite op, ONNX nodes, params, MACs, int8 scale."""
    from rich.markup import escape

    from quantune_edge.compile.artifacts import layer_table

    reporter = Reporter(quiet=json_out)
    try:
        data = layer_table(folder)
    except QuantuneError as exc:
        _fail(exc)
    if json_out:
        _print_json(data)
        return
    table = Table(title=f"{len(data['layers'])} layers of {folder} (ONNX: {Path(data['onnx_model']).name})", box=box.SIMPLE_HEAD,
                  header_style="bold", padding=(0, 1))
    for col in ("#", "TFLite op", "ONNX nodes", "params", "MMAC", "int8 scale"):
        table.add_column(col, justify="left" if col in ("TFLite op", "ONNX nodes") else "right", overflow="fold")
    for row in data["layers"]:
        nodes = "\n".join(f"{escape(n)} [dim]{o}[/]" for n, o in zip(row["onnx_nodes"], row["onnx_ops"])) or "[yellow]not traced[/]"
        table.add_row(str(row["index"]), f"{_op_label(row)}\n[dim]{escape(row['short_name'])}[/]", nodes, _count(row["params"]),
                      f"{row['macs'] / 1e6:.2f}", f"{row['int8_scale']:.4g}" if row["int8_scale"] else "-")
    reporter.console.print(table)
    if data.get("error"):
        reporter.warn(f"tracing failed: {data['error']}")
    for model, ops in (data.get("untraced") or {}).items():
        for u in ops:
            reporter.console.print(f"[yellow]{model} op {u['op']} {u['op_type']} not traced[/]: {escape(u['reason'])}")
    if data["onnx_nodes_without_op"]:
        reporter.console.print(f"[yellow]ONNX nodes no TFLite op computes[/]: {escape(', '.join(data['onnx_nodes_without_op'][:10]))}")


@app.command("tune")
def tune_cmd(
    folder: Annotated[Path, typer.Argument(help="Compile folder with an analysis.json (run 'analyze' first).")],
    eval_data: Annotated[Path, typer.Option("--eval", help="Evaluation images (labels.csv for top-1; else agreement with float32) or .npy.")],
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Accuracy budget: top-1 points below float32 (default 1.0).")] = None,
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
    try:
        source = _load_targets(latency_source, targets_dir)[0] if latency_source else None
        options = TuneOptions(latency_source=source, max_drop=max_drop, max_latency_ratio=max_latency_ratio, float_layers=float_layers,
                              keep_float=list(keep_float or []), keep_int8=list(keep_int8 or []), metric=metric, num_eval=num_eval, seed=seed, threads=threads,
                              rerank=rerank, fusion_aware=not naive, best_effort=best_effort, pareto=pareto, verbose=verbose,
                              remeasure=remeasure, preprocessing=_preprocessing_override(preset, mean, std, input_size, resize, channel_order))
        report = tune(folder, eval_data, options, reporter)
    except QuantuneError as exc:
        _fail(exc)
    if json_out:
        _print_json(report.to_dict())
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
    table.add_row("float32", "all", f"{100 * ref['float32_accuracy']:.1f} %", "0.00", "inf", f"{ref['float32_latency_ms']:.2f}",
                  f"{ref['float32_latency_ms'] / ref['int8_latency_ms']:.2f}x", "0")
    if int8:
        table.add_row("int8", "0", f"{100 * int8['accuracy']:.1f} %", f"{int8['drop_points']:.2f}", f"{int8['output_sqnr_db']:.1f}",
                      f"{ref['int8_latency_ms']:.2f}", "1.00x", str(int8["quantize_ops"]))
    table.add_row("[bold]mixed[/]", f"{len(c['float_layers'])} ({100 * c['share_of_layers_float']:.0f} %)",
                  f"{100 * c['accuracy']:.1f} %", f"{c['drop_points']:.2f}", f"{c['output_sqnr_db']:.1f}", f"{c['latency_ratio'] * ref['int8_latency_ms']:.2f}",
                  f"{c['latency_ratio']:.2f}x", str(c["quantize_ops"]))
    reporter.console.print(table)
    reporter.console.print("float layers: " + (", ".join(f"{l['index']}:{_one_line(l)}" for l in c["layers"]) or "none"), markup=False)
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


targets_app = typer.Typer(no_args_is_help=True, help="Device definitions (targets/*.toml) and the emulated ARM board.")
emulate_app = typer.Typer(no_args_is_help=True, help="An emulated Raspberry Pi: Debian arm64 under qemu-user with sshd on loopback.")
app.add_typer(targets_app, name="targets")
targets_app.add_typer(emulate_app, name="emulate")


def _load_targets(names: str, directory: Optional[Path]):
    from quantune_edge.deploy.targets import load_target

    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise QuantuneError("--target needs at least one target name")
    return [load_target(n, directory) for n in wanted]


@targets_app.command("list")
def targets_list_cmd(targets_dir: TargetsDir = None, json_out: JsonOut = False) -> None:
    """List the targets and their addresses."""
    from quantune_edge.deploy.targets import list_targets
    from quantune_edge.deploy.targets import targets_dir as resolve_dir

    try:
        targets, problems = list_targets(targets_dir)
        folder = resolve_dir(targets_dir)
    except QuantuneError as exc:
        _fail(exc)
    if json_out:
        _print_json({"folder": str(folder), "targets": [t.to_dict() for t in targets], "problems": problems})
        return
    reporter = Reporter()
    table = Table(title=f"targets in {folder}", box=box.SIMPLE_HEAD, header_style="bold")
    for col in ("name", "address", "threads", "description"):
        table.add_column(col)
    for t in targets:
        table.add_row(t.name, t.address, str(t.threads), t.description + (" [yellow](emulated)[/]" if t.emulated else ""))
    reporter.console.print(table)
    for problem in problems:
        reporter.warn(problem)


@targets_app.command("check")
def targets_check_cmd(
    name: Annotated[str, typer.Argument(help="Target name (targets/NAME.toml) or path to a .toml.")],
    targets_dir: TargetsDir = None,
    trust_new_host_key: TrustNew = False,
    install_runtime: InstallRuntime = False,
    json_out: JsonOut = False,
) -> None:
    """Connect, install the agent, and report arch, Python, TFLite runtime and free disk."""
    from quantune_edge.deploy.device import open_device

    reporter = Reporter(quiet=json_out)
    try:
        (target,) = _load_targets(name, targets_dir)
        device = open_device(target, trust_new_host_key=trust_new_host_key, install_runtime=install_runtime, log=reporter.info)
        device.conn.close()
    except QuantuneError as exc:
        _fail(exc)
    info = device.info
    if json_out:
        _print_json({"target": target.to_dict(), "work_dir": device.work_dir, **info})
        return
    dev, rt = info["device"], info["runtime"]
    reporter.console.print(
        f"[bold]{target.name}[/] ({target.address}{', emulated' if target.emulated else ''}): {dev['machine']}, {dev['cpu_count']} cores, "
        f"{dev['os']}, Python {dev['python']}, {rt['package']} {rt['version']}, {dev['free_disk_bytes'] / 2**30:.1f} GiB free in {device.work_dir}")


@emulate_app.command("up")
def emulate_up_cmd(
    port: Annotated[int, typer.Option("--port", help="Loopback port for the emulated board's sshd.")] = 2222,
    mirror: Annotated[Optional[str], typer.Option("--mirror", help="Debian mirror (default: the host's apt sources).")] = None,
    json_out: JsonOut = False,
) -> None:
    """Build (once, cached) and start the emulated ARM board; prints its target file."""
    from quantune_edge.deploy import emulator

    reporter = Reporter(quiet=json_out)
    try:
        state = emulator.up(port, mirror=mirror, log=reporter.info)
    except QuantuneError as exc:
        _fail(exc)
    if json_out:
        _print_json(state.to_dict())
    else:
        reporter.console.print(f"emulated ARM board running: sshd pid {state.pid} on 127.0.0.1:{state.port}; "
                               f"target file {state.target_file} (use --target {state.target_file} or local-arm)")


@emulate_app.command("down")
def emulate_down_cmd(json_out: JsonOut = False) -> None:
    """Stop the emulated board's sshd and unmount its userland."""
    from quantune_edge.deploy import emulator

    try:
        state = emulator.down()
    except QuantuneError as exc:
        _fail(exc)
    if json_out:
        _print_json(state.to_dict())
    else:
        Reporter().console.print(f"emulated ARM board stopped ({state.folder})")


@emulate_app.command("status")
def emulate_status_cmd(json_out: JsonOut = False) -> None:
    """Is the emulated board built and running?"""
    from quantune_edge.deploy import emulator

    state = emulator.status()
    if json_out:
        _print_json(state.to_dict())
        return
    size = f", {state.rootfs_bytes / 1e6:.0f} MB" if state.rootfs_bytes else ""
    Reporter().console.print(f"{state.folder}: {'built' if state.built else 'not built'}{size}; "
                             + (f"running (sshd pid {state.pid}, port {state.port})" if state.running else "stopped"))


@app.command("deploy")
def deploy_cmd(
    model: Annotated[Path, typer.Argument(help=".tflite model to put on the device.")],
    target: Annotated[str, typer.Option("--target", help="Target name or .toml path.")],
    name: Annotated[Optional[str], typer.Option("--name", help="File name on the device (default: the model's).")] = None,
    targets_dir: TargetsDir = None,
    trust_new_host_key: TrustNew = False,
    install_runtime: InstallRuntime = False,
    json_out: JsonOut = False,
) -> None:
    """Upload a model (temp name, sha256 checked on the device, then an atomic rename)."""
    from quantune_edge.deploy.device import check_model_file, open_device

    reporter = Reporter(quiet=json_out)
    try:
        check_model_file(model)  # before connecting: a file that is not a model never reaches the device
        (tgt,) = _load_targets(target, targets_dir)
        device = open_device(tgt, trust_new_host_key=trust_new_host_key, install_runtime=install_runtime, log=reporter.info)
        try:
            deployment = device.deploy(model, name)
        finally:
            device.conn.close()
    except QuantuneError as exc:
        _fail(exc)
    if json_out:
        _print_json({**deployment.to_dict(), "device": device.info["device"], "runtime": device.info["runtime"]})
    else:
        what = "uploaded and verified" if deployment.uploaded else "already there (same sha256)"
        reporter.console.print(f"{model.name} -> {tgt.name}:{deployment.remote_path}: {what} ({deployment.sha256[:12]}, "
                               f"{deployment.size_bytes / 1e6:.2f} MB, {deployment.seconds:.1f} s; device {device.info['device']['machine']})")


@app.command("bench")
def bench_cmd(
    models: Annotated[list[Path], typer.Argument(help=".tflite models to benchmark.")],
    target: Annotated[str, typer.Option("--target", help="Target name(s), comma-separated; run in parallel.")],
    warmup: Annotated[int, typer.Option("--warmup")] = 10,
    runs: Annotated[int, typer.Option("--runs")] = 100,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Interpreter threads (default: the target's).")] = None,
    no_xnnpack: Annotated[bool, typer.Option("--no-xnnpack", help="Builtin kernels instead of the XNNPACK delegate.")] = False,
    results: Annotated[Path, typer.Option("--results", help="Where reports are saved.")] = Path("results"),
    targets_dir: TargetsDir = None,
    trust_new_host_key: TrustNew = False,
    install_runtime: InstallRuntime = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Deploy (if needed) and benchmark models on one or more targets; reports go to --results."""
    from quantune_edge.measure.latency import BenchOptions, bench_with_progress
    from quantune_edge.measure.saved import summarize

    reporter = Reporter(quiet=quiet or json_out)
    try:
        tgts = _load_targets(target, targets_dir)
        options = BenchOptions(warmup=warmup, runs=runs, threads=threads, xnnpack=not no_xnnpack, install_runtime=install_runtime,
                               trust_new_host_key=trust_new_host_key, results_dir=results)
        outcomes = bench_with_progress(models, tgts, options, reporter)
    except QuantuneError as exc:
        _fail(exc)
    failed = [o for o in outcomes if not o.ok]
    saved = {p for o in outcomes for p in o.reports}
    if json_out:
        rows = [r.to_dict() for r in summarize(results) if r.report in saved] if saved else []
        _print_json({"outcomes": [o.to_dict() for o in outcomes], "results": rows})
    else:
        if saved:
            _print_results(reporter, [r for r in summarize(results) if r.report in saved])
        for o in failed:
            typer.echo(f"error: {o.error}", err=True)
        reporter.info(f"{len(outcomes) - len(failed)}/{len(outcomes)} targets ok; "
                      + (f"{len(saved)} report(s) in {results}/" if saved else "no report written"))
    if failed:
        raise typer.Exit(3)


def _print_results(reporter: Reporter, rows) -> None:
    from rich.markup import escape

    from quantune_edge.report.bench_page import display_labels

    table = Table(title="on-device latency (ms)", box=box.SIMPLE_HEAD, header_style="bold")
    for col in ("target", "arch", "model", "size MB", "p50", "p90", "vs float"):
        table.add_column(col, justify="right" if col not in ("target", "model") else "left")
    labels, same_file = display_labels(rows)
    for r, label in zip(rows, labels):
        table.add_row(r.target + (" [yellow](emu)[/]" if r.emulated else ""), r.machine, escape(label), f"{r.size_bytes / 1e6:.2f}",
                      f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.speedup_vs_float:.2f}x" if r.speedup_vs_float else "–")
    reporter.console.print(table)
    if same_file:
        reporter.console.print(same_file, markup=False)
    if any(r.emulated for r in rows):
        reporter.console.print("[yellow](emu)[/]: emulated under qemu-user, for pipeline checks only; not a real board's latency")


@app.command("report")
def report_cmd(
    results: Annotated[Path, typer.Argument(help="Results folder written by 'bench'.")] = Path("results"),
    html_path: Annotated[Optional[Path], typer.Option("--html", help="HTML page to write (default RESULTS/report.html).")] = None,
    json_out: JsonOut = False,
) -> None:
    """Compare float / int8 / mixed per target (latest report of each) and write an HTML page."""
    from quantune_edge.common.outputs import check_output_page, write_page
    from quantune_edge.measure.saved import summarize
    from quantune_edge.report.bench_page import render_html

    page = html_path or results / "report.html"
    try:
        rows = summarize(results)
        check_output_page(page, "--html", {"the results folder": results})
        write_page(page, render_html(rows))
    except QuantuneError as exc:
        _fail(exc)
    if json_out:
        _print_json({"schema_version": 1, "kind": "bench_summary", "rows": [r.to_dict() for r in rows], "html": str(page)})
        return
    reporter = Reporter()
    _print_results(reporter, rows)
    reporter.info(f"wrote {page}")


@app.command("run")
def run_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX image model.")],
    calib: Annotated[Path, typer.Option("--calib", help="Calibration images (folder) or .npy.")],
    eval_data: Annotated[Path, typer.Option("--eval", help="Evaluation images (labels.csv for top-1) or .npy.")],
    target: Annotated[str, typer.Option("--target", help="Target name(s), comma-separated.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for everything (kept; stages are cached in it).")] = Path("runs/run"),
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Accuracy budget: top-1 points below float32 (default 1.0).")] = None,
    max_latency_ratio: Annotated[Optional[float], typer.Option("--max-latency-ratio", help="Latency budget vs full int8, timed on the first target (instead of --max-drop).")] = None,
    num_calib: Annotated[int, typer.Option("--num-calib")] = 100,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples for the two-run analysis.")] = 32,
    num_eval: Annotated[int, typer.Option("--num-eval")] = 200,
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="Per-tensor int8 weights.")] = False,
    label_offset: Annotated[int, typer.Option("--label-offset")] = 0,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per model on each target.")] = 20,
    pareto: Annotated[bool, typer.Option("--pareto", help="Also sweep k on the host and plot pareto.png.")] = False,
    eval_on_device: Annotated[bool, typer.Option("--eval-on-device", help="Also measure top-1 on each target (the agent's eval).")] = False,
    best_effort: Annotated[bool, typer.Option("--best-effort", help="Go on with the best model when the budget is unreachable.")] = False,
    targets_dir: TargetsDir = None,
    trust_new_host_key: TrustNew = False,
    install_runtime: InstallRuntime = False,
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
    """ONNX to on-device report: compile, analyze, tune, deploy and bench float32/int8/mixed, report.html."""
    from quantune_edge.common.preprocessing import make_preprocessing
    from quantune_edge.pipeline import RunOptions

    try:
        if max_drop is not None and max_latency_ratio is not None:
            raise InputError("give one of --max-drop, --max-latency-ratio")
        targets = _load_targets(target, targets_dir)
        options = RunOptions(preprocessing=make_preprocessing(preset, mean, std, input_size, resize, channel_order),
                             label_offset=label_offset, per_tensor=per_tensor, num_calib=num_calib,
                             analysis_samples=num_samples, max_drop=1.0 if max_drop is None else max_drop, max_latency_ratio=max_latency_ratio,
                             num_eval=num_eval, best_effort=best_effort, pareto=pareto, eval_on_device=eval_on_device, runs=runs,
                             trust_new_host_key=trust_new_host_key, install_runtime=install_runtime, verbose=verbose)
    except QuantuneError as exc:
        _fail(exc)
    _run(model, calib, eval_data, targets, out, options, quiet=quiet, verbose=verbose, json_out=json_out)


def _run(model: Path, calib: Path, eval_data: Path, targets, out: Path, options, *, quiet: bool, verbose: bool, json_out: bool) -> None:
    from quantune_edge.measure.saved import ResultRow
    from quantune_edge.pipeline import run_pipeline
    from quantune_edge.report.run_report import budget_warnings

    reporter = Reporter(quiet=quiet or json_out, verbose=verbose)
    try:
        data = run_pipeline(model, calib, eval_data, targets, out, options, reporter)
    except QuantuneError as exc:
        _fail(exc)
    if json_out:
        _print_json(data)
        return
    if quiet:
        return
    acc = data["accuracy"]
    reporter.console.print(f"accuracy ({acc['is']}, {acc['samples']} images, host): "
                           + ", ".join(f"{k} {100 * v:.1f} %" for k, v in acc["host"].items() if v is not None)
                           + f"; float layers: {', '.join(_one_line(l) for l in data['tune']['chosen_layers']) or 'none'}", markup=False)
    if data["device"]:
        _print_results(reporter, [ResultRow(**r) for r in data["device"]])
    for line in budget_warnings(data.get("latency_budget")):
        reporter.warn(line)
    cached = [s for s, v in data["stages"].items() if v.get("cached")]
    reporter.console.print(f"wrote {out / 'report.html'} and report.json" + (f" (cached stages: {', '.join(cached)})" if cached else ""))


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder (stages are cached in it).")] = Path("runs/demo"),
    num_calib: Annotated[int, typer.Option("--num-calib")] = 32,
    no_device: Annotated[bool, typer.Option("--no-device", help="No emulated ARM board: compile, analyze, tune and report only.")] = False,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per model on the emulated board.")] = 5,
    quiet: Quiet = False,
    verbose: Verbose = False,
    json_out: JsonOut = False,
) -> None:
    """`run` on the built-in EfficientNet-Lite0 and demo images against the emulated ARM board
    (started, and built once, as needed): compile, analyze, tune, bench float32/int8/mixed, report."""
    from quantune_edge.common.preprocessing import make_preprocessing
    from quantune_edge.deploy import emulator
    from quantune_edge.deploy.targets import load_target
    from quantune_edge.pipeline import RunOptions

    if not DEMO_MODEL.is_file() or not DEMO_IMAGES.is_dir():
        _fail(QuantuneError(f"demo assets not found under {DEMO_DIR} (run from a clone of the repository)"))
    reporter = Reporter(quiet=quiet or json_out, verbose=verbose)
    targets = []
    if not no_device:
        try:
            state = emulator.up(log=reporter.info)
        except QuantuneError as exc:
            _fail(exc)
        targets = [load_target(state.target_file)]
    options = RunOptions(preprocessing=make_preprocessing(**DEMO_PREPROCESSING), num_calib=num_calib, analysis_samples=num_calib,
                         num_eval=40, runs=runs, warmup=1, verbose=verbose)
    _run(DEMO_MODEL, DEMO_IMAGES, DEMO_IMAGES, targets, out, options, quiet=quiet, verbose=verbose, json_out=json_out)
    if targets and not (quiet or json_out):
        reporter.info("the emulated board keeps running ('quantune-edge targets emulate down' stops it); "
                      "its latency is qemu's, not a Pi's")


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    typer.echo(__version__)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what ``timeout`` and CI cancellation send) handled as SIGINT is: every ``finally``
    and staging clean-up runs, so a killed command leaves nothing half-written."""


def _interrupt(signum: int, _frame) -> None:
    _interrupt.signum = signum  # type: ignore[attr-defined]
    raise Interrupted(signal.Signals(signum).name)


def main() -> None:
    _interrupt.signum = None  # type: ignore[attr-defined]
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        app()
    except SystemExit:
        signum = _interrupt.signum  # type: ignore[attr-defined]
        if signum is None:
            raise
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "quantune-edge")
        sys.stderr.write(f"error: {command} interrupted ({signal.Signals(signum).name}); nothing half-written was left, "
                         "and earlier outputs are as they were\n")
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
