"""The backward pass as a TFLite model equals the numpy rules of ``backprop`` (themselves checked
against finite differences): op by op on padding/stride corner cases, and through the shipped model."""
import numpy as np
import pytest
from conftest import DEMO_IMAGES

from quantune_edge.analyze.grad import adjoint_model, backprop
from quantune_edge.analyze.grad.reference_ops import SAME, VALID
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.model import tflite_graph
from quantune_edge.model.runtime import TfliteRunner, softmax_input
from quantune_edge.model.tflite_graph import OpInfo, TensorInfo, TfliteGraph

RNG_SEED = 7
RNG = np.random.default_rng(RNG_SEED)  # a fresh one per test (tests/conftest.py: fresh_rng)


def _t(i: int, shape, data=None) -> TensorInfo:
    return TensorInfo(index=i, name=f"t{i}", shape=tuple(shape), dtype="float32", buffer=0, data=data)


def _windowed(kind: str, h: int, k: int, stride: int, padding: int, dilation: int = 1, c: int = 3) -> TfliteGraph:
    """x (1, h, h, c) -> one CONV_2D (4 output channels) or DEPTHWISE_CONV_2D -> y."""
    eff = (k - 1) * dilation + 1
    oh = -(-h // stride) if padding == SAME else (h - eff) // stride + 1
    out_c = 4 if kind == "CONV_2D" else c
    w = RNG.normal(size=(out_c, k, k, c) if kind == "CONV_2D" else (1, k, k, c)).astype(np.float32)
    options = {"padding": padding, "strideH": stride, "strideW": stride, "dilationHFactor": dilation, "dilationWFactor": dilation}
    tensors = [_t(0, (1, h, h, c)), _t(1, w.shape, w), _t(2, (1, oh, oh, out_c))]
    return TfliteGraph([OpInfo(0, kind, [0, 1, -1], [2], "NONE", options)], tensors, [0], [2], 0)


def _single(kind: str, in_shapes, out_shape, consts=(), options=None, activation="NONE") -> TfliteGraph:
    tensors = [_t(i, s) for i, s in enumerate(in_shapes)]
    inputs = list(range(len(tensors)))
    for c in consts:
        tensors.append(_t(len(tensors), c.shape, c))
    tensors.append(_t(len(tensors), out_shape))
    op = OpInfo(0, kind, list(range(len(tensors) - 1)), [len(tensors) - 1], activation, options or {})
    return TfliteGraph([op], tensors, inputs, [len(tensors) - 1], 0)


CASES = {
    "conv 3x3 s2 SAME odd": _windowed("CONV_2D", 7, 3, 2, SAME),
    "conv 3x3 s2 SAME even": _windowed("CONV_2D", 8, 3, 2, SAME),
    "conv 3x3 s2 VALID": _windowed("CONV_2D", 8, 3, 2, VALID),
    "conv 1x1 s1": _windowed("CONV_2D", 5, 1, 1, SAME),
    "conv 1x1 s2": _windowed("CONV_2D", 6, 1, 2, VALID),
    "conv 3x3 s1 SAME dilated": _windowed("CONV_2D", 9, 3, 1, SAME, dilation=2),
    "conv 5x5 s2 SAME": _windowed("CONV_2D", 11, 5, 2, SAME),
    "depthwise 3x3 s2 SAME odd": _windowed("DEPTHWISE_CONV_2D", 7, 3, 2, SAME),
    "depthwise 3x3 s2 SAME even": _windowed("DEPTHWISE_CONV_2D", 8, 3, 2, SAME),
    "depthwise 5x5 s2 SAME": _windowed("DEPTHWISE_CONV_2D", 14, 5, 2, SAME),
    "depthwise 3x3 s2 VALID": _windowed("DEPTHWISE_CONV_2D", 9, 3, 2, VALID),
    "depthwise 3x3 s1 VALID": _windowed("DEPTHWISE_CONV_2D", 6, 3, 1, VALID),
    "depthwise 3x3 s1 SAME dilated": _windowed("DEPTHWISE_CONV_2D", 9, 3, 1, SAME, dilation=2),
    "fully connected": _single("FULLY_CONNECTED", [(1, 4)], (1, 5), [RNG.normal(size=(5, 4)).astype(np.float32)], activation="RELU"),
    "fully connected, 4-D input": _single("FULLY_CONNECTED", [(1, 1, 1, 4)], (1, 5), [RNG.normal(size=(5, 4)).astype(np.float32)]),
    "add with broadcast": _single("ADD", [(1, 5, 5, 3), (1, 1, 1, 3)], (1, 5, 5, 3), activation="RELU6"),
    "mean keeping dims": _single("MEAN", [(1, 5, 5, 3)], (1, 1, 1, 3), [np.array([1, 2], np.int32)]),
    "mean dropping dims": _single("MEAN", [(1, 5, 5, 3)], (1, 3), [np.array([1, 2], np.int32)]),
    "global average pool": _single("AVERAGE_POOL_2D", [(1, 5, 5, 3)], (1, 1, 1, 3),
                                   options={"padding": VALID, "filterHeight": 5, "filterWidth": 5, "strideH": 1, "strideW": 1}),
    "concatenation": _single("CONCATENATION", [(1, 4, 4, 3), (1, 4, 4, 2)], (1, 4, 4, 5), options={"axis": 3}),
    "max pool 3x3 s2 VALID": _single("MAX_POOL_2D", [(1, 9, 9, 3)], (1, 4, 4, 3),
                                     options={"padding": VALID, "filterHeight": 3, "filterWidth": 3, "strideH": 2, "strideW": 2}),
    "max pool 3x3 s2 SAME even": _single("MAX_POOL_2D", [(1, 8, 8, 3)], (1, 4, 4, 3),
                                         options={"padding": SAME, "filterHeight": 3, "filterWidth": 3, "strideH": 2, "strideW": 2}),
    "max pool 3x3 s1 SAME": _single("MAX_POOL_2D", [(1, 7, 7, 3)], (1, 7, 7, 3),
                                    options={"padding": SAME, "filterHeight": 3, "filterWidth": 3, "strideH": 1, "strideW": 1}),
    "max pool 2x2 s3 VALID (taps < stride)": _single("MAX_POOL_2D", [(1, 9, 9, 3)], (1, 3, 3, 3),
                                                     options={"padding": VALID, "filterHeight": 2, "filterWidth": 2, "strideH": 3, "strideW": 3}),
    "max pool 2x2 s2 VALID, ties": _single("MAX_POOL_2D", [(1, 6, 6, 3)], (1, 3, 3, 3),
                                           options={"padding": VALID, "filterHeight": 2, "filterWidth": 2, "strideH": 2, "strideW": 2}),
    "reshape": _single("RESHAPE", [(1, 1, 1, 6)], (1, 6), [np.array([1, 6], np.int32)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_equals_the_numpy_rule(case):
    graph = CASES[case]
    out = graph.outputs[0]
    values = {t.index: RNG.normal(size=t.shape).astype(np.float32) * 3 for t in graph.tensors if not t.is_constant}
    if "ties" in case:  # ReLU outputs: windows of equal zeros route to their first tap
        values = {t: np.maximum(v, 0) for t, v in values.items()}
    wanted = set(graph.inputs)
    probe = RNG.normal(size=graph.tensors[out].shape).astype(np.float32)
    runner = adjoint_model.AdjointRunner(adjoint_model.build(graph, out, wanted), 1)
    got = runner.vjp(probe, values.__getitem__)
    want = backprop.vjp(graph, out, probe, values.__getitem__, wanted)
    assert set(got) == set(want) == wanted
    for t in wanted:
        assert got[t].shape == graph.tensors[t].shape
        np.testing.assert_allclose(got[t].reshape(want[t].shape), want[t], rtol=1e-5, atol=1e-5 * float(np.abs(want[t]).max()))


@pytest.mark.parametrize("graph, why", [
    (TfliteGraph([OpInfo(0, "CONV_2D", [0, 1, -1], [2], "NONE", {"padding": SAME, "strideH": 2, "strideW": 1})],
                 [_t(0, (1, 6, 6, 2)), _t(1, (2, 3, 3, 2), np.ones((2, 3, 3, 2), np.float32)), _t(2, (1, 3, 6, 2))], [0], [2], 0),
     "CONV_2D with unequal strides"),
    (_single("AVERAGE_POOL_2D", [(1, 6, 6, 3)], (1, 3, 3, 3),
             options={"padding": VALID, "filterHeight": 2, "filterWidth": 2, "strideH": 2, "strideW": 2}), "AVERAGE_POOL_2D other than global"),
    (_single("LOGISTIC", [(1, 4)], (1, 4)), "LOGISTIC"),  # numpy has its rule; the adjoint model not yet
    (_single("ADD", [(1, 4), (1, 4)], (1, 4), activation="SIGN_BIT"), "fused activation SIGN_BIT"),
])
def test_ops_without_a_tflite_rule_fall_back_to_numpy(graph, why):
    with pytest.raises(backprop.Unsupported, match=why):
        adjoint_model.build(graph, graph.outputs[0], set(graph.inputs))
    _, engine = adjoint_model.backward_pass(graph, [graph.outputs[0]], set(graph.inputs), 1)
    assert engine == "numpy"


def test_through_the_shipped_model(effnet_compiled):
    """Jᵀr at every layer of EfficientNet-Lite0, linearised at a real photo: TFLite = numpy."""
    compiled = CompiledModel.open(effnet_compiled)
    graph = tflite_graph.read(compiled.float_model)
    runner = TfliteRunner(compiled.float_model, 1, preserve_all_tensors=True)
    runner.invoke(compiled.tflite_inputs(compiled.load_samples(DEMO_IMAGES, 1, 0)))
    logits = softmax_input(graph) or graph.outputs[0]
    wanted = {op.outputs[0] for op in graph.ops[:-2]}
    backward, engine = adjoint_model.backward_pass(graph, [logits], wanted, 1)
    assert engine == "tflite"
    r = RNG.normal(size=graph.tensors[logits].shape).astype(np.float32)
    got = backward({logits: r}, runner.tensor)
    want = backprop.vjp(graph, logits, r, runner.tensor, wanted)
    assert set(got) == set(want) and len(got) >= 50
    for t in want:
        np.testing.assert_allclose(got[t].reshape(want[t].shape), want[t], rtol=1e-4, atol=1e-5 * float(np.abs(want[t]).max()))


def test_a_model_the_runtime_refuses_falls_back_to_numpy(monkeypatch):
    graph = CASES["conv 3x3 s2 SAME odd"]

    def refuse(*args, **kwargs):
        raise ValueError("Didn't find op for builtin opcode 'CONV_2D' version '9'")

    monkeypatch.setattr(adjoint_model, "AdjointRunner", refuse)
    backward, engine = adjoint_model.backward_pass(graph, [graph.outputs[0]], set(graph.inputs), 1)
    assert engine == "numpy"
    probe = RNG.normal(size=graph.tensors[2].shape).astype(np.float32)
    values = {t: RNG.normal(size=graph.tensors[t].shape).astype(np.float32) for t in (0, 2)}
    assert backward({2: probe}, values.__getitem__)[0].shape == graph.tensors[0].shape
