"""The shared real models the benchmarks run on (file, preprocessing, label offset), their compile,
and the data options the benchmarks share."""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
from quantune_edge.compile.artifacts import INT8_MODEL  # noqa: E402

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
    if not (out / INT8_MODEL).is_file():
        prep = make_preprocessing(mean="127,127,127", std="128,128,128")
        compile_model(REPO / "demo" / "models" / "efficientnet-lite0.onnx", REPO / "demo" / "images", out,
                      CompileOptions(preprocessing=prep, num_calib=32))
    return out


def add_data_args(parser: argparse.ArgumentParser, eval_num: int | None = None, eval_help: str | None = None) -> None:
    """--calib/--calib-num (the compile's calibration) and, with ``eval_num``, --eval/--eval-num."""
    parser.add_argument("--calib", default=str(ASSETS / "imagenet-samples"))
    parser.add_argument("--calib-num", type=int, default=100)
    if eval_num is not None or eval_help is not None:
        parser.add_argument("--eval", dest="eval_dir", default=str(ASSETS / "imagenet-val"))
        parser.add_argument("--eval-num", type=int, default=eval_num, help=eval_help)


def compile_shared(name: str, calib: str | Path, out: Path, num_calib: int = 100, per_channel: bool = True):
    """Compile one of :data:`MODELS` with its own preprocessing and label offset; returns the compile report."""
    from quantune_edge import CompileOptions, compile_model, make_preprocessing

    file, prep_kwargs, offset = MODELS[name]
    return compile_model(ASSETS / "models" / file, calib, out,
                         CompileOptions(preprocessing=make_preprocessing(**prep_kwargs), num_calib=num_calib,
                                        per_channel=per_channel, label_offset=offset))
