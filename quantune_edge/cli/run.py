"""`run`, `demo`, `version`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quantune_edge import __version__
from quantune_edge.cli.shared import (
    DATA_HELP,
    ChannelOrder,
    Classes,
    Decoder,
    InputPrep,
    InputShape,
    InputSize,
    InstallRuntime,
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
    TargetsDir,
    TaskName,
    TrustNew,
    Verbose,
    app,
    fail,
    load_targets,
    make_judge,
    one_line,
    one_line_errors,
    print_json,
    print_results,
)
from quantune_edge.common.console import Reporter
from quantune_edge.errors import InputError, QuantuneError
from quantune_edge.tasks.base import format_metric

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO_ROOT / "demo"
# The demo's case: MobileNetV2 (Apache-2.0 weights) with per-tensor int8 weights, as kernels without
# per-channel support need them. Full int8 then collapses (the depthwise convs' weight ranges differ
# per channel by orders of magnitude) and a few float layers win it back: what the tool is for.
DEMO_MODEL = DEMO_DIR / "models" / "mobilenetv2-tf2-ptq-dequant.onnx"
DEMO_IMAGES = DEMO_DIR / "images"  # calibration and analysis
DEMO_EVAL_IMAGES = DEMO_DIR / "images-eval"  # tune's and the report's accuracy: other images
DEMO_PREPROCESSING = {"preset": "tf"}  # RGB, x / 127.5 - 1
DEMO_LABEL_OFFSET = 1  # 1001 outputs, 0 = background



@app.command("run")
def run_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX model (image inputs preprocessed, others fed as given).")],
    calib: Annotated[Path, typer.Option("--calib", help=DATA_HELP)],
    eval_data: Annotated[Path, typer.Option("--eval", help=DATA_HELP)],
    target: Annotated[str, typer.Option("--target", help="Target name(s), comma-separated.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for everything (kept; stages are cached in it).")] = Path("runs/run"),
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Accuracy budget: points of the task's metric below float32 (top-1, mAP50-95; default 1.0).")] = None,
    min_sqnr: Annotated[Optional[float], typer.Option("--min-sqnr", help="The fidelity task's budget: the worst output's SQNR vs float32, dB.")] = None,
    max_latency_ratio: Annotated[Optional[float], typer.Option("--max-latency-ratio", help="Latency budget vs full int8, timed on the first target (instead of --max-drop).")] = None,
    num_calib: Annotated[int, typer.Option("--num-calib")] = 100,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples for the two-run analysis.")] = 32,
    num_eval: Annotated[int, typer.Option("--num-eval")] = 200,
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="Per-tensor int8 weights.")] = False,
    label_offset: Annotated[int, typer.Option("--label-offset")] = 0,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per model on each target.")] = 20,
    pareto: Annotated[bool, typer.Option("--pareto", help="Also sweep k on the host and plot pareto.png.")] = False,
    eval_on_device: Annotated[bool, typer.Option("--eval-on-device", help="Also measure the task's metric on each target from the outputs computed there (the agent's eval).")] = False,
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
    """ONNX to on-device report: compile, analyze, tune, deploy and bench float32/int8/mixed, report.html."""
    from quantune_edge.common.preprocessing import make_preprocessing
    from quantune_edge.model.onnx_model import parse_input_shapes
    from quantune_edge.pipeline import RunOptions

    with one_line_errors():
        if sum(b is not None for b in (max_drop, max_latency_ratio, min_sqnr)) > 1:
            raise InputError("give one of --max-drop, --min-sqnr, --max-latency-ratio")
        judge = make_judge(task, label_offset, decoder, labels, nms_iou, classes, metric)
        targets = load_targets(target, targets_dir)
        options = RunOptions(preprocessing=make_preprocessing(preset, mean, std, input_size, resize, channel_order, resize_mode,
                                                              pad_value, placement, input_prep or []),
                             judge=judge, input_shapes=parse_input_shapes(input_shape or []), min_sqnr=min_sqnr,
                             label_offset=label_offset, per_tensor=per_tensor, num_calib=num_calib,
                             analysis_samples=num_samples, max_drop=max_drop, max_latency_ratio=max_latency_ratio,
                             num_eval=num_eval, best_effort=best_effort, pareto=pareto, eval_on_device=eval_on_device, runs=runs,
                             trust_new_host_key=trust_new_host_key, install_runtime=install_runtime, verbose=verbose)
    _run(model, calib, eval_data, targets, out, options, quiet=quiet, verbose=verbose, json_out=json_out)


def _run(model: Path, calib: Path, eval_data: Path, targets, out: Path, options, *, quiet: bool, verbose: bool, json_out: bool) -> None:
    from quantune_edge.measure.saved import ResultRow
    from quantune_edge.pipeline import run_pipeline
    from quantune_edge.report.run_report import budget_warnings

    reporter = Reporter(quiet=quiet or json_out, verbose=verbose)
    with one_line_errors():
        data = run_pipeline(model, calib, eval_data, targets, out, options, reporter)
    if json_out:
        print_json(data)
        return
    if quiet:
        return
    acc = data["accuracy"]
    reporter.console.print(f"accuracy ({acc['is']}, {acc['samples']} samples, host): "
                           + ", ".join(f"{k} {format_metric(v, acc['is'])}" for k, v in acc["host"].items() if v is not None)
                           + f"; float layers: {', '.join(one_line(l) for l in data['tune']['chosen_layers']) or 'none'}", markup=False)
    if data["device"]:
        print_results(reporter, [ResultRow(**r) for r in data["device"]])
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
    """`run` on the built-in MobileNetV2 with per-tensor int8 weights, whose full int8 collapses, against
    the emulated ARM board (started, and built once, as needed): compile, analyze, tune (a few float
    layers win the accuracy back), bench float32/int8/mixed, report."""
    from quantune_edge.common.preprocessing import make_preprocessing
    from quantune_edge.deploy import emulator
    from quantune_edge.deploy.targets import load_target
    from quantune_edge.pipeline import RunOptions

    if not DEMO_MODEL.is_file() or not DEMO_IMAGES.is_dir() or not DEMO_EVAL_IMAGES.is_dir():
        fail(QuantuneError(f"demo assets not found under {DEMO_DIR} (run from a clone of the repository)"))
    reporter = Reporter(quiet=quiet or json_out, verbose=verbose)
    targets = []
    if not no_device:
        with one_line_errors():
            state = emulator.status(disk_usage=False)  # a board already up (on any port) is the demo's board
            if not state.running:
                state = emulator.up(log=reporter.info)
        targets = [load_target(state.target_file)]
    options = RunOptions(preprocessing=make_preprocessing(**DEMO_PREPROCESSING), label_offset=DEMO_LABEL_OFFSET, per_tensor=True,
                         num_calib=num_calib, analysis_samples=num_calib, num_eval=40, runs=runs, warmup=1, verbose=verbose)
    _run(DEMO_MODEL, DEMO_IMAGES, DEMO_EVAL_IMAGES, targets, out, options, quiet=quiet, verbose=verbose, json_out=json_out)
    if targets and not (quiet or json_out):
        reporter.info("the emulated board keeps running ('quantune-edge targets emulate down' stops it); "
                      "its latency is qemu's, not a Pi's")


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    typer.echo(__version__)
