"""The shared COCO detectors: float32, full int8 and tune's mixed model, judged by COCO mAP.

Per detector: compile (per-channel int8, calibrated on coco-train2017), ONNX Runtime and TFLite
float32 / int8 mAP50-95 and mAP50 on coco-val2017-128 (pycocotools), then `analyze` and
`tune --max-drop` (mAP points) with `--best-effort`, so the table shows what the tool chooses today
even when the budget is missed: its float layers, its mAP and its host latency ratio to full int8
(timed paired, XNNPACK or, where XNNPACK cannot prepare the model, the builtin kernels, 2 threads).
This is the baseline the mixed-precision issue for detectors must move.

    .venv/bin/python benchmarks/detection.py [--models yolov5n,nanodet-m] [--calib-num 32] [--eval-num 128] [--max-drop 1.5]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _models import ASSETS, REPO
from rich.console import Console
from rich.table import Table

from quantune_edge import CompileOptions, compile_model, make_preprocessing
from quantune_edge.analyze.analysis import AnalysisOptions, analyze
from quantune_edge.compile.artifacts import MIXED_MODEL, CompiledModel
from quantune_edge.compile.compiler import onnxruntime_all_outputs
from quantune_edge.model.runtime import TfliteRunner, median_ratio, paired_latency_ms, per_sample
from quantune_edge.tasks import make_task
from quantune_edge.tune.tuning import TuneOptions, tune

DETECTION = ASSETS / "detection"
DETECTORS = {
    "yolov5n": ("yolov5n-640-coco.onnx", dict(preset="yolo", resize_mode="letterbox"), "yolov5"),
    "nanodet-m": ("nanodet-m-320-coco.onnx", dict(channel_order="bgr", mean="103.53,116.28,123.675", std="57.375,57.12,58.395",
                                                  resize_mode="stretch"), f"{REPO / 'tests' / 'tasks' / 'nanodet_decoder.py'}:decode"),
}


def onnxruntime_scores(compiled: CompiledModel, model: Path, samples) -> dict:
    names, outputs, shapes = onnxruntime_all_outputs(model, compiled.specs, samples.data)
    return compiled.task.scores(per_sample(names, outputs, shapes), samples.labels)


def latency_ratio(model: Path, reference: Path, sample: np.ndarray) -> float:
    """Median of three paired ratios (as tune measures): model vs reference, 2 threads."""
    pairs = [paired_latency_ms(model, reference, sample, threads=2, rounds=5, runs=10) for _ in range(3)]
    mine, ref = median_ratio(pairs)
    return mine / ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DETECTORS))
    parser.add_argument("--calib-num", type=int, default=32)
    parser.add_argument("--eval-num", type=int, default=128, help="images of coco-val2017-128 for the mAP columns")
    parser.add_argument("--tune-num", type=int, default=32, help="val images tune judges its candidates on")
    parser.add_argument("--max-drop", type=float, default=1.5, help="tune's budget, mAP50-95 points")
    args = parser.parse_args()
    console = Console()
    table = Table(title=f"COCO mAP50-95 / mAP50 on {args.eval_num} coco-val2017 images (calibration: {args.calib_num} coco-train2017; "
                        "pycocotools); latency: host, paired vs full int8, 2 threads")
    for col in ("detector", "ONNX Runtime", "TFLite float32", "full int8", f"tune --max-drop {args.max_drop}", "float layers",
                "budget met", "evaluations", "vs int8 latency", "host kernels (int8)", "wall s"):
        table.add_column(col, justify="right")
    fmt = lambda s: "-" if s is None else f"{100 * s['mAP50-95']:.1f} / {100 * s['mAP50']:.1f}"  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            file, prep_kwargs, decoder = DETECTORS[name]
            start = time.perf_counter()
            out = Path(tmp) / name
            console.print(f"{name}: compiling ...")
            compile_model(DETECTION / "models" / file, DETECTION / "coco-train2017-128", out,
                          CompileOptions(preprocessing=make_preprocessing(**prep_kwargs), num_calib=args.calib_num,
                                         judge=make_task("detect", decoder=decoder)))
            compiled = CompiledModel.open(out)
            samples = compiled.load_samples(DETECTION / "coco-val2017-128", args.eval_num, 0, what="evaluation")
            console.print(f"{name}: scoring float32 and int8 ...")
            scores = {"ort": onnxruntime_scores(compiled, DETECTION / "models" / file, samples),
                      "float32": compiled.task_scores(compiled.float_model, samples),
                      "int8": compiled.task_scores(compiled.int8_model, samples)}
            console.print(f"{name}: analyze + tune ...")
            analyze(out, DETECTION / "coco-train2017-128", AnalysisOptions(num_samples=16))
            report = tune(out, DETECTION / "coco-val2017-128", TuneOptions(max_drop=args.max_drop, num_eval=args.tune_num, best_effort=True))
            scores["mixed"] = compiled.task_scores(out / MIXED_MODEL, samples)
            ratio = latency_ratio(out / MIXED_MODEL, compiled.int8_model, compiled.tflite_inputs(samples)[0])
            console.print(f"{name}: ORT {fmt(scores['ort'])}, float32 {fmt(scores['float32'])}, int8 {fmt(scores['int8'])}, "
                          f"mixed {fmt(scores['mixed'])} with {len(report.chosen['float_layers'])} float layers, {ratio:.2f}x int8 latency")
            table.add_row(name, fmt(scores["ort"]), fmt(scores["float32"]), fmt(scores["int8"]), fmt(scores["mixed"]),
                          str(len(report.chosen["float_layers"])), "yes" if report.budget["met"] else "no",
                          f"{report.search['evaluations']} (≤{report.search['bound']})", f"{ratio:.2f}x",
                          TfliteRunner(compiled.int8_model).kernels.split(" (")[0], f"{time.perf_counter() - start:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
