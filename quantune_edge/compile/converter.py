"""The TensorFlow side of compile, and the only module that imports TensorFlow, tf_keras or onnx2tf:
ONNX -> SavedModel (onnx2tf), SavedModel -> float32 TFLite, calibration, and quantization.

Calibration and quantization are TF's own two halves of a full-integer ``convert()``; the calibrated
model is kept beside the int8 model it was quantized into.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from quantune_edge.common.console import NativeLog
from quantune_edge.common.inputs import fields
from quantune_edge.common.preprocessing import Samples
from quantune_edge.errors import ConversionError
from quantune_edge.model import onnx_model

ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"


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


def write_onnx2tf_samples(folder: Path, samples: Samples) -> None:
    """onnx2tf feeds this file to its internal ONNX check for 3-channel inputs and downloads it when
    missing; writing it from the user's own data keeps conversion offline and in-distribution."""
    import tensorflow as tf

    values = fields(samples.data, [""])
    data = next((v for v in values.values() if v.ndim == 4 and v.shape[-1] == 3), None)
    if data is None:
        return
    reps = int(np.ceil(20 / len(data)))
    tiled = np.concatenate([data] * reps, axis=0)[:20]
    resized = tf.image.resize(tiled, (128, 128)).numpy().astype(np.float32)
    np.save(folder / ONNX2TF_SAMPLE_FILE, resized)


def convert_to_saved_model(prepared: onnx_model.PreparedModel, work: Path, saved_model: Path, log: NativeLog) -> None:
    import onnx
    import onnx2tf
    import tensorflow as tf
    import tf_keras

    onnx_path = work / "converter_input.onnx"
    onnx.save(prepared.model, onnx_path)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        keep_nhwc = [s.name for s in prepared.specs if s.layout == "NHWC"] or None
        keep_own = [s.name for s in prepared.specs if not s.is_image and len(s.shape) >= 3] or None  # onnx2tf would make them channels-last
        keras_model = onnx2tf.convert(
            input_onnx_file_path=str(onnx_path),
            output_folder_path=str(work / "onnx2tf_out"),
            not_use_onnxsim=True,
            non_verbose=True,
            disable_model_save=True,
            keep_nwc_or_nhwc_or_ndhwc_input_names=keep_nhwc,
            keep_ncw_or_nchw_or_ncdhw_input_names=keep_own,
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
        for i in range(len(calibration)):
            batch = calibration[i:i + 1]
            yield [batch] if batch.dtype.names is None else fields(batch, list(batch.dtype.names))  # by signature input name
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


def quantize(calibrated: bytes, per_channel: bool = True, int8_io: bool = False) -> bytes:
    """Quantize a calibrated model to full int8: the second half of ``TFLiteConverter.convert()`` for
    full-integer quantization. (Mixed models are spliced from this one and the float32 model.)"""
    import tensorflow as tf
    from tensorflow.lite.python import convert

    io_type = tf.int8 if int8_io else tf.float32
    try:
        return convert.mlir_quantize(calibrated, disable_per_channel=not per_channel, input_data_type=io_type,
                                     output_data_type=io_type)
    except Exception as exc:
        raise _converter_failure(exc, "int8 quantization") from None
