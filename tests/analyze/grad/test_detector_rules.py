"""The backward rules for the ops detectors use (SiLU, SPPF's 5×5 max pool, resizes, pads,
transposes, slices, splits, softmax, exp, ...), each checked against central finite differences of a
float64 numpy forward pass, on a small model that the TF converter turned into those TFLite ops; the
numpy forward itself is checked against TFLite's float kernels first."""
from __future__ import annotations

import numpy as np
import pytest

from quantune_edge.analyze.grad import backprop, reference_ops
from quantune_edge.model import tflite_graph
from quantune_edge.model.runtime import TfliteRunner

RNG_SEED = 3
RNG = np.random.default_rng(RNG_SEED)  # a fresh one per test (tests/conftest.py: fresh_rng)
DETECTOR_OPS = {"CONV_2D", "LOGISTIC", "MUL", "MAX_POOL_2D", "RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR", "CONCATENATION",
                "PAD", "TRANSPOSE", "RESHAPE", "STRIDED_SLICE", "SPLIT", "EXP", "SUB", "SOFTMAX", "TANH", "HARD_SWISH", "ADD"}


@pytest.fixture(scope="module")
def head_model(tmp_path_factory) -> tflite_graph.TfliteGraph:
    import tensorflow as tf

    w1 = tf.constant(RNG.normal(size=(3, 3, 4, 4)).astype(np.float32) * 0.5)
    scale = tf.constant(RNG.normal(size=(162,)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec((1, 8, 8, 4), tf.float32)])
    def head(x):
        c = tf.nn.conv2d(x, w1, 1, "SAME")
        s = c * tf.sigmoid(c)  # SiLU as YOLOv5 writes it
        p = tf.nn.max_pool2d(s, 5, 1, "SAME")  # SPPF
        u = tf.image.resize(p, (16, 16), "nearest")
        v = tf.image.resize(s, (16, 16), "bilinear")
        padded = tf.pad(tf.concat([u, v], axis=-1), [[0, 0], [1, 2], [0, 1], [0, 0]])
        h = padded * tf.nn.relu6(padded + 3) * (1 / 6)  # hard swish
        r = tf.reshape(tf.transpose(h, [0, 3, 1, 2]), (1, 2, 4, 323))
        a, b = tf.split(r[:, :, 0:4, ::2], 2, axis=2)
        e = tf.exp(a * scale * 0.1) - b
        return tf.concat([tf.nn.softmax(e, axis=-1), tf.tanh(b * 0.5)], axis=-1)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([head.get_concrete_function()], head)
    path = tmp_path_factory.mktemp("head") / "head.tflite"
    path.write_bytes(converter.convert())
    return path


def _forward(graph: tflite_graph.TfliteGraph, x: np.ndarray, inject: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """The float graph with the numpy kernels, in x's precision, adding ``inject[t]`` to tensor t."""
    inject = inject or {}
    t = graph.tensors
    values = {graph.inputs[0]: x}
    for op in graph.ops:
        acts = [values.get(i) if i >= 0 and not t[i].is_constant else None for i in op.inputs]
        consts = [t[i].data if i >= 0 and t[i].is_constant else None for i in op.inputs]
        if op.type == "CONV_2D":
            bias = consts[2].astype(x.dtype) if len(consts) > 2 and consts[2] is not None else None
            outs = [reference_ops.run(op.type, op.options, [acts[0]], consts[1].astype(x.dtype), bias, op.fused_activation,
                                      t[op.outputs[0]].shape)]
        else:
            outs = reference_ops.evaluate(op.type, op.options, acts, [None if c is None else c.astype(x.dtype) if c.dtype.kind == "f" else c
                                                                       for c in consts],
                                          [t[o].shape for o in op.outputs], op.fused_activation)
        assert outs is not None, f"no numpy kernel for {op.type}"
        for o, y in zip(op.outputs, outs):
            values[o] = np.asarray(y, x.dtype).reshape(t[o].shape) + inject.get(o, 0)
    return values


def test_numpy_kernels_match_tflite_on_the_detector_ops(head_model):
    graph = tflite_graph.read(head_model)
    assert DETECTOR_OPS - {"HARD_SWISH", "ADD"} <= set(graph.histogram()), graph.histogram()
    x = RNG.normal(size=(1, 8, 8, 4)).astype(np.float32)
    runner = TfliteRunner(head_model, 1, preserve_all_tensors=True)
    runner.invoke(x)
    values = _forward(graph, x)
    for op in graph.ops:
        for o in op.outputs:
            ref = runner.interpreter.get_tensor(o)
            assert np.max(np.abs(values[o] - ref)) <= 1e-4 * np.max(np.abs(ref)) + 1e-5, (op.index, op.type)


def test_every_rule_matches_finite_differences(head_model):
    graph = tflite_graph.read(head_model)
    x = RNG.normal(size=(1, 8, 8, 4))
    values = _forward(graph, x)
    out = graph.outputs[0]
    v = RNG.normal(size=(1, *values[out].shape[1:]))
    probes = {o for op in graph.ops for o in op.outputs} - {out}
    grads = backprop.vjp(graph, out, v, values.__getitem__, probes)
    checked = set()
    for op in graph.ops:
        for o in op.outputs:
            if o == out:
                continue
            d = RNG.normal(size=values[o].shape)
            fd = float(np.sum(v * (_forward(graph, x, {o: 1e-6 * d})[out] - _forward(graph, x, {o: -1e-6 * d})[out])) / 2e-6)
            assert np.sum(grads[o] * d) == pytest.approx(fd, rel=1e-5, abs=1e-8), (op.index, op.type)
        consumers = [c.type for c in graph.consumers(op.outputs[0])]
        checked.update(consumers)
    assert DETECTOR_OPS - {"HARD_SWISH", "ADD", "CONV_2D"} <= checked


@pytest.mark.parametrize("case", ["hard_swish", "leaky_relu", "mirror_reflect", "mirror_symmetric", "batchless", "mul_broadcast", "split_v", "slice", "bilinear_align", "nearest_align"])
def test_rules_the_converter_did_not_emit_above(case):
    """Single-op graphs for forms the small model does not produce (hard swish, leaky ReLU and mirror pads (NanoDet), a
    broadcast product of two activations, SPLIT_V, SLICE, align-corners resizes)."""
    def tensor(i, shape, data=None):
        return tflite_graph.TensorInfo(i, f"t{i}", tuple(shape), "float32", 0, data=data)

    op_of = tflite_graph.OpInfo
    x = RNG.normal(size=(1, 5, 6, 3)) * 3
    tensors = [tensor(0, x.shape)]
    if case in ("hard_swish", "leaky_relu"):
        ops, out_shape = [op_of(0, case.upper(), [0], [1], options={"alpha": 0.1})], x.shape
    elif case == "mul_broadcast":  # x times a slice of itself broadcast along H: both operands are activations
        tensors += [tensor(1, (1, 1, 6, 3)), tensor(2, (4,), np.zeros(4, np.int32)), tensor(3, (4,), np.array([1, 1, 6, 3], np.int32)),
                    tensor(4, (4,), np.ones(4, np.int32)), tensor(5, x.shape)]
        ops = [op_of(0, "STRIDED_SLICE", [0, 2, 3, 4], [1], options={"beginMask": 0b1111, "endMask": 0b1101}),
               op_of(1, "MUL", [0, 1], [5])]
        out_shape = x.shape
    elif case.startswith("mirror"):  # NanoDet-m's edge-padded max pool becomes MIRROR_PAD
        tensors.append(tensor(1, (4, 2), np.array([[0, 0], [1, 2], [2, 1], [0, 0]], np.int32)))
        ops = [op_of(0, "MIRROR_PAD", [0, 1], [2], options={"mode": int(case.endswith("symmetric"))})]
        out_shape = (1, 8, 9, 3)
    elif case == "batchless":  # NanoDet-m's heads end in [N, 80] tensors: a transpose across axis 0
        tensors += [tensor(1, (2,), np.array([6, 15], np.int32)), tensor(2, (6, 15)), tensor(3, (2,), np.array([1, 0], np.int32))]
        ops = [op_of(0, "RESHAPE", [0, 1], [2]), op_of(1, "TRANSPOSE", [2, 3], [4])]
        out_shape = (15, 6)
    elif case == "split_v":
        tensors += [tensor(1, (2,), np.array([2, 4], np.int32)), tensor(2, (), np.array(2, np.int32)),
                    tensor(3, (1, 5, 2, 3)), tensor(4, (1, 5, 4, 3)), tensor(5, (1, 5, 2, 3))]
        ops = [op_of(0, "SPLIT_V", [0, 1, 2], [3, 4]), op_of(1, "MUL", [3, 3], [5])]
        out_shape = (1, 5, 2, 3)
    elif case == "slice":
        tensors += [tensor(1, (4,), np.array([0, 1, 2, 0], np.int32)), tensor(2, (4,), np.array([1, 3, -1, 2], np.int32))]
        ops, out_shape = [op_of(0, "SLICE", [0, 1, 2], [3])], (1, 3, 4, 2)
    else:
        nearest = case == "nearest_align"
        ops = [op_of(0, "RESIZE_NEAREST_NEIGHBOR" if nearest else "RESIZE_BILINEAR", [0, 1], [2],
                     options={"alignCorners": True, "halfPixelCenters": False})]
        tensors.append(tensor(1, (2,), np.array([9, 13], np.int32)))
        out_shape = (1, 9, 13, 3)
    last = max(o for op in ops for o in op.outputs)
    tensors = [t for t in tensors if t.index != last] + [tensor(last, out_shape)]
    graph = tflite_graph.TfliteGraph(ops, sorted(tensors, key=lambda t: t.index), [0], [last], 0)
    values = _forward(graph, x)
    v = RNG.normal(size=values[last].shape)
    grads = backprop.vjp(graph, last, v, values.__getitem__, {0})
    d = RNG.normal(size=x.shape)
    fd = float(np.sum(v * (_forward(graph, x + 1e-6 * d)[last] - _forward(graph, x - 1e-6 * d)[last])) / 2e-6)
    assert np.sum(grads[0] * d) == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_an_op_still_without_a_rule_is_named():
    t = [tflite_graph.TensorInfo(i, f"t{i}", (1, 4), "float32", 0) for i in range(2)]
    graph = tflite_graph.TfliteGraph([tflite_graph.OpInfo(0, "GELU", [0], [1])], t, [0], [1], 0)
    with pytest.raises(backprop.Unsupported, match="GELU"):
        backprop.vjp(graph, 1, np.ones((1, 4)), lambda i: np.zeros((1, 4)), {0})


def test_several_seeds_sum_their_passes(head_model):
    """A model with several outputs is attributed to all of them at once: one walk from every seed
    equals the sum of one walk from each."""
    graph = tflite_graph.read(head_model)
    x = RNG.normal(size=(1, 8, 8, 4))
    values = _forward(graph, x)
    split = next(op for op in graph.ops if op.type == "SPLIT")
    seeds = {t: RNG.normal(size=values[t].shape) for t in split.outputs}
    wanted = {graph.inputs[0], split.inputs[1]}
    both = backprop.vjp(graph, seeds, None, values.__getitem__, wanted)
    each = [backprop.vjp(graph, t, v, values.__getitem__, wanted) for t, v in seeds.items()]
    for t in wanted:  # float32 sums in another order: an element near cancellation is off by ~eps of the largest
        summed = sum(e[t] for e in each)
        np.testing.assert_allclose(both[t], summed, rtol=1e-5, atol=1e-6 * np.abs(summed).max())
