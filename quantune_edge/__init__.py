"""quantune-edge: QuantuneV2 mixed-precision post-training quantization, from ONNX to ARM devices.

Public API (importable without TensorFlow; heavy imports happen when a stage runs)::

    from quantune_edge import CompileOptions, compile_model, make_preprocessing
    report = compile_model("model.onnx", "images/", "out/", CompileOptions(preprocessing=make_preprocessing("torch")))
"""
from __future__ import annotations

__version__ = "0.1.0"

from quantune_edge.common.preprocessing import Preprocessing, Samples, load_samples, make_preprocessing  # noqa: E402
from quantune_edge.common.records import CompileReport  # noqa: E402
from quantune_edge.compile.compiler import CompileOptions, compile_model  # noqa: E402
from quantune_edge.errors import ConversionError, InputError, QuantuneError, VerificationError  # noqa: E402

__all__ = [
    "CompileOptions", "CompileReport", "ConversionError", "InputError", "Preprocessing", "QuantuneError",
    "Samples", "VerificationError", "compile_model", "load_samples", "make_preprocessing", "__version__",
]
