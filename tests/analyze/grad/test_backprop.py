"""Vector-Jacobian products through float TFLite graphs: every rule against central finite differences
(float64), the whole shipped EfficientNet-Lite0 against a float64 forward pass, and what the output
attribution built on them says about real layers."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DEMO_IMAGES

from quantune_edge.analyze.grad import backprop, reference_ops
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.model import tflite_graph
from quantune_edge.model.runtime import softmax_input
from quantune_edge.model.tflite_graph import OpInfo, TensorInfo, TfliteGraph

RNG_SEED = 0
RNG = np.random.default_rng(RNG_SEED)  # a fresh one per test (tests/conftest.py: fresh_rng)


def _directional(f, x: np.ndarray, v: np.ndarray, d: np.ndarray, eps: float = 1e-6) -> float:
    return float(np.sum(v * (f(x + eps * d) - f(x - eps * d))) / (2 * eps))


def _max_pool(x: np.ndarray, k: int, options: dict) -> np.ndarray:
    if options["padding"] == reference_ops.SAME:
        (t, b), (l, r) = reference_ops.pad_same_amounts(x.shape[1], x.shape[2], k, k, options["strideH"], options["strideW"])
        x = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=-np.inf)
        options = {**options, "padding": reference_ops.VALID}
    return reference_ops.patches(x, k, k, options).max(axis=(-1, -2))


def _avg_pool(x: np.ndarray, k: int, options: dict) -> np.ndarray:
    ones = np.ones((1, *x.shape[1:3], 1))
    return reference_ops.patches(x, k, k, options).sum(axis=(-1, -2)) / reference_ops.patches(ones, k, k, options).sum(axis=(-1, -2))


@pytest.mark.parametrize("padding", [reference_ops.SAME, reference_ops.VALID])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_windowed_rules_match_finite_differences(padding, stride, k):
    options = {"padding": padding, "strideH": stride, "strideW": stride}
    x = RNG.normal(size=(2, 9, 10, 3))  # odd and even sides: SAME pads 1 or 2, split unevenly
    cases = {
        "conv": (lambda a, w=RNG.normal(size=(4, k, k, 3)): reference_ops.conv2d(a, w, None, options),
                 lambda g, w: backprop._conv_input_grad(g, w, x.shape, options)),
        "depthwise x2": (lambda a, w=RNG.normal(size=(1, k, k, 6)): reference_ops.depthwise_conv2d(a, w, None, options),
                         lambda g, w: backprop._depthwise_input_grad(g, w, x.shape, options)),
    }
    for name, (forward, rule) in cases.items():
        w = forward.__defaults__[0]
        y = forward(x)
        v, d = RNG.normal(size=y.shape), RNG.normal(size=x.shape)
        assert np.sum(rule(v, w) * d) == pytest.approx(_directional(forward, x, v, d), rel=2e-5), name
    dilated = {**options, "dilationHFactor": 2, "dilationWFactor": 2}
    w = RNG.normal(size=(4, k, k, 3))
    y = reference_ops.conv2d(x, w, None, dilated)
    v, d = RNG.normal(size=y.shape), RNG.normal(size=x.shape)
    assert np.sum(backprop._conv_input_grad(v, w, x.shape, dilated) * d) == pytest.approx(
        _directional(lambda a: reference_ops.conv2d(a, w, None, dilated), x, v, d), rel=2e-5)
    pool = {**options, "filterHeight": k, "filterWidth": k}
    for forward, rule in ((lambda a: _max_pool(a, k, options), lambda g: backprop._max_pool_input_grad(g, x, pool)),
                          (lambda a: _avg_pool(a, k, options), lambda g: backprop._avg_pool_input_grad(g, x.shape, k, k, pool))):
        y = forward(x)
        v, d = RNG.normal(size=y.shape), RNG.normal(size=x.shape)
        assert np.sum(rule(v) * d) == pytest.approx(_directional(forward, x, v, d), rel=2e-5)


def _tensor(i: int, shape, data=None) -> TensorInfo:
    return TensorInfo(index=i, name=f"t{i}", shape=tuple(shape), dtype="FLOAT32", buffer=0, data=data)


def test_vjp_through_a_small_graph_with_skip_mean_and_fully_connected():
    """conv+RELU6 -> (skip) ADD -> MEAN -> FULLY_CONNECTED, in a hand-built graph."""
    w1, w2 = RNG.normal(size=(4, 3, 3, 4)) * 0.3, RNG.normal(size=(5, 4)) * 0.3
    tensors = [_tensor(0, (1, 6, 6, 4)), _tensor(1, (4, 3, 3, 4), w1), _tensor(2, (1, 6, 6, 4)), _tensor(3, (1, 6, 6, 4)),
               _tensor(4, (2,), np.array([1, 2], np.int32)), _tensor(5, (1, 1, 1, 4)), _tensor(6, (5, 4), w2), _tensor(7, (1, 5))]
    ops = [OpInfo(0, "CONV_2D", [0, 1, -1], [2], "RELU6", {"padding": reference_ops.SAME}),
           OpInfo(1, "ADD", [0, 2], [3]), OpInfo(2, "MEAN", [3, 4], [5]), OpInfo(3, "FULLY_CONNECTED", [5, 6, -1], [7])]
    graph = TfliteGraph(ops, tensors, [0], [7], 0)

    def forward(x):
        y = reference_ops.activation(reference_ops.conv2d(x, w1, None, ops[0].options), "RELU6")
        s = x + y
        return {2: y, 3: s, 5: s.mean(axis=(1, 2), keepdims=True), 7: reference_ops.fully_connected(s.mean(axis=(1, 2)), w2, None)}

    x = RNG.normal(size=(1, 6, 6, 4)) * 2
    values = forward(x)
    v, d = RNG.normal(size=(1, 5)), RNG.normal(size=x.shape)
    grads = backprop.vjp(graph, 7, v, lambda t: values[t] if t in values else x, {0, 2, 3})
    assert np.sum(grads[0] * d) == pytest.approx(_directional(lambda a: forward(a)[7], x, v, d), rel=1e-5)
    assert set(grads) == {0, 2, 3}


def _numpy_forward(graph: TfliteGraph, x: np.ndarray, inject: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The float graph in float64 with the reference kernels, adding ``inject[t]`` to tensor t."""
    values = {graph.inputs[0]: x}
    for op in graph.ops:
        t = graph.tensors
        acts = [values[i] for i in op.inputs if i >= 0 and not t[i].is_constant]
        if op.type == "MEAN":
            y = acts[0].mean(axis=(1, 2), keepdims=True)
        else:
            weighted = op.type in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
            w = t[op.inputs[1]].data.astype(np.float64) if weighted else None
            b = t[op.inputs[2]].data.astype(np.float64) if weighted and len(op.inputs) > 2 and op.inputs[2] >= 0 else None
            y = reference_ops.run(op.type, op.options, acts, w, b, op.fused_activation, t[op.outputs[0]].shape)
        values[op.outputs[0]] = y + inject.get(op.outputs[0], 0)
    return values


def test_vjp_through_the_shipped_model_matches_finite_differences(effnet_compiled):
    """Jᵀv at layers early, middle and late in EfficientNet-Lite0, linearised at a real photo."""
    compiled = CompiledModel.open(effnet_compiled)
    graph = tflite_graph.read(compiled.float_model)
    x = compiled.tflite_inputs(compiled.load_samples(DEMO_IMAGES, 1, 0))[:1].astype(np.float64)
    logits = softmax_input(graph) or graph.outputs[0]
    values = _numpy_forward(graph, x, {})
    v = RNG.normal(size=values[logits].shape)
    outputs = [op.outputs[0] for op in graph.ops]
    probes = outputs[0], outputs[len(outputs) // 3], outputs[2 * len(outputs) // 3], outputs[-3]
    grads = backprop.vjp(graph, logits, v, values.__getitem__, set(probes))
    for t in probes:
        d = RNG.normal(size=values[t].shape)
        fd = float(np.sum(v * (_numpy_forward(graph, x, {t: 1e-7 * d})[logits] - _numpy_forward(graph, x, {t: -1e-7 * d})[logits])) / 2e-7)
        assert np.sum(grads[t] * d) == pytest.approx(fd, rel=1e-4), graph.tensors[t].name
