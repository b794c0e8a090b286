"""Exports older than opset 13 convert instead of being refused: Softmax, LogSoftmax and Hardmax with
the old "coerce to 2-D" axis (over N x 8 x 2 x 2, axis=1 spans all 32 values), the old Dropout with a
mask output, and attributes that later became inputs (Split's split, Squeeze's and ReduceSum's axes).
Each is built here at opset 11 and must compile: compile checks the float32 TFLite against ONNX
Runtime running the original file."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import GraphBuilder, run_cli
from onnx import TensorProto, helper

from quantune_edge.model import onnx_model


def old_export(kind: str):
    b = GraphBuilder(3)
    pooled = b.node("AveragePool", [b.node("Relu", [b.conv("input", 3, 8, stride=2)])], kernel_shape=[8, 8], strides=[8, 8])  # 1x8x2x2
    shape = [1, 8, 2, 2]
    if kind in ("Softmax", "LogSoftmax", "Hardmax"):
        out = b.node(kind, [pooled], axis=1)
    elif kind == "Dropout+Squeeze":
        b.nodes.append(helper.make_node("Dropout", [b.node("GlobalAveragePool", [pooled])], ["dropped", "mask"], name="drop", ratio=0.5))
        out, shape = b.node("Squeeze", ["dropped"], axes=[2, 3]), [1, 8]
    elif kind == "Split":
        b.nodes.append(helper.make_node("Split", [pooled], ["s0", "s1"], name="split", axis=1, split=[3, 5]))
        out = b.node("Concat", ["s1", "s0"], axis=1)
    else:  # ReduceSum, axes an attribute before opset 13
        out, shape = b.node("ReduceSum", [pooled], axes=[1], keepdims=1), [1, 1, 2, 2]
    graph = helper.make_graph(b.nodes, "old", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    return model


KINDS = ["Softmax", "LogSoftmax", "Hardmax", "Dropout+Squeeze", "Split", "ReduceSum"]


@pytest.mark.parametrize("kind", ["Softmax", "LogSoftmax", "Hardmax"])
def test_the_old_axis_is_written_out_with_the_same_meaning(kind):
    """The rewrite alone, checked by ONNX Runtime: the same outputs, and the op now over a 2-D tensor."""
    model = old_export(kind)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert onnx_model._flatten_coerced_axis_ops(rewritten) == 1
    assert [n.op_type for n in rewritten.graph.node][-4:] == ["Shape", "Flatten", kind, "Reshape"]
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(rewritten), run(model), atol=1e-6)
    if kind == "Softmax":
        assert run(model).sum() == pytest.approx(1.0, abs=1e-5)  # one distribution over all 32 values, not 4 over 8


@pytest.mark.parametrize("kind", KINDS)
def test_an_opset_11_export_compiles_and_matches_onnxruntime(kind, tmp_path, tiny_images):
    onnx.save(old_export(kind), tmp_path / "old.onnx")
    out = tmp_path / "out"
    proc = run_cli("compile", tmp_path / "old.onnx", "--calib", tiny_images, "--out", out, "--num-calib", 6, "--task", "fidelity")
    assert proc.returncode == 0, proc.stderr[-1500:]
    report = json.loads((out / "compile.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["float32_vs_onnxruntime"]["cosine_min"] > 0.9999
    assert any("opset 11 export rewritten to opset 13" in note for note in report["notes"])
    assert report["onnx_ops"]["original"] == onnx_model.op_histogram(onnx.load(tmp_path / "old.onnx"))  # the user's file as given
