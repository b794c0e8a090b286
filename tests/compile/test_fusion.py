import numpy as np
from conftest import pad_conv_net, residual_net

from quantune_edge.compile import fusion
from quantune_edge.model.tflite_graph import OpInfo, TensorInfo, TfliteGraph


def test_onnx_patterns_on_built_graphs():
    counts = fusion.onnx_patterns(residual_net())
    assert counts == {"Conv+BatchNormalization": 3, "Conv+Relu/Clip": 2, "Add+Relu/Clip": 1, "Pad+Conv": 0}
    assert fusion.onnx_patterns(pad_conv_net())["Pad+Conv"] == 2


def _t(i, shape, data=None):
    return TensorInfo(i, f"t{i}", tuple(shape), "float32", 0, data=data)


def _pad_conv_graph(pads):
    tensors = [
        _t(0, (1, 32, 32, 3)),
        _t(1, (4, 2), np.array(pads, np.int32)),
        _t(2, (1, 33, 33, 3)),
        _t(3, (8, 3, 3, 3), np.zeros((8, 3, 3, 3), np.float32)),
        _t(4, (8,), np.zeros(8, np.float32)),
        _t(5, (1, 16, 16, 8)),
        _t(6, (1, 16, 16, 8)),
    ]
    ops = [
        OpInfo(0, "PAD", [0, 1], [2]),
        OpInfo(1, "CONV_2D", [2, 3, 4], [5], "NONE", {"strideH": 2, "strideW": 2, "dilationHFactor": 1, "dilationWFactor": 1}),
        OpInfo(2, "RELU6", [5], [6]),
    ]
    return TfliteGraph(ops, tensors, [0], [6], 0)


def test_missed_fusions_are_reported():
    same_like = _pad_conv_graph([[0, 0], [0, 1], [0, 1], [0, 0]])
    kinds = {u.kind for u in fusion.unfused_ops(same_like)}
    assert kinds == {fusion.MISSED_PAD, "standalone activation"}
    summary = fusion.summarize({"Pad+Conv": 1, "Conv+Relu/Clip": 1}, same_like)
    by = {p["pattern"]: p for p in summary["patterns"]}
    assert by["Pad+Conv"]["left_unfused"] == 1 and by["Conv+Relu/Clip"]["fused"] == 0


def test_pytorch_style_pad_is_not_a_missed_fusion():
    torch_like = _pad_conv_graph([[0, 0], [1, 1], [1, 1], [0, 0]])
    summary = fusion.summarize({}, torch_like)
    assert [u["kind"] for u in summary["explicit_pads"]] == [fusion.EXPLICIT_PAD]
    assert all(u["kind"] != fusion.MISSED_PAD for u in summary["unfused"])


def test_unfolded_batchnorm_after_conv_is_reported():
    tensors = [_t(0, (1, 8, 8, 3)), _t(1, (4, 1, 1, 3), np.ones((4, 1, 1, 3), np.float32)), _t(2, (4,), np.zeros(4, np.float32)),
               _t(3, (1, 8, 8, 4)), _t(4, (4,), np.ones(4, np.float32)), _t(5, (1, 8, 8, 4))]
    ops = [OpInfo(0, "CONV_2D", [0, 1, 2], [3], "NONE", {}), OpInfo(1, "MUL", [3, 4], [5], "NONE")]
    found = fusion.unfused_ops(TfliteGraph(ops, tensors, [0], [5], 0))
    assert [(u.kind, u.op_type, u.neighbour_type) for u in found] == [("unfolded BatchNorm/affine", "MUL", "CONV_2D")]
