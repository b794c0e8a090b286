"""ONNX -> SavedModel (onnx2tf) -> float32 and full-int8 TFLite, with fused ops and a numerical check.

Stages: validate and clean the ONNX graph, convert it with onnx2tf to a SavedModel (kept: later
stages re-quantize from it), convert that with the TF converter to float32 and to full-integer int8
calibrated on the user's samples (the calibrated model is kept too, so mixed-precision variants need no
recalibration), then check the float32 TFLite against ONNX Runtime. Everything is
built in a staging folder next to the output and moved into place only when every stage passed.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import fusion, metrics, onnx_model, tflite_graph
from .console import NativeLog, Reporter, captured_native_output
from .errors import ConversionError, InputError, VerificationError
from .preprocessing import Preprocessing, Samples, load_samples
from .outputs import COMPILE_FOLDER, check_output_folder, staged_folder, temp_folder
from .reports import CompileReport, sha256_file, write_json
from .runtime import TfliteRunner

FLOAT_MODEL = "model_float32.tflite"
INT8_MODEL = "model_int8.tflite"
CALIBRATED_MODEL = "model_calibrated.tflite"
SAVED_MODEL = "saved_model"
PREPARED_ONNX = "model_prepared.onnx"
REPORT = COMPILE_FOLDER.marker  # compile.json
TRACE_SAMPLES = 2  # real samples the ONNX -> TFLite trace compares values on
ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"


@dataclass
class CompileOptions:
    """How to compile. Defaults: per-channel int8 weights, float model I/O, 100 calibration samples."""

    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    num_calib: int | None = 100
    seed: int = 0
    per_channel: bool = True
    int8_io: bool = False
    threads: int = 2
    label_offset: int = 0
    force: bool = False
    verbose: bool = False
    min_cosine: float = 0.999
    min_top1_agreement: float = 0.9


@contextlib.contextmanager
def _stage(name: str, timings: dict, quiet_native: bool) -> Iterator[NativeLog]:
    start = time.perf_counter()
    with captured_native_output(quiet_native) as log:
        yield log
    timings[name] = round(time.perf_counter() - start, 3)


def _onnx2tf_failure(log: str, prepared, exc: BaseException) -> ConversionError:
    """Name the ONNX node onnx2tf choked on (it prints ``onnx_op_name: ...`` before giving up)."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", log)
    match = re.findall(r"onnx_op_name:\s*(\S+)", clean)
    if match:
        name = match[-1]
        op_type = next((n.op_type for n in prepared.graph.node if n.name == name), "?")
        return ConversionError(f"onnx2tf failed to convert op {op_type!r} (node {name!r}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConversionError(f"onnx2tf failed: {detail}")


def _converter_failure(exc: Exception, what: str) -> ConversionError:
    text = str(exc)
    ops = sorted(set(re.findall(r"'(tf\.[A-Za-z0-9_]+)'", text) + re.findall(r"\b(tf\.[A-Z][A-Za-z0-9_]+)\b", text)))
    if ops:
        return ConversionError(f"TFLite {what} conversion failed: ops without a TFLite builtin kernel: {', '.join(ops)}")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return ConversionError(f"TFLite {what} conversion failed: {first[:300]}")


def _write_onnx2tf_samples(folder: Path, samples: Samples) -> None:
    """onnx2tf feeds this file to its internal ONNX check for 3-channel inputs and downloads it when
    missing; writing it from the user's own data keeps conversion offline and in-distribution."""
    import tensorflow as tf

    data = samples.data
    if data.shape[-1] != 3:
        return
    reps = int(np.ceil(20 / len(data)))
    tiled = np.concatenate([data] * reps, axis=0)[:20]
    resized = tf.image.resize(tiled, (128, 128)).numpy().astype(np.float32)
    np.save(folder / ONNX2TF_SAMPLE_FILE, resized)


def _convert_to_saved_model(prepared: onnx_model.PreparedModel, work: Path, saved_model: Path, log: NativeLog) -> None:
    import onnx
    import onnx2tf
    import tensorflow as tf
    import tf_keras

    onnx_path = work / "converter_input.onnx"
    onnx.save(prepared.model, onnx_path)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        keep_nhwc = [prepared.spec.name] if prepared.spec.layout == "NHWC" else None
        keras_model = onnx2tf.convert(
            input_onnx_file_path=str(onnx_path),
            output_folder_path=str(work / "onnx2tf_out"),
            not_use_onnxsim=True,
            non_verbose=True,
            disable_model_save=True,
            keep_nwc_or_nhwc_or_ndhwc_input_names=keep_nhwc,
        )
        if keras_model is None:
            raise ConversionError("onnx2tf returned no model")
        archive = tf_keras.export.ExportArchive()
        archive.track(keras_model)
        archive.add_endpoint(
            name="serving_default",
            fn=lambda *inputs: keras_model(inputs),
            input_signature=[tf.TensorSpec(t.shape, t.dtype, t.name) for t in keras_model.inputs],
        )
        archive.write_out(str(saved_model))
    except ConversionError:
        raise
    except BaseException as exc:  # onnx2tf calls sys.exit(1) on many failures
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _onnx2tf_failure(log.text(), prepared.model, exc) from None
    finally:
        os.chdir(cwd)


def convert_float(saved_model: Path, out: Path) -> None:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        out.write_bytes(converter.convert())
    except Exception as exc:
        raise _converter_failure(exc, "float32") from None


def calibrate(saved_model: Path, calibration: np.ndarray, on_sample=None) -> bytes:
    """Run the representative dataset through the model once and return the *calibrated* float
    model (activation ranges recorded, nothing quantized yet).

    Keeping it lets every later int8 or mixed model be produced by :func:`quantize` alone, with
    the same activation ranges, instead of recalibrating for each choice of float layers.
    """
    import tensorflow as tf

    def representative():
        for x in calibration:
            yield [x[None].astype(np.float32)]
            if on_sample:
                on_sample()

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter._experimental_calibrate_only = True  # TF's own split of convert(): calibrate, then quantize
    try:
        return converter.convert()
    except Exception as exc:
        raise _converter_failure(exc, "int8 calibration") from None


def quantize(calibrated: bytes, per_channel: bool = True, int8_io: bool = False, float_nodes: list[str] | None = None) -> bytes:
    """Quantize a calibrated model to int8, keeping the ops named in ``float_nodes`` (their output
    tensor names) in float with QUANTIZE/DEQUANTIZE around them (TF selective quantization).

    This is the second half of ``TFLiteConverter.convert()`` for full-integer quantization.
    """
    import tensorflow as tf
    from tensorflow.lite.python import convert

    io_type = tf.int8 if int8_io else tf.float32
    try:
        return convert.mlir_quantize(
            calibrated,
            disable_per_channel=not per_channel,
            input_data_type=io_type,
            output_data_type=io_type,
            denylisted_nodes=list(float_nodes) if float_nodes else None,
        )
    except Exception as exc:
        raise _converter_failure(exc, "int8 quantization") from None


def _onnxruntime_outputs(model_path: Path, spec: onnx_model.InputSpec, data: np.ndarray, on_item=None) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    outputs = []
    for x in data:
        outputs.append(session.run(None, {spec.name: x[None]})[0])
        if on_item:
            on_item()
    return np.concatenate(outputs, axis=0)


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
    quiet_native = not options.verbose

    start = time.perf_counter()
    original = onnx_model.load(model_path)
    with captured_native_output(quiet_native):
        prepared = onnx_model.prepare(original, options.preprocessing.input_size)
    onnx_model.check_supported(prepared.model)
    spec = prepared.spec
    prep = options.preprocessing.with_input_size(spec.hwc[0])
    timings["prepare_onnx"] = round(time.perf_counter() - start, 3)
    for note in prepared.notes:
        reporter.info(f"[dim]note:[/dim] {note}")

    with reporter.progress() as progress:
        task = progress.add_task("reading calibration samples", total=options.num_calib)
        start = time.perf_counter()
        samples = load_samples(calib, prep, spec.hwc, spec.layout, options.num_calib, options.seed, on_item=lambda: progress.advance(task))
        progress.update(task, total=len(samples) + len(samples.skipped), completed=len(samples) + len(samples.skipped))
        timings["load_samples"] = round(time.perf_counter() - start, 3)

        with staged_folder(out_dir) as stage, temp_folder("onnx2tf") as work:
            import onnx

            onnx.save(prepared.model, stage / PREPARED_ONNX)
            task = progress.add_task("converting ONNX -> SavedModel (onnx2tf)", total=1)
            with _stage("onnx2tf_saved_model", timings, quiet_native) as log:
                _write_onnx2tf_samples(work, samples)
                _convert_to_saved_model(prepared, work, stage / SAVED_MODEL, log)
            progress.advance(task)

            task = progress.add_task("converting float32 TFLite", total=1)
            with _stage("tflite_float32", timings, quiet_native):
                convert_float(stage / SAVED_MODEL, stage / FLOAT_MODEL)
            progress.advance(task)

            with captured_native_output(quiet_native):
                float_runner = TfliteRunner(stage / FLOAT_MODEL, options.threads)
            if float_runner.input_shape[1:] != spec.hwc:
                raise ConversionError(f"converted model takes input {float_runner.input_shape}, expected channels-last {(1, *spec.hwc)}")
            calib_data = samples.data

            task = progress.add_task("calibrating + converting int8 TFLite", total=len(samples))
            with _stage("tflite_int8_calibrated", timings, quiet_native):
                calibrated = calibrate(stage / SAVED_MODEL, calib_data, on_sample=lambda: progress.advance(task))
                (stage / CALIBRATED_MODEL).write_bytes(calibrated)
                (stage / INT8_MODEL).write_bytes(quantize(calibrated, options.per_channel, options.int8_io))

            task = progress.add_task("verifying against ONNX Runtime", total=3 * len(samples))
            with _stage("verify", timings, quiet_native):
                advance = lambda: progress.advance(task)  # noqa: E731
                ort_out = _onnxruntime_outputs(model_path, spec, samples.for_layout(spec.layout), advance)
                float_out = float_runner.run(calib_data, advance)
                int8_out = TfliteRunner(stage / INT8_MODEL, options.threads).run(calib_data, advance)

            task = progress.add_task("tracing TFLite ops to ONNX nodes", total=1)
            with _stage("trace", timings, quiet_native):
                trace = trace_or_error(original, samples.for_layout(spec.layout)[:TRACE_SAMPLES], stage / FLOAT_MODEL,
                                       stage / INT8_MODEL, calib_data[:TRACE_SAMPLES])
            progress.advance(task)
            if trace.get("error"):
                reporter.warn(f"could not trace TFLite ops to ONNX nodes: {trace['error']}")
            elif untraced := trace["untraced"]["float32"]:
                reporter.warn(f"{len(untraced)} float32 TFLite op(s) have no ONNX tensor of their own "
                              f"({', '.join(sorted({u['op_type'] for u in untraced}))}); 'quantune-edge layers {out_dir}' lists them")

            report = _build_report(model_path, original, prepared, prep, samples, options, stage, ort_out, float_out, int8_out, timings)
            report.trace = trace
            write_json(stage / REPORT, report.to_dict())
            _raise_if_wrong(report, options)
    return report


def trace_or_error(model, onnx_feed: np.ndarray, float_path: Path, int8_path: Path, tflite_feed: np.ndarray) -> dict:
    """The ``trace`` section; a model ONNX Runtime cannot expose every tensor of gets the reason
    instead (the compile itself stays valid)."""
    from .tracing import trace_models

    try:
        return trace_models(model, onnx_feed, float_path, int8_path, tflite_feed)
    except Exception as exc:  # noqa: BLE001 - any failure here only costs the ONNX names
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"error": first[:300], "float32": [], "int8": [], "untraced": {"float32": [], "int8": []}}


def _raise_if_wrong(report: CompileReport, options: CompileOptions) -> None:
    check = report.verification["float32_vs_onnxruntime"]
    if not report.verification["passed"]:
        raise VerificationError(
            f"float32 TFLite does not match ONNX Runtime (min cosine {check['cosine_min']:.4f} < {options.min_cosine}, "
            f"top-1 agreement {check['top1_agreement']:.2%}, max abs diff {check['max_abs_diff']:.3g}); nothing was written"
        )


def _build_report(model_path, original, prepared, prep, samples, options, stage, ort_out, float_out, int8_out, timings) -> CompileReport:
    f_graph = tflite_graph.read(stage / FLOAT_MODEL)
    q_graph = tflite_graph.read(stage / INT8_MODEL)
    patterns = fusion.onnx_patterns(original)
    float_check = metrics.compare_outputs(ort_out, float_out)
    int8_check = metrics.compare_outputs(ort_out, int8_out)
    passed = bool(
        np.isfinite(float_check["cosine_min"])
        and float_check["cosine_min"] >= options.min_cosine
        and float_check["top1_agreement"] >= options.min_top1_agreement
    )
    accuracy: dict = {"samples": len(samples), "labelled": int(np.sum(samples.labels >= 0)), "label_offset": options.label_offset}
    if samples.has_labels:
        accuracy["note"] = "measured on the calibration samples; use a disjoint set to evaluate"
        for key, out in (("onnxruntime_float32", ort_out), ("tflite_float32", float_out), ("tflite_int8", int8_out)):
            accuracy[key] = metrics.top1_accuracy(metrics.align_layout(ort_out, out), samples.labels, options.label_offset)
    return CompileReport(
        model={
            "path": str(Path(model_path).resolve()),
            "sha256": sha256_file(model_path),
            "input": prepared.spec.to_dict(),
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
            "thresholds": {"min_cosine": options.min_cosine, "min_top1_agreement": options.min_top1_agreement},
            "passed": passed,
        },
        accuracy=accuracy,
        files={"float32": FLOAT_MODEL, "int8": INT8_MODEL, "calibrated": CALIBRATED_MODEL, "saved_model": SAVED_MODEL, "prepared_onnx": PREPARED_ONNX},
        notes=list(prepared.notes),
    )
