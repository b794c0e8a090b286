"""ONNX -> SavedModel (onnx2tf) -> float32 and full-int8 TFLite, with fused ops and a numerical check.

Stages: validate and clean the ONNX graph, convert it with onnx2tf to a SavedModel (kept: later
stages re-quantize from it), convert that with the TF converter to float32 and to full-integer int8
calibrated on the user's samples (the calibrated model is kept too, so mixed-precision variants need no
recalibration), then check the float32 TFLite against ONNX Runtime. Everything is
built in a staging folder next to the output and moved into place only when every stage passed.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantune_edge.common import metrics
from quantune_edge.common.console import NativeLog, Reporter, captured_native_output
from quantune_edge.common.inputs import InputSpec, onnx_feed
from quantune_edge.common.metrics import compare_outputs, to_shape
from quantune_edge.common.outputs import check_output_folder, staged_folder, temp_folder
from quantune_edge.common.preprocessing import Preprocessing, Samples, load_samples
from quantune_edge.common.records import CompileReport, sha256_file, write_json
from quantune_edge.compile import converter, fusion, tracing
from quantune_edge.compile.artifacts import CALIBRATED_MODEL, COMPILE_FOLDER, FLOAT_MODEL, INT8_MODEL, PREPARED_ONNX, REPORT, SAVED_MODEL
from quantune_edge.errors import ConversionError, InputError, VerificationError
from quantune_edge.model import onnx_model, tflite_graph
from quantune_edge.model.runtime import TfliteRunner, per_sample, stack_samples
from quantune_edge.tasks import make_task
from quantune_edge.tasks.base import Task, compare, reference_labels


@dataclass
class CompileOptions:
    """How to compile. Defaults: per-channel int8 weights, float model I/O, 100 calibration samples."""

    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    num_calib: int | None = 100
    seed: int = 0
    per_channel: bool = True
    int8_io: bool = False
    threads: int = 2
    label_offset: int = 0  # the classify task's: output index = class index + offset
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # --input-shape: dynamic dimensions by input name
    force: bool = False
    verbose: bool = False
    min_cosine: float = 0.999
    min_agreement: float = 0.9  # share of samples the float32 TFLite must decide as ONNX Runtime does, by the task's rule

    judge: Task | None = None  # what judges the model (stored in compile.json); None: an image classifier

    @property
    def task(self) -> Task:
        return self.judge or make_task("classify", label_offset=self.label_offset)


@contextlib.contextmanager
def _stage(name: str, timings: dict, quiet_native: bool) -> Iterator[NativeLog]:
    start = time.perf_counter()
    with captured_native_output(quiet_native) as log:
        yield log
    timings[name] = round(time.perf_counter() - start, 3)


def onnxruntime_outputs(model_path: Path, specs: list[InputSpec], data: np.ndarray, on_item=None) -> np.ndarray:
    """The model's first output on every sample (as :func:`onnxruntime_all_outputs`)."""
    return onnxruntime_all_outputs(model_path, specs, data, on_item)[1][0]


def onnxruntime_all_outputs(model_path: Path, specs: list[InputSpec], data: np.ndarray,
                            on_item=None) -> tuple[list[str], list[np.ndarray], list[tuple[int, ...]]]:
    """Every output's name, values and one sample's shape, in the model's order, on samples held
    as the TFLite model takes them (``data``, see :mod:`~quantune_edge.common.inputs`), the values
    stacked over the samples as ``TfliteRunner.run_all`` stacks them (``runtime.sample_of`` undoes it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    per_sample = []
    for i in range(len(data)):
        per_sample.append(session.run(None, onnx_feed(specs, data[i:i + 1])))
        if on_item:
            on_item()
    shapes = [tuple(int(d) for d in out.shape) for out in per_sample[0]]
    return names, [stack_samples([outs[k] for outs in per_sample]) for k in range(len(names))], shapes


def compile_model(
    model_path: str | Path,
    calib: str | Path,
    out_dir: str | Path,
    options: CompileOptions | None = None,
    reporter: Reporter | None = None,
) -> CompileReport:
    """Compile an ONNX image model to float32 and int8 TFLite in ``out_dir``; returns the report."""
    options = options or CompileOptions()
    reporter = reporter or Reporter(quiet=True)
    model_path, out_dir = Path(model_path), Path(out_dir)
    check_output_folder(out_dir, COMPILE_FOLDER, "--out", {"the ONNX model": model_path, "the --calib data": calib}, replace=options.force)
    if options.num_calib is not None and options.num_calib <= 0:
        raise InputError(f"--num-calib must be positive, got {options.num_calib}")
    timings: dict[str, float] = {}
    original, prepared, prep = _prepare_onnx(model_path, options, reporter, timings)
    specs = prepared.specs

    with reporter.progress() as progress:
        task = progress.add_task("reading calibration samples", total=options.num_calib)
        start = time.perf_counter()
        samples = load_samples(calib, prep, specs, options.num_calib, options.seed, on_item=lambda: progress.advance(task),
                               labels=options.task.read_labels)
        progress.update(task, total=len(samples) + len(samples.skipped), completed=len(samples) + len(samples.skipped))
        timings["load_samples"] = round(time.perf_counter() - start, 3)

        with staged_folder(out_dir) as stage, temp_folder("onnx2tf") as work:
            float_runner = _convert(prepared, samples, stage, work, options, progress, timings)
            verified = _verify(model_path, specs, samples, stage, float_runner, options, progress, timings)
            trace = _trace(original, specs, samples, stage, out_dir, options, progress, reporter, timings)
            report = _build_report(model_path, original, prepared, prep, samples, options, stage, verified, timings)
            report.trace = trace
            _record_outputs_and_kernels(report, verified, options, reporter)
            write_json(stage / REPORT, report.to_dict())
            _raise_if_wrong(report, options)
    return report


def _prepare_onnx(model_path: Path, options: CompileOptions, reporter: Reporter, timings: dict):
    """The ONNX model as given, and cleaned up for conversion (simplified, Pads folded, batch fixed)."""
    start = time.perf_counter()
    original = onnx_model.load(model_path)
    with captured_native_output(not options.verbose):
        prepared = onnx_model.prepare(original, options.preprocessing.input_hw, options.input_shapes)
    onnx_model.check_supported(prepared.model)
    images = [s for s in prepared.specs if s.is_image]
    if unknown := sorted(set(dict(options.preprocessing.inputs)) - {s.name for s in images}):
        raise InputError(f"--input-prep names {unknown[0]!r}, which is not an image input of the model "
                         f"(image inputs: {', '.join(s.name for s in images) or 'none'})")
    prep = options.preprocessing.sized_for(prepared.specs)
    timings["prepare_onnx"] = round(time.perf_counter() - start, 3)
    for note in prepared.notes:
        reporter.info(f"[dim]note:[/dim] {note}")
    return original, prepared, prep


def _convert(prepared, samples: Samples, stage: Path, work: Path, options: CompileOptions, progress, timings: dict) -> TfliteRunner:
    """ONNX -> SavedModel -> float32 TFLite, then calibration and full-int8 quantization, into ``stage``;
    returns the float32 model's runner (its input shape checked), which verification reuses."""
    import onnx

    quiet_native = not options.verbose
    onnx.save(prepared.model, stage / PREPARED_ONNX)
    task = progress.add_task("converting ONNX -> SavedModel (onnx2tf)", total=1)
    with _stage("onnx2tf_saved_model", timings, quiet_native) as log:
        converter.write_onnx2tf_samples(work, samples)
        converter.convert_to_saved_model(prepared, work, stage / SAVED_MODEL, log)
    progress.advance(task)

    task = progress.add_task("converting float32 TFLite", total=1)
    with _stage("tflite_float32", timings, quiet_native):
        converter.convert_float(stage / SAVED_MODEL, stage / FLOAT_MODEL)
    progress.advance(task)
    with captured_native_output(quiet_native):
        float_runner = TfliteRunner(stage / FLOAT_MODEL, options.threads)
    for spec in prepared.specs:
        detail = float_runner.inputs.get(spec.name)
        taken = None if detail is None else tuple(int(d) for d in detail["shape"])
        if taken != (1, *spec.sample_shape):
            raise ConversionError(f"converted model takes input {spec.name!r} as {taken}, expected {(1, *spec.sample_shape)}")

    task = progress.add_task("calibrating + converting int8 TFLite", total=len(samples))
    with _stage("tflite_int8_calibrated", timings, quiet_native):
        calibrated = converter.calibrate(stage / SAVED_MODEL, samples.data, on_sample=lambda: progress.advance(task))
        (stage / CALIBRATED_MODEL).write_bytes(calibrated)
        (stage / INT8_MODEL).write_bytes(converter.quantize(calibrated, options.per_channel, options.int8_io))
    return float_runner


def _verify(model_path: Path, specs: list[InputSpec], samples: Samples, stage: Path, float_runner: TfliteRunner, options: CompileOptions, progress,
            timings: dict):
    """ONNX Runtime's, the float32 TFLite's and the int8 TFLite's outputs on the calibration samples."""
    task = progress.add_task("verifying against ONNX Runtime", total=3 * len(samples))
    with _stage("verify", timings, not options.verbose):
        advance = lambda: progress.advance(task)  # noqa: E731
        names, ort_outs, shapes = onnxruntime_all_outputs(model_path, specs, samples.data, advance)
        float_outs = float_runner.run_all(samples.data, advance)
        int8_runner = TfliteRunner(stage / INT8_MODEL, options.threads)
        int8_outs = int8_runner.run_all(samples.data, advance)
    if not len(names) == len(float_outs) == len(int8_outs):
        raise VerificationError(f"the ONNX model has {len(names)} outputs, the float32 TFLite {len(float_outs)} and the int8 "
                                f"TFLite {len(int8_outs)}; nothing was written")
    return Verified(names, shapes, {"onnxruntime_float32": ort_outs, "tflite_float32": float_outs, "tflite_int8": int8_outs},
                    {"float32": float_runner.kernels, "int8": int8_runner.kernels})


@dataclass
class Verified:
    """Every output of the three models on the calibration samples, stacked per output
    (``runtime.stack_samples``), and what ran the two TFLite models on the host."""

    names: list[str]
    shapes: list[tuple[int, ...]]  # one sample's shape per output, as ONNX Runtime gives it
    outputs: dict[str, list[np.ndarray]]  # "onnxruntime_float32" | "tflite_float32" | "tflite_int8" -> per output
    kernels: dict[str, str]

    def first(self, model: str) -> np.ndarray:
        return self.outputs[model][0]

    def per_output(self) -> dict[str, dict]:
        """compile.json's ``verification.outputs``: each TFLite output against ONNX Runtime's."""
        ort, f32, q8 = (self.outputs[k] for k in ("onnxruntime_float32", "tflite_float32", "tflite_int8"))
        return {name: {"shape": list(shape), "float32": compare_outputs(r, f), "int8": compare_outputs(r, q)}
                for name, shape, r, f, q in zip(self.names, self.shapes, ort, f32, q8)}

    def per_sample(self, model: str) -> list[dict[str, np.ndarray]]:
        """One dict of outputs per sample, named, ordered, shaped and laid out as ONNX Runtime returns them."""
        values = [to_shape(v, r.shape) for v, r in zip(self.outputs[model], self.outputs["onnxruntime_float32"])]
        return per_sample(self.names, values, self.shapes)


def _trace(original, specs: list[InputSpec], samples: Samples, stage: Path, out_dir: Path, options: CompileOptions, progress, reporter: Reporter,
           timings: dict) -> dict:
    """compile.json's ``trace``: each TFLite op's ONNX nodes; what could not be traced is said, not fatal."""
    task = progress.add_task("tracing TFLite ops to ONNX nodes", total=1)
    with _stage("trace", timings, not options.verbose):
        trace = tracing.trace_or_error(original, specs, stage / FLOAT_MODEL, stage / INT8_MODEL, samples.data[:tracing.TRACE_SAMPLES])
    progress.advance(task)
    if trace.get("error"):
        reporter.warn(f"could not trace TFLite ops to ONNX nodes: {trace['error']}")
    elif untraced := trace["untraced"]["float32"]:
        reporter.warn(f"{len(untraced)} float32 TFLite op(s) have no ONNX tensor of their own "
                      f"({', '.join(sorted({u['op_type'] for u in untraced}))}); 'quantune-edge layers {out_dir}' lists them")
    return trace


def _record_outputs_and_kernels(report: CompileReport, verified: Verified, options: CompileOptions, reporter: Reporter) -> None:
    """Every output is verified on its own (a detector's box output may be wrong while its scores are
    right); and what ran each model on the host is said, when it was not XNNPACK."""
    verification = report.verification
    per_output, kernels = verified.per_output(), verified.kernels
    verification["outputs"], verification["host_kernels"] = per_output, kernels
    worst = min(per_output, key=lambda n: per_output[n]["float32"]["cosine_min"])
    if not per_output[worst]["float32"]["cosine_min"] >= options.min_cosine:
        verification["passed"], verification["failed_output"] = False, worst
    for precision, used in kernels.items():
        if used != "xnnpack":
            reporter.warn(f"the {precision} model runs on the host's {used}; it was verified that way")


def _raise_if_wrong(report: CompileReport, options: CompileOptions) -> None:
    check = report.verification["float32_vs_onnxruntime"]
    key = options.task.agreement_key or "agreement"
    if failed := report.verification.get("failed_output"):
        bad = report.verification["outputs"][failed]["float32"]
        raise VerificationError(f"float32 TFLite does not match ONNX Runtime on output {failed!r} (min cosine "
                                f"{bad['cosine_min']:.4f} < {options.min_cosine}, max abs diff {bad['max_abs_diff']:.3g}); nothing was written")
    if not report.verification["passed"]:
        raise VerificationError(
            f"float32 TFLite does not match ONNX Runtime (min cosine {check['cosine_min']:.4f} < {options.min_cosine}, "
            f"{key.replace('_', ' ').replace('top1', 'top-1')} {check.get(key, math.nan):.2%}, max abs diff {check['max_abs_diff']:.3g}); nothing was written"
        )


def _build_report(model_path, original, prepared, prep, samples, options, stage, verified: Verified, timings) -> CompileReport:
    f_graph = tflite_graph.read(stage / FLOAT_MODEL)
    q_graph = tflite_graph.read(stage / INT8_MODEL)
    patterns = fusion.onnx_patterns(original)
    task = options.task
    ort_out = verified.first("onnxruntime_float32")
    float_check = compare(task, ort_out, verified.first("tflite_float32"))
    int8_check = compare(task, ort_out, verified.first("tflite_int8"))
    passed = bool(
        np.isfinite(float_check["cosine_min"])
        and float_check["cosine_min"] >= options.min_cosine
        and (task.agreement_key is None or float_check[task.agreement_key] >= options.min_agreement)
    )
    accuracy: dict = {"samples": len(samples), "labelled": samples.labelled, "label_offset": options.label_offset,
                      "metric": task.metric_name}
    judged = lambda key: verified.per_sample(key) if task.reads_all_outputs else metrics.align_layout(ort_out, verified.first(key))  # noqa: E731
    labels, against = reference_labels(task, samples, lambda: judged("onnxruntime_float32"))
    if labels is not None:
        accuracy["note"] = "measured on the calibration samples; use a disjoint set to evaluate"
        accuracy["scores"] = {}
        accuracy["judged_against"] = against  # not "labels": ONNX Runtime's float32 outputs are the reference
        for key in verified.outputs:
            scores = accuracy["scores"][key] = task.scores(judged(key), labels)
            accuracy[key] = None if scores is None else scores[task.metric_name]
    return CompileReport(
        model={
            "path": str(Path(model_path).resolve()),
            "sha256": sha256_file(model_path),
            "input": prepared.specs[0].to_dict(),
            "inputs": [spec.to_dict() for spec in prepared.specs],
            "simplified": prepared.simplified,
            "pads_folded_by_quantune": prepared.pads_folded,
        },
        preprocessing=prep.to_dict(),
        calibration={
            "source": str(Path(samples.source).resolve()),
            "num_samples": len(samples),
            "seed": options.seed,
            "files": samples.names,
            "skipped": samples.skipped,
        },
        quantization={
            "weights": "int8 per-channel" if options.per_channel else "int8 per-tensor",
            "activations": "int8",
            "model_io": "int8" if options.int8_io else "float32",
        },
        onnx_ops={"original": onnx_model.op_histogram(original), "prepared": onnx_model.op_histogram(prepared.model),
                  "original_count": len(original.graph.node), "prepared_count": len(prepared.model.graph.node)},
        tflite_ops={"float32": f_graph.histogram(), "int8": q_graph.histogram(),
                    "float32_count": len(f_graph.ops), "int8_count": len(q_graph.ops)},
        fusions={"onnx_patterns": patterns, "float32": fusion.summarize(patterns, f_graph), "int8": fusion.summarize(patterns, q_graph)},
        quantize_ops={"int8_quantize": q_graph.count("QUANTIZE"), "int8_dequantize": q_graph.count("DEQUANTIZE")},
        sizes_bytes={"onnx": Path(model_path).stat().st_size, "float32": f_graph.size_bytes, "int8": q_graph.size_bytes},
        timings_s=dict(timings),
        verification={
            "float32_vs_onnxruntime": float_check,
            "int8_vs_onnxruntime": int8_check,
            "thresholds": {"min_cosine": options.min_cosine, "min_agreement": options.min_agreement},
            "passed": passed,
        },
        accuracy=accuracy,
        files={"float32": FLOAT_MODEL, "int8": INT8_MODEL, "calibrated": CALIBRATED_MODEL, "saved_model": SAVED_MODEL, "prepared_onnx": PREPARED_ONNX},
        notes=list(prepared.notes),
        task=task.to_dict(),
    )
