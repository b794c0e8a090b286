import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DEMO_MODEL, GraphBuilder, nhwc_net, pad_conv_net, residual_net

from quantune_edge.errors import ConversionError, InputError
from quantune_edge.model import onnx_model


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_input_spec_layouts_and_dynamic_batch():
    (spec,), notes = onnx_model.input_specs(residual_net(batch="N"))
    assert spec.layout == "NCHW" and spec.shape == (1, 3, 32, 32) and spec.hwc == (32, 32, 3)
    assert any("dynamic batch" in n for n in notes)
    (spec,), notes = onnx_model.input_specs(nhwc_net())
    assert spec.layout == "NHWC" and spec.hwc == (32, 32, 3) and not notes


def test_dynamic_spatial_needs_input_size_or_input_shape():
    g = GraphBuilder()
    model = g.model(["N", 3, "H", "W"], g.head(g.conv("input", 3, 4), 4))
    with pytest.raises(InputError, match="pass --input-size or --input-shape input=..."):
        onnx_model.input_specs(model)
    (spec,), _ = onnx_model.input_specs(model, input_size=(48, 48))
    assert spec.shape == (1, 3, 48, 48)
    (spec,), notes = onnx_model.input_specs(model, shapes=onnx_model.parse_input_shapes(["input=1x3x40x56"]))
    assert spec.shape == (1, 3, 40, 56) and spec.hwc == (40, 56, 3) and "--input-shape" in notes[0]


def test_non_image_inputs_keep_their_layout_and_need_static_shapes():
    g = GraphBuilder()
    w = g.const(np.ones((10, 4)))
    (spec,), _ = onnx_model.input_specs(g.model([1, 10], g.node("MatMul", ["input", w])))
    assert spec.layout == "plain" and not spec.is_image and spec.sample_shape == (10,)
    with pytest.raises(InputError, match=r"dynamic dimensions \[1, 'T', 10\]; set them with --input-shape input=1xNx10"):
        onnx_model.input_specs(g.model([1, "T", 10], g.node("MatMul", ["input", w])))
    (spec,), _ = onnx_model.input_specs(g.model([1, "T", 10], g.node("MatMul", ["input", w])), shapes={"input": (1, 49, 10)})
    assert spec.shape == (1, 49, 10) and spec.layout == "plain"
    with pytest.raises(InputError, match="--input-size applies to an image input"):
        onnx_model.input_specs(g.model([1, 10], g.node("MatMul", ["input", w])), input_size=(32, 32))


@pytest.mark.parametrize("texts, message", [
    (["input=1x3xAx4"], "takes NAME=1x3x640x640"), (["1x3x4x4"], "takes NAME="), (["input=1x0x4"], "positive sizes"),
    (["input=1x3", "input=1x4"], "gives input 'input' twice"), (["other=1x10"], "names 'other', which is not an input of the model"),
    (["input=1x10x3"], r"does not fit the model input of shape \[1, 10\]"),
])
def test_bad_input_shapes(texts, message):
    g = GraphBuilder()
    model = g.model([1, 10], g.node("MatMul", ["input", g.const(np.ones((10, 4)))]))
    with pytest.raises(InputError, match=message):
        onnx_model.input_specs(model, shapes=onnx_model.parse_input_shapes(texts))


def test_fold_pads_keeps_the_function(tmp_path):
    model = pad_conv_net()
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    before = _run(model, x)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    assert onnx_model.fold_pads(work) == 2
    assert "Pad" not in onnx_model.op_histogram(work)
    pads = [list(a.ints) for n in work.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
    assert pads == [[0, 0, 1, 1], [1, 1, 1, 1]]
    np.testing.assert_allclose(_run(work, x), before, rtol=1e-5, atol=1e-5)


def test_prepare_simplifies_the_raw_pytorch_export():
    raw = onnx_model.load(DEMO_MODEL)
    assert onnx_model.op_histogram(raw)["Pad"] == 17
    prepared = onnx_model.prepare(raw)
    hist = onnx_model.op_histogram(prepared.model)
    assert prepared.simplified and "Pad" not in hist and "Slice" not in hist and hist["Conv"] == 49
    assert onnx_model.op_histogram(raw)["Pad"] == 17  # original untouched


def test_unsupported_ops_are_named():
    g = GraphBuilder()
    y = g.node("FancyOp", [g.conv("input", 3, 4)], domain="com.example")
    model = g.model([1, 3, 16, 16], g.head(y, 4), extra_opsets={"com.example": 1})
    with pytest.raises(ConversionError, match=r"unsupported op 'FancyOp' \(domain 'com.example'\) at node 'fancyop/"):
        onnx_model.check_supported(model)
    g = GraphBuilder()
    y = g.node("CastLike", [g.conv("input", 3, 4), g.const(np.zeros(1))])
    with pytest.raises(ConversionError, match="unsupported op 'CastLike'"):
        onnx_model.check_supported(g.model([1, 3, 16, 16], g.head(y, 4), opset=15))


@pytest.mark.parametrize("content, message", [
    (None, "model file not found"),
    (b"", "model file is empty"),
    (b"hello, this is plain text and not a protobuf at all\n" * 3, "not an ONNX model"),
])
def test_load_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        onnx_model.load(path)


def test_load_rejects_truncated_model(tmp_path):
    raw = DEMO_MODEL.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated or corrupt ONNX"):
        onnx_model.load(path)


@pytest.mark.parametrize("kernel, pads, strides, rewritten", [(3, [1, 1, 1, 1], 2, 1), (5, [2, 2, 2, 2], 1, 0), (3, [1, 0, 2, 1], 1, 1)])
def test_max_pool_padding_becomes_an_edge_pad_with_the_same_outputs(kernel, pads, strides, rewritten):
    """NanoDet's stem (k3 s2 p1) and an uneven pad are rewritten; YOLOv5's SPPF (k5 s1 p2) is TF's
    SAME padding, which the converter expresses without a pad value, and is left. ONNX Runtime gives
    the same outputs before and after, on values that are all negative (where a zero pad would win)."""
    g = GraphBuilder(3)
    x = g.node("LeakyRelu", [g.conv("input", 3, 4, 3, 1)], alpha=0.1)
    y = g.node("MaxPool", [x], kernel_shape=[kernel, kernel], pads=pads, strides=[strides, strides])
    model = g.model([1, 3, 12, 11], y)
    data = {"input": -np.abs(np.random.default_rng(0).normal(size=(1, 3, 12, 11))).astype(np.float32) - 1}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data)[0]
    assert onnx_model.edge_pad_max_pools(model) == rewritten
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    assert any(a.name == "pads" for a in pool.attribute) == (not rewritten)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data)[0]
    np.testing.assert_array_equal(before, after)
