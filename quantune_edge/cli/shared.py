"""What every command shares: the app, option types, one-line errors, --json output, formatting."""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from quantune_edge.common.console import Reporter
from quantune_edge.common.records import jsonable
from quantune_edge.errors import InputError, QuantuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Mixed-precision post-training quantization (QuantuneV2) from ONNX to ARM edge devices.",
)

# Preprocessing options shared by every command that reads images.
DATA_HELP = ("Image folder (labels.csv / COCO / YOLO labels optional), a .npy (one input, the model's layout), a .npz (one array per "
             "input name, optional 'labels') or FILE.py:function yielding per sample a dict of arrays or (dict, label).")
InputSize = Annotated[Optional[str], typer.Option("--input-size", help="Model input size S or HxW (default: the model's); fixes dynamic spatial dims.")]
Resize = Annotated[Optional[int], typer.Option("--resize", help="Resize the shorter side to R before the crop (default round(S/0.875)).")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean a,b,c in 0-255 pixel units, model channel order.")]
Std = Annotated[Optional[str], typer.Option("--std", help="Per-channel std a,b,c in 0-255 pixel units: x = (pixel - mean) / std.")]
Preset = Annotated[Optional[str], typer.Option("--preset", help="torch | tf | raw | caffe (BGR, mean 104,117,123). Default torch.")]
ResizeMode = Annotated[Optional[str], typer.Option("--resize-mode", help="crop (classifiers) | letterbox (YOLO: keep aspect, pad) | stretch.")]
PadValue = Annotated[Optional[float], typer.Option("--pad-value", help="Letterbox padding, 0-255 pixel value (default 114).")]
Placement = Annotated[Optional[str], typer.Option("--placement", help="Letterbox placement: center | top-left.")]
TaskName = Annotated[str, typer.Option("--task", help="classify (top-1/top-5) | detect (COCO mAP) | fidelity (output SQNR vs float32, no labels) | custom (--metric).")]
Metric = Annotated[Optional[str], typer.Option("--metric", help="custom: FILE.py:function(outputs_list, labels_list) -> float, higher is better.")]
Decoder = Annotated[str, typer.Option("--decoder", help="detect: yolov5 | yolov8 | FILE.py:function(outputs) -> (boxes, scores, class_ids).")]
Labels = Annotated[Optional[Path], typer.Option("--labels", help="detect: COCO json of the images (default: annotations.json or labels/ beside them).")]
NmsIou = Annotated[float, typer.Option("--nms-iou", help="detect: IoU above which class-wise NMS drops a box.")]
Classes = Annotated[int, typer.Option("--classes", help="detect: number of classes the detector predicts.")]
InputPrep = Annotated[Optional[list[str]], typer.Option("--input-prep", help="NAME:KEY=VALUE: one preprocessing option (KEY: preset, mean, std, input-size, resize, channel-order, resize-mode, pad-value, placement) of image input NAME.")]
InputShape = Annotated[Optional[list[str]], typer.Option("--input-shape", help="NAME=1x3x640x640: fix an input's dynamic dimensions (repeatable).")]
ChannelOrder = Annotated[Optional[str], typer.Option("--channel-order", help="rgb | bgr: channel order the model expects.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary; errors only.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show TensorFlow/onnx2tf logs.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
TargetsDir = Annotated[Optional[Path], typer.Option("--targets-dir", help="Folder of target TOML files (default ./targets).")]
TrustNew = Annotated[bool, typer.Option("--trust-new-host-key", help="Trust an unknown host key on first use and record it in known_hosts.")]
InstallRuntime = Annotated[bool, typer.Option("--install-runtime", help="pip-install the TFLite runtime that fits the device "
                                                                                 "(see 'targets check') if it has none.")]


def print_json(data: dict) -> None:
    """--json output: the result alone on stdout (human output goes to stderr)."""
    sys.stdout.write(json.dumps(jsonable(data), indent=2) + "\n")


def fail(exc: QuantuneError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A QuantuneError in the block becomes one line on stderr and its exit code, never a traceback."""
    try:
        yield
    except QuantuneError as exc:
        fail(exc)


def preprocessing_override(preset, mean, std, input_size, resize, channel_order):
    """None (= reuse compile.json's preprocessing) unless a flag was given."""
    from quantune_edge.common.preprocessing import make_preprocessing

    if all(v is None for v in (preset, mean, std, input_size, resize, channel_order)):
        return None
    return make_preprocessing(preset, mean, std, input_size, resize, channel_order)


def make_judge(task: str, label_offset: int, decoder: str, labels: Path | None, nms_iou: float, classes: int,
               metric: str | None = None):
    """The Task the task flags describe; a flag of another task is refused, not ignored."""
    from quantune_edge.tasks import make_task

    if label_offset and task != "classify":
        raise InputError("--label-offset is a classify option")
    if labels is not None and task != "detect":
        raise InputError("--labels is a detect option; a classifier's labels are labels.csv beside the images")
    if (metric is not None) != (task == "custom"):
        raise InputError("--metric FILE.py:function goes with --task custom, and --task custom needs it")
    if task == "classify":
        return make_task("classify", label_offset=label_offset)
    if task == "detect":
        return make_task("detect", decoder=decoder, labels_file=None if labels is None else str(labels), nms_iou=nms_iou, classes=classes)
    if task == "custom":
        return make_task("custom", metric_file=metric)
    return make_task(task)


def fmt_db(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    return "inf" if v == float("inf") else f"{v:.1f}"


def fmt_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


_OP_ABBREV = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "dwconv", "FULLY_CONNECTED": "fc", "TRANSPOSE_CONV": "deconv"}


def op_label(layer: dict) -> str:
    """``dwconv+relu6``: the TFLite op, short, with its fused activation."""
    op = _OP_ABBREV.get(layer["op_type"], layer["op_type"].lower())
    return op + (f"+{layer['fused_activation'].lower()}" if layer["fused_activation"] not in (None, "NONE") else "")


def both_names(layer: dict) -> str:
    """The layer's short ONNX name with its TFLite short name below (or the TFLite name alone)."""
    from rich.markup import escape

    from quantune_edge.compile.tracing import onnx_label

    onnx = onnx_label(layer)
    names = f"{escape(onnx)}\n[dim]{escape(layer['short_name'])}[/]" if onnx else escape(layer["short_name"])
    return names + (f"\n[yellow]{escape(layer['unit'])}[/]" if layer.get("unit") else "")


def one_line(layer: dict) -> str:
    from quantune_edge.compile.tracing import onnx_label

    onnx = onnx_label(layer)
    return f"{onnx} ({layer['short_name']})" if onnx else layer["short_name"]


targets_app = typer.Typer(no_args_is_help=True, help="Device definitions (targets/*.toml) and the emulated ARM board.")
emulate_app = typer.Typer(no_args_is_help=True, help="An emulated Raspberry Pi: Debian arm64 under qemu-user with sshd on loopback.")
app.add_typer(targets_app, name="targets")
targets_app.add_typer(emulate_app, name="emulate")


def load_targets(names: str, directory: Optional[Path]):
    from quantune_edge.deploy.targets import load_target

    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise QuantuneError("--target needs at least one target name")
    return [load_target(n, directory) for n in wanted]


def print_results(reporter: Reporter, rows) -> None:
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
