"""Compile every shared model and print, side by side: stage times, op counts before/after fusion,
sizes, and top-1 of ONNX Runtime float vs TFLite float32 vs TFLite int8 on held-out labelled images.

    .venv/bin/python bench/compile.py [--eval N] [--calib-num N]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _models import ASSETS, MODELS, add_data_args, compile_shared  # noqa: E402
from rich.console import Console
from rich.table import Table

from quantune_edge import make_preprocessing  # noqa: E402
from quantune_edge.common import metrics  # noqa: E402
from quantune_edge.common.preprocessing import load_samples  # noqa: E402
from quantune_edge.compile.artifacts import FLOAT_MODEL, INT8_MODEL  # noqa: E402
from quantune_edge.compile.compiler import onnxruntime_outputs  # noqa: E402
from quantune_edge.model.onnx_model import input_specs, load  # noqa: E402
from quantune_edge.model.runtime import TfliteRunner  # noqa: E402
from quantune_edge.tasks.classification import Classification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(parser, eval_help="default: every image in the eval folder")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()

    console = Console(width=max(Console().width, 160))
    stages = Table(title="compile stages and graphs")
    for col in ("model", "weights", "prepare s", "onnx2tf s", "f32 s", "int8 s", "verify s", "ONNX ops raw→prep",
                "TFLite ops f32/int8", "Q/DQ", "unfused", "MB f32/int8"):
        stages.add_column(col, justify="right")
    accuracy = Table(title=f"top-1 %: calibration {args.calib_num} from {Path(args.calib).name}, evaluation on {Path(args.eval_dir).name}")
    for col in ("model", "weights", "ORT float", "TFLite f32", "TFLite int8", "int8 drop", "|f32−ORT| ≤ 0.5"):
        accuracy.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            file, prep_kwargs, offset = MODELS[name]
            model = ASSETS / "models" / file
            prep = make_preprocessing(**prep_kwargs)
            specs, _ = input_specs(load(model))
            held_out = load_samples(args.eval_dir, prep.sized_for(specs), specs, args.eval_num, seed=1, what="evaluation",
                                    labels=Classification(offset).read_labels)
            ort_top1 = metrics.top1_accuracy(onnxruntime_outputs(model, specs, held_out.data), held_out.labels, offset)
            for per_channel in (True, False):
                out = Path(tmp) / f"{name}-{per_channel}"
                console.print(f"compiling {name} ({'per-channel' if per_channel else 'per-tensor'}) ...")
                r = compile_shared(name, args.calib, out, args.calib_num, per_channel=per_channel)
                f32 = metrics.top1_accuracy(TfliteRunner(out / FLOAT_MODEL).run(held_out.data), held_out.labels, offset)
                i8 = metrics.top1_accuracy(TfliteRunner(out / INT8_MODEL).run(held_out.data), held_out.labels, offset)
                t = r.timings_s
                unfused = len(r.fusions["float32"]["unfused"]) + len(r.fusions["int8"]["unfused"])
                weights = "per-channel" if per_channel else "per-tensor"
                stages.add_row(
                    name, weights,
                    f"{t['prepare_onnx']:.1f}", f"{t['onnx2tf_saved_model']:.1f}", f"{t['tflite_float32']:.1f}",
                    f"{t['tflite_int8_calibrated']:.1f}", f"{t['verify']:.1f}",
                    f"{r.onnx_ops['original_count']}→{r.onnx_ops['prepared_count']}",
                    f"{r.tflite_ops['float32_count']}/{r.tflite_ops['int8_count']}",
                    f"{r.quantize_ops['int8_quantize']}/{r.quantize_ops['int8_dequantize']}", str(unfused),
                    f"{r.sizes_bytes['float32'] / 1e6:.1f}/{r.sizes_bytes['int8'] / 1e6:.1f}",
                )
                accuracy.add_row(
                    name, weights, f"{100 * ort_top1:.1f}", f"{100 * f32:.1f}", f"{100 * i8:.1f}", f"{100 * (f32 - i8):.1f}",
                    f"{100 * abs(f32 - ort_top1):.2f} " + ("ok" if abs(f32 - ort_top1) <= 0.005 else "FAIL"),
                )
    console.print(stages)
    console.print(accuracy)
    console.print(f"evaluation images: {len(held_out)} (seed-1 subset, none used for calibration when folders differ)")


if __name__ == "__main__":
    main()
