"""The shared COCO detectors: float32, full int8 and tune's mixed model, judged by COCO mAP, and the
mixed models two baselines choose at the same number of float layers.

Per detector: compile (per-channel int8, calibrated on coco-train2017), ONNX Runtime and TFLite
float32 / int8 mAP50-95 and mAP50 on coco-val2017-128 (pycocotools), then `analyze` and
`tune --max-drop` (mAP points, judged on --tune-num val images) with `--best-effort`, so the table
shows what the tool chooses even when the budget is missed: its float layers, its mAP and its host
latency ratio to full int8 (timed paired, XNNPACK or the builtin kernels where XNNPACK cannot prepare
the model, 2 threads).

The second table keeps k layers float, for several k, three ways, every model spliced the same way:
ours (the analysis order grown into regions, as `tune --float-layers k --rerank 0` chooses), TF
QuantizationDebugger's RMSE/scale heuristic (the k layers with the largest own error in output LSBs,
`local_rmse`) and "the last k ops float", the two baselines given as many float layers as ours took
(its k picks grow into regions). mAP on the --eval-num images; the paired test is a sign test
on per-image AP50-95 (each image scored alone by pycocotools), ours against each baseline.

    .venv/bin/python benchmarks/detection.py [--models yolov5n,nanodet-m] [--calib-num 32] [--eval-num 128] [--max-drop 1.5] [--ks 1,2,3,5,10]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _models import ASSETS, REPO
from rich.console import Console
from rich.table import Table

from quantune_edge import CompileOptions, compile_model, make_preprocessing
from quantune_edge.analyze.analysis import AnalysisOptions, analyze
from quantune_edge.compile.artifacts import ANALYSIS_JSON, MIXED_MODEL, CompiledModel
from quantune_edge.compile.compiler import onnxruntime_all_outputs
from quantune_edge.model.runtime import TfliteRunner, median_ratio, paired_latency_ms, per_sample
from quantune_edge.tasks import make_task
from quantune_edge.tune.tuning import TuneOptions, tune


def per_image_map(compiled: CompiledModel, model: Path, samples) -> np.ndarray:
    """AP50-95 of each image scored alone (pycocotools), for a paired test between two models."""
    outputs = compiled.sample_outputs(model, compiled.tflite_inputs(samples))
    values = []
    for k in range(len(outputs)):
        score = compiled.task.scores(outputs[k:k + 1], samples.labels[k:k + 1]) or {}
        values.append(score.get("mAP50-95", 0.0))
    return np.asarray(values)


def sign_test(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, int, float]:
    """Images where ours scores higher, lower, and the two-sided sign-test p-value."""
    from math import comb

    wins, losses = int(np.sum(ours > theirs + 1e-9)), int(np.sum(theirs > ours + 1e-9))
    n = wins + losses
    tail = sum(comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n if n else 1.0
    return wins, losses, min(1.0, 2 * tail)


def baselines(compiled: CompiledModel, out: Path, samples, ks: list[int], console: Console) -> Table:
    """mAP at k float layers: ours, the debugger heuristic, the last k ops; paired sign tests."""
    analysis = json.loads((out / ANALYSIS_JSON).read_text())
    layers = analysis["layers"]
    rmse = sorted(range(len(layers)), key=lambda i: -(layers[i]["local_rmse_lsb"] or -1.0))
    table = Table(title=f"{out.name}: k float layers, three ways (mAP50-95 on {len(samples)} val images; sign test on per-image AP)")
    for col in ("k", "ours: float layers", "ours mAP", "RMSE/scale mAP", "last-k mAP", "ours vs RMSE/scale (won/lost, p)",
                "ours vs last-k (won/lost, p)"):
        table.add_column(col, justify="right")
    for k in ks:
        report = tune(out, DETECTION / "coco-val2017-128", TuneOptions(float_layers=k, rerank=0, num_eval=8, best_effort=True))
        ours = report.chosen["float_layers"]  # k picks grown into regions: the baselines get as many layers
        chosen = {"ours": ours, "rmse": rmse[:len(ours)], "last": list(range(len(layers)))[-len(ours):]}
        maps, per_image = {}, {}
        for key, picked in chosen.items():
            path = out / f"bench_{key}_{k}.tflite"
            path.write_bytes(compiled.mixed([layers[i]["name"] for i in picked]))
            maps[key] = compiled.task_scores(path, samples)["mAP50-95"]
            per_image[key] = per_image_map(compiled, path, samples)
        tests = {b: sign_test(per_image["ours"], per_image[b]) for b in ("rmse", "last")}
        console.print(f"k={k}: ours {len(chosen['ours'])} layers {100 * maps['ours']:.1f}, RMSE/scale {100 * maps['rmse']:.1f}, "
                      f"last-k {100 * maps['last']:.1f}")
        table.add_row(str(k), str(len(chosen["ours"])), f"{100 * maps['ours']:.1f}", f"{100 * maps['rmse']:.1f}", f"{100 * maps['last']:.1f}",
                      *(f"{w}/{lo}, p={p:.2g}" for w, lo, p in tests.values()))
    return table

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
    parser.add_argument("--max-drop", type=float, default=1.5, help="tune's budget, mAP50-95 points")
    parser.add_argument("--tune-num", type=int, default=128, help="val images tune judges its candidates on")
    parser.add_argument("--ks", default="1,2,3,5,10", help="float-layer counts for the baseline table")
    args = parser.parse_args()
    console = Console()
    table = Table(title=f"COCO mAP50-95 / mAP50 on {args.eval_num} coco-val2017 images (calibration: {args.calib_num} coco-train2017; "
                        "pycocotools); latency: host, paired vs full int8, 2 threads")
    for col in ("detector", "ONNX Runtime", "TFLite float32", "full int8", f"tune --max-drop {args.max_drop}", "float layers",
                "budget met", "evaluations", "vs int8 latency", "host kernels (int8)", "wall s"):
        table.add_column(col, justify="right")
    fmt = lambda s: "-" if s is None else f"{100 * s['mAP50-95']:.1f} / {100 * s['mAP50']:.1f}"  # noqa: E731
    extra: list[Table] = []
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
            analyze(out, DETECTION / "coco-train2017-128", AnalysisOptions(num_samples=32))
            report = tune(out, DETECTION / "coco-val2017-128", TuneOptions(max_drop=args.max_drop, num_eval=args.tune_num, best_effort=True))
            scores["mixed"] = compiled.task_scores(out / MIXED_MODEL, samples)
            ratio = latency_ratio(out / MIXED_MODEL, compiled.int8_model, compiled.tflite_inputs(samples)[0])
            console.print(f"{name}: ORT {fmt(scores['ort'])}, float32 {fmt(scores['float32'])}, int8 {fmt(scores['int8'])}, "
                          f"mixed {fmt(scores['mixed'])} with {len(report.chosen['float_layers'])} float layers, {ratio:.2f}x int8 latency")
            table.add_row(name, fmt(scores["ort"]), fmt(scores["float32"]), fmt(scores["int8"]), fmt(scores["mixed"]),
                          str(len(report.chosen["float_layers"])), "yes" if report.budget["met"] else "no",
                          f"{report.search['evaluations']} (≤{report.search['bound']})", f"{ratio:.2f}x",
                          TfliteRunner(compiled.int8_model).kernels.split(" (")[0], f"{time.perf_counter() - start:.0f}")
            extra.append(baselines(compiled, out, samples, [int(k) for k in args.ks.split(",")], console))
    console.print(table)
    for t in extra:
        console.print(t)


if __name__ == "__main__":
    main()
