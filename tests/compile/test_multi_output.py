"""A model with several outputs (the shared NanoDet-m: six) compiles, every output is verified under
its ONNX name, and what reads TFLite outputs gets them in the ONNX model's order and shapes. Its int8
model makes XNNPACK fail to prepare: the host then runs it on the builtin kernels and says so."""
import json

import numpy as np
import onnx
import pytest
from conftest import shared

from quantune_edge.common.metrics import sqnr_db
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.compile.compiler import onnxruntime_all_outputs
from quantune_edge.model.runtime import TfliteRunner

NANODET = "detection/models/nanodet-m-320-coco.onnx"
ONNX_OUTPUTS = ["cls_s8", "cls_s16", "cls_s32", "reg_s8", "reg_s16", "reg_s32"]


def test_every_output_is_verified_under_its_onnx_name(nanodet_compiled):
    out, proc = nanodet_compiled
    assert [o.name for o in onnx.load(shared(NANODET)).graph.output] == ONNX_OUTPUTS
    verification = json.loads((out / "compile.json").read_text())["verification"]
    assert verification["passed"] and list(verification["outputs"]) == ONNX_OUTPUTS
    for name in ONNX_OUTPUTS:
        assert verification["outputs"][name]["float32"]["cosine_min"] > 0.9999, name
        assert verification["outputs"][name]["float32"]["samples"] == 8
    assert verification["host_kernels"] == {"float32": "xnnpack", "int8": "xnnpack"}  # it failed while the stem's scale was 1.3e36
    said = proc.stdout + proc.stderr  # the console writes to stderr
    for name in ONNX_OUTPUTS:  # one row per output in the CLI's table
        assert f"{name}: cos min" in said


def test_outputs_come_in_the_onnx_models_order_and_shapes(nanodet_compiled):
    out, _ = nanodet_compiled
    compiled = CompiledModel.open(out)
    x = compiled.tflite_inputs(compiled.load_samples(shared("detection/coco-val2017-128/images"), 2, 0))
    names, reference, shapes = onnxruntime_all_outputs(shared(NANODET), compiled.specs, x)
    assert names == ONNX_OUTPUTS and shapes == [(1600, 80), (400, 80), (100, 80), (1600, 32), (400, 32), (100, 32)]
    assert list(compiled.output_shapes.values()) == shapes
    float_runner = TfliteRunner(compiled.float_model)
    # the interpreter lists them in another order (reg_s16 first): the runner restores the ONNX one
    assert [tuple(d["shape"]) for d in float_runner.interpreter.get_output_details()][0] == (400, 32)
    outputs = float_runner.run_all(x)
    assert [o.shape for o in outputs] == [r.shape for r in reference] == [(2, 1600, 80), (2, 400, 80), (2, 100, 80),
                                                                          (2, 1600, 32), (2, 400, 32), (2, 100, 32)]
    for name, got, want in zip(names, outputs, reference):
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=name)
    assert np.array_equal(float_runner.run(x), outputs[0])  # run() is the first ONNX output


def test_a_model_xnnpack_cannot_prepare_runs_on_the_builtin_kernels(nanodet_compiled, tmp_path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from conftest import xnnpack_unpreparable

    out, _ = nanodet_compiled
    compiled = CompiledModel.open(out)
    x = compiled.tflite_inputs(compiled.load_samples(shared("detection/coco-val2017-128/images"), 1, 0))
    model = xnnpack_unpreparable(compiled.int8_model, tmp_path / "unpreparable.tflite")
    runner = TfliteRunner(model)
    assert runner.kernels.startswith("builtin (XNNPACK failed: ") and "failed to prepare" in runner.kernels
    builtin = Interpreter(model_path=str(model), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    builtin.allocate_tensors()
    builtin.set_tensor(builtin.get_input_details()[0]["index"], x)  # float model I/O
    builtin.invoke()
    got = runner.invoke_all(x)
    assert len(got) == 6 and all(d["dtype"] == np.float32 for d in runner.outputs)
    for detail, value in zip(runner.outputs, got):  # the same kernels give the same numbers, bit for bit
        assert np.array_equal(value, builtin.get_tensor(detail["index"]))
    assert TfliteRunner(compiled.float_model).kernels == "xnnpack"


def test_a_channels_first_feature_map_output_comes_back_as_onnx_runtime_returns_it(tiny_images, save_model, tmp_path):
    """onnx2tf computes the second output (N, 4, 16, 16) channels-last; the compile folder's outputs
    are under the ONNX names, in the ONNX order and layout, equal to ONNX Runtime's."""
    from conftest import two_output_net

    from quantune_edge import CompileOptions, compile_model

    model = save_model(two_output_net(), "two_outputs")
    report = compile_model(model, tiny_images, tmp_path / "out", CompileOptions(num_calib=4))
    names = [o.name for o in onnx.load(model).graph.output]
    assert list(report.verification["outputs"]) == names and report.verification["passed"]
    compiled = CompiledModel.open(tmp_path / "out")
    assert list(compiled.output_shapes.values()) == [(1, 10), (1, 4, 16, 16)]
    samples = compiled.load_samples(tiny_images, 3)
    raw = TfliteRunner(compiled.float_model).run_all(samples.data)
    assert raw[1].shape == (3, 16, 16, 4)  # what the interpreter gives
    outputs = compiled.outputs(compiled.float_model, samples.data)
    _, reference, _ = onnxruntime_all_outputs(model, compiled.specs, samples.data)
    assert list(outputs) == names and [v.shape for v in outputs.values()] == [(3, 10), (3, 4, 16, 16)]
    for got, want in zip(outputs.values(), reference):
        np.testing.assert_allclose(got, want, atol=1e-4)
    int8 = compiled.outputs(compiled.int8_model, samples.data)
    assert [v.shape for v in int8.values()] == [(3, 10), (3, 4, 16, 16)]
    assert np.corrcoef(int8[names[1]].ravel(), reference[1].ravel())[0, 1] > 0.95


def test_analyze_takes_a_model_whose_outputs_have_no_batch_axis(nanodet_compiled, tmp_path):
    """NanoDet-m's outputs are [1600, 80] per sample: the analysis stacks them per sample, as the runner does."""
    import shutil

    from conftest import run_cli

    folder = tmp_path / "nd"
    shutil.copytree(nanodet_compiled[0], folder)
    proc = run_cli("analyze", folder, "--calib", shared("detection/coco-train2017-128"), "--num-samples", 3)
    assert proc.returncode == 0, proc.stderr[-1500:]
    analysis = json.loads((folder / "analysis.json").read_text())
    assert analysis["samples"]["count"] == 3 and analysis["model_output"]["metric"] == "mAP50-95"
    assert analysis["preserve_all_tensors_check"]["samples"] == 2  # compared per sample, [2, 1600, 80] with [2, 1600, 80]
    # Every output's int8 error, each normalised by its own float32 RMS, equals an independent SQNR
    # of the two models' outputs on the same three samples.
    compiled = CompiledModel.open(folder)
    samples = compiled.load_samples(shared("detection/coco-train2017-128"), 3, 0)
    want, got = (compiled.outputs(m, samples.data) for m in (compiled.float_model, compiled.int8_model))
    per_output = analysis["model_output"]["outputs_sqnr_db"]
    assert list(per_output) == ONNX_OUTPUTS
    for name in ONNX_OUTPUTS:
        assert per_output[name] == pytest.approx(sqnr_db(want[name], got[name]), abs=1e-3)
    assert analysis["model_output"]["worst_output"] == min(per_output, key=per_output.get)
    assert "each normalised by its own float32 RMS" in " ".join(proc.stderr.split())
