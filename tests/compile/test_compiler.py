"""Real conversions: the shipped EfficientNet-Lite0 and SqueezeNet 1.1 on real images, and small
graphs built in code for the odd cases (NHWC input, dynamic batch, residual Add+ReLU, Pad+Conv)."""
import json

import numpy as np
import pytest
from conftest import nhwc_net, pad_conv_net, residual_net, shared

from quantune_edge import CompileOptions, VerificationError, compile_model, make_preprocessing
from quantune_edge.common import metrics
from quantune_edge.compile import compiler
from quantune_edge.model import tflite_graph
from quantune_edge.model.runtime import TfliteRunner

CONV_LIKE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


def _assert_fused(out, expect_explicit_pads=0):
    """No standalone BN/affine, activation or SAME-expressible PAD next to a conv, in both models;
    the int8 graph (float I/O) has exactly one QUANTIZE at the input and one DEQUANTIZE at the output."""
    report = json.loads((out / "compile.json").read_text())
    for kind in ("float32", "int8"):
        assert report["fusions"][kind]["unfused"] == [], report["fusions"][kind]["unfused"]
        assert len(report["fusions"][kind]["explicit_pads"]) == expect_explicit_pads
        g = tflite_graph.read(out / f"model_{kind}.tflite")
        hist = g.histogram()
        for op in ("RELU", "RELU6", "MUL", "SUB"):
            assert op not in hist, f"standalone {op} in {kind}"
    q = tflite_graph.read(out / "model_int8.tflite")
    quant = [op for op in q.ops if op.type == "QUANTIZE"]
    dequant = [op for op in q.ops if op.type == "DEQUANTIZE"]
    assert len(quant) == 1 and len(dequant) == 1
    assert quant[0].inputs == q.inputs and dequant[0].outputs == q.outputs
    assert report["quantize_ops"] == {"int8_quantize": 1, "int8_dequantize": 1}
    return report, q


def _assert_int8_weights(graph, per_channel=True):
    convs = [op for op in graph.ops if op.type in CONV_LIKE]
    assert convs
    for op in convs:
        w = graph.tensors[op.inputs[1]]
        assert w.dtype == "int8" and w.is_constant
        channels = w.shape[w.quantized_dimension]
        assert len(w.scales) == (channels if per_channel else 1), (op.type, w.shape, len(w.scales))
        assert graph.tensors[op.outputs[0]].dtype == "int8"


def test_efficientnet_compiles_fused_and_verified(effnet_compiled):
    out = effnet_compiled
    for name in ("model_float32.tflite", "model_int8.tflite", "model_calibrated.tflite", "compile.json", "model_prepared.onnx", "saved_model/saved_model.pb"):
        assert (out / name).exists(), name
    report, q = _assert_fused(out)
    assert report["schema_version"] == 1 and report["kind"] == "quantune-edge/compile"
    check = report["verification"]["float32_vs_onnxruntime"]
    assert report["verification"]["passed"] and check["cosine_min"] > 0.9999 and check["top1_agreement"] == 1.0
    assert check["max_abs_diff"] < 1e-3
    patterns = {p["pattern"]: p for p in report["fusions"]["int8"]["patterns"]}
    assert patterns["Pad+Conv"]["in_onnx"] == 17 and patterns["Pad+Conv"]["fused"] == 17
    assert patterns["Conv+Relu/Clip"]["in_onnx"] == 33 and patterns["Conv+Relu/Clip"]["fused"] == 33
    assert report["fusions"]["int8"]["conv_like_with_fused_activation"] == 33
    assert report["tflite_ops"]["float32"] == {"ADD": 9, "CONV_2D": 33, "DEPTHWISE_CONV_2D": 16, "FULLY_CONNECTED": 1, "MEAN": 1}
    assert report["onnx_ops"]["original"]["Pad"] == 17
    _assert_int8_weights(q, per_channel=True)
    assert report["sizes_bytes"]["int8"] < 0.35 * report["sizes_bytes"]["float32"]
    assert report["preprocessing"]["mean"] == [127.0] * 3 and report["preprocessing"]["input_size"] == 224
    assert report["calibration"]["num_samples"] == 16 and len(report["calibration"]["files"]) == 16
    assert set(report["timings_s"]) >= {"prepare_onnx", "onnx2tf_saved_model", "tflite_float32", "tflite_int8_calibrated", "verify"}


def test_efficientnet_accuracy_on_held_out_real_images(effnet_compiled):
    """Float TFLite agrees with ONNX Runtime on labelled images not used for calibration."""
    from quantune_edge.common.preprocessing import load_samples
    from quantune_edge.compile.compiler import onnxruntime_outputs
    from quantune_edge.model.onnx_model import input_specs, load
    from quantune_edge.tasks.base import compare
    from quantune_edge.tasks.classification import Classification

    report = json.loads((effnet_compiled / "compile.json").read_text())
    prep = make_preprocessing(mean="127,127,127", std="128,128,128").with_input_size(224)
    specs, _ = input_specs(load(report["model"]["path"]))
    samples = load_samples(shared("imagenet-val"), prep, specs, num=48, seed=1, labels=Classification().read_labels)
    assert not set(samples.names) & set(report["calibration"]["files"])
    ort_out = onnxruntime_outputs(report["model"]["path"], specs, samples.data)
    f32 = TfliteRunner(effnet_compiled / "model_float32.tflite").run(samples.data)
    i8 = TfliteRunner(effnet_compiled / "model_int8.tflite").run(samples.data)
    acc = {k: metrics.top1_accuracy(v, samples.labels) for k, v in (("ort", ort_out), ("f32", f32), ("i8", i8))}
    assert acc["ort"] > 0.7
    assert acc["f32"] == acc["ort"]
    assert acc["i8"] >= acc["f32"] - 0.1
    assert compare(Classification(), ort_out, i8)["top1_agreement"] >= 0.85


@pytest.mark.parametrize("builder, notes, explicit_pads", [
    (residual_net, ["dynamic batch"], 1),  # PyTorch-style symmetric pad at stride 2 has no SAME equivalent
    (nhwc_net, [], 1),
    (pad_conv_net, [], 0),
])
def test_small_graphs(builder, notes, explicit_pads, tiny_images, save_model, tmp_path):
    path = save_model(builder(), builder.__name__)
    report = compile_model(path, tiny_images, tmp_path / "out", CompileOptions(num_calib=8))
    assert report.verification["passed"] and report.verification["float32_vs_onnxruntime"]["max_abs_diff"] < 1e-4
    for note in notes:
        assert any(note in n for n in report.notes)
    data, q = _assert_fused(tmp_path / "out", explicit_pads)
    _assert_int8_weights(q)
    assert TfliteRunner(tmp_path / "out" / "model_float32.tflite").input_shape == (1, 32, 32, 3)
    if builder is residual_net:
        by = {p["pattern"]: p for p in data["fusions"]["int8"]["patterns"]}
        assert by["Conv+BatchNormalization"]["fused"] == 3 and by["Add+Relu/Clip"]["fused"] == 1
        assert data["fusions"]["int8"]["add_with_fused_activation"] == 1
    if builder is pad_conv_net:
        assert {p["pattern"]: p["fused"] for p in data["fusions"]["int8"]["patterns"]}["Pad+Conv"] == 2
        assert "PAD" not in data["tflite_ops"]["int8"]


def test_per_tensor_int8_io_and_npy_calibration(tiny_images, save_model, tmp_path):
    path = save_model(residual_net(batch=1), "residual_static")
    calib = np.random.default_rng(0).normal(size=(10, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "calib.npy", calib)
    report = compile_model(path, tmp_path / "calib.npy", tmp_path / "out", CompileOptions(num_calib=6, per_channel=False, int8_io=True))
    assert report.quantization == {"weights": "int8 per-tensor", "activations": "int8", "model_io": "int8"}
    q = tflite_graph.read(tmp_path / "out" / "model_int8.tflite")
    _assert_int8_weights(q, per_channel=False)
    assert q.count("QUANTIZE") == 0 and q.count("DEQUANTIZE") == 0
    assert q.tensors[q.inputs[0]].dtype == "int8" and q.tensors[q.outputs[0]].dtype == "int8"
    assert report.verification["int8_vs_onnxruntime"]["cosine_mean"] > 0.9
    assert report.accuracy["labelled"] == 0 and "tflite_int8" not in report.accuracy


def test_squeezenet_bgr_caffe_preset(tmp_path):
    """A model from the paper with Caffe-style BGR input: the preset must give ORT's accuracy."""
    out = tmp_path / "sq"
    report = compile_model(shared("models/squeezenet1.1.onnx"), shared("imagenet-val"), out,
                           CompileOptions(preprocessing=make_preprocessing("caffe"), num_calib=32))
    acc = report.accuracy
    assert report.verification["passed"] and acc["tflite_float32"] == acc["onnxruntime_float32"] and acc["onnxruntime_float32"] > 0.5
    rgb = compile_model(shared("models/squeezenet1.1.onnx"), shared("imagenet-val"), tmp_path / "rgb",
                        CompileOptions(preprocessing=make_preprocessing("caffe", channel_order="rgb"), num_calib=32))
    assert rgb.accuracy["onnxruntime_float32"] < acc["onnxruntime_float32"]
    _assert_fused(out)


def test_wrong_conversion_fails_loudly_and_writes_nothing(tiny_images, save_model, tmp_path, monkeypatch):
    """Fault injection: if the converted model disagreed with ONNX Runtime, nothing may ship."""
    real = compiler.onnxruntime_all_outputs

    def wrong(*args, **kwargs):
        names, outputs, shapes = real(*args, **kwargs)
        return names, [o[::-1] * -1.0 for o in outputs], shapes

    monkeypatch.setattr(compiler, "onnxruntime_all_outputs", wrong)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    (out / "compile.json").write_text('{"kind": "quantune-edge/compile"}')  # an earlier compile: what --force may replace
    with pytest.raises(VerificationError, match="does not match ONNX Runtime"):
        compile_model(save_model(pad_conv_net(), "pad_wrong"), tiny_images, out, CompileOptions(num_calib=4, force=True))
    assert sorted(p.name for p in out.iterdir()) == ["compile.json", "keep.txt"]
    assert (out / "keep.txt").read_text() == "previous result"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
