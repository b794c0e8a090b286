"""The shared real models the benchmarks run on: file, preprocessing, label offset."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ASSETS = REPO.parent / "shared" / "assets"
MODELS = {
    "efficientnet-lite0": ("efficientnet-lite0.onnx", dict(mean="127,127,127", std="128,128,128"), 0),
    "squeezenet1.1": ("squeezenet1.1.onnx", dict(preset="caffe"), 0),
    "mobilenetv2": ("mobilenetv2-tf2-ptq-dequant.onnx", dict(preset="tf"), 1),
}


def demo_models(out: Path | None = None) -> Path:
    """The shipped EfficientNet-Lite0 compiled (float32 + int8) on the demo images; reuses runs/demo."""
    from quantune_edge import CompileOptions, compile_model, make_preprocessing

    out = out or REPO / "runs" / "demo"
    if not (out / "model_int8.tflite").is_file():
        prep = make_preprocessing(mean="127,127,127", std="128,128,128")
        compile_model(REPO / "demo" / "models" / "efficientnet-lite0.onnx", REPO / "demo" / "images", out,
                      CompileOptions(preprocessing=prep, num_calib=32))
    return out
