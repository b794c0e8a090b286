"""Vector-Jacobian products through a float TFLite graph, in numpy (pure: graph and arrays in, arrays out).

The analysis measures the error each layer adds on its own input (its local error). What the model's
output gains when that error is removed depends on everything after the layer: a ReLU may cut it, a wide
1×1 conv may amplify it, a residual Add may dilute it. One backward pass from a probe vector at the
logits, linearised around the activations of one run (ReLU masks, max-pool routing), tells for every
layer at once how its output maps onto that probe — so the output error caused by each layer's local
error can be estimated without one model run per layer. The rules compute in float32, as the models do.

Ops without a rule here stop the pass for what lies before them (:class:`Unsupported`).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import numpy as np

from quantune_edge.analyze.grad.reference_ops import VALID, mirror_index, mirror_mode, patches, resize_matrix, strided_slice_index, strides_dilations, window_padding
from quantune_edge.model.tflite_graph import OpInfo, TfliteGraph

G = TypeVar("G")  # a gradient: an array, or a tensor of a model being written
K = TypeVar("K", bound=Hashable)

SUPPORTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MEAN", "MAX_POOL_2D", "AVERAGE_POOL_2D",
             "CONCATENATION", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "LOGISTIC", "TANH", "EXP", "HARD_SWISH", "SOFTMAX", "MUL", "SUB",
             "TRANSPOSE", "STRIDED_SLICE", "SLICE", "PAD", "PADV2", "RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR", "SPLIT", "SPLIT_V",
             "LEAKY_RELU", "PRELU", "MIRROR_PAD")


class Unsupported(ValueError):
    """An op on the backward path that has no vector-Jacobian rule here."""


_DERIVATIVES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "RELU": lambda y: y > 0,
    "RELU6": lambda y: (y > 0) & (y < 6),
    "RELU_N1_TO_1": lambda y: (y > -1) & (y < 1),
    "TANH": lambda y: 1 - y * y,
}


def has_mask(name: str | None) -> bool:
    """Whether a fused activation multiplies the gradient by a mask; raises Unsupported for one without a rule."""
    if name in (None, "NONE"):
        return False
    if name not in _DERIVATIVES:
        raise Unsupported(f"fused activation {name}")
    return True


def activation_mask(y: np.ndarray, name: str | None) -> np.ndarray | None:
    """Derivative of the fused activation at its float output ``y`` (None = identity)."""
    return _DERIVATIVES[name](y).astype(np.float32) if has_mask(name) else None


def _accumulate_taps(tap: Callable[[int, int], np.ndarray], out_shape: tuple[int, ...], in_shape: tuple[int, ...],
                     kh: int, kw: int, options: dict) -> np.ndarray:
    """Sum over kernel taps (i, j) of ``tap(i, j)`` (N, OH, OW, C), each added to the input pixels it
    read (strided, dilated, padding cropped): the input gradient of any windowed op, one tap at a time."""
    n, oh, ow = out_shape[:3]
    sh, sw, dh, dw = strides_dilations(options)
    (top, bottom), (left, right) = window_padding(*in_shape[1:3], kh, kw, options) or ((0, 0), (0, 0))
    gx = np.zeros((n, in_shape[1] + top + bottom, in_shape[2] + left + right, in_shape[3]), np.float32)
    for i in range(kh):
        for j in range(kw):
            gx[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw, :] += tap(i, j)
    return gx[:, top: top + in_shape[1], left: left + in_shape[2], :]


def _matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(..., K) @ (K, M) as one 2-D BLAS call (a 4-D @ runs one small product per image row)."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[1])


def _conv_input_grad(g: np.ndarray, w: np.ndarray, in_shape: tuple[int, ...], options: dict) -> np.ndarray:
    out_c, kh, kw, in_c = w.shape
    if kh == kw == 1 and options.get("strideH", 1) == options.get("strideW", 1) == 1:
        return _matmul(g, w[:, 0, 0, :]).reshape(in_shape)
    # One GEMM to every tap's contribution (a wide product runs far faster than kh·kw narrow ones).
    cols = _matmul(g, w.reshape(out_c, kh * kw * in_c)).reshape(*g.shape[:3], kh, kw, in_c)
    return _accumulate_taps(lambda i, j: cols[..., i, j, :], g.shape, in_shape, kh, kw, options)


def _transposed_windows(g: np.ndarray, in_shape: tuple[int, ...], kh: int, kw: int, options: dict) -> np.ndarray:
    """(N, H, W, C, KH, KW) windows over ``g`` such that a windowed op's input gradient is their
    correlation with the kernel flipped in both axes: ``g`` spread out by the stride, framed so every
    input pixel sees the outputs that read it (the adjoint as a forward correlation, which numpy's
    einsum runs faster than kh·kw scattered adds)."""
    n, oh, ow, c = g.shape
    sh, sw, dh, dw = strides_dilations(options)
    (top, _), (left, _) = window_padding(*in_shape[1:3], kh, kw, options) or ((0, 0), (0, 0))
    reach_h, reach_w = (kh - 1) * dh, (kw - 1) * dw
    rows = max(reach_h + (oh - 1) * sh + 1, top + in_shape[1] + reach_h)
    cols = max(reach_w + (ow - 1) * sw + 1, left + in_shape[2] + reach_w)
    spread = np.zeros((n, rows, cols, c), np.float32)
    spread[:, reach_h: reach_h + (oh - 1) * sh + 1: sh, reach_w: reach_w + (ow - 1) * sw + 1: sw] = g
    frame = spread[:, top: top + in_shape[1] + reach_h, left: left + in_shape[2] + reach_w]
    return patches(frame, kh, kw, {"padding": VALID, "dilationHFactor": dh, "dilationWFactor": dw})


def _depthwise_input_grad(g: np.ndarray, w: np.ndarray, in_shape: tuple[int, ...], options: dict) -> np.ndarray:
    """Output channel o reads input channel o // M (depth multiplier M), so its gradient goes back there."""
    _, kh, kw, out_c = w.shape
    in_c = in_shape[3]
    windows = _transposed_windows(g, in_shape, kh, kw, options)
    grouped = windows.reshape(*windows.shape[:3], in_c, out_c // in_c, kh, kw)
    return np.einsum("nhwcmij,ijcm->nhwc", grouped, w[0, ::-1, ::-1].reshape(kh, kw, in_c, -1))


def max_pool_routes(x: np.ndarray, options: dict) -> dict[tuple[int, int], np.ndarray]:
    """Per kernel tap (i, j): which outputs took their value from that tap — each window's (first)
    maximum, as the float op picks it."""
    kh, kw = options["filterHeight"], options["filterWidth"]
    windows = patches(x, kh, kw, options, pad_value=-np.inf)
    peak = windows.max(axis=(-2, -1))
    taken = np.zeros(peak.shape, bool)
    routes = {}
    for i in range(kh):
        for j in range(kw):
            hit = (windows[..., i, j] == peak) & ~taken
            taken |= hit
            routes[i, j] = hit
    return routes


def _max_pool_input_grad(g: np.ndarray, x: np.ndarray, options: dict) -> np.ndarray:
    """Route each window's gradient to the window's maximum; tap by tap, without materialising the windows."""
    routes = max_pool_routes(x, options)
    kh, kw = options["filterHeight"], options["filterWidth"]
    return _accumulate_taps(lambda i, j: g * routes[i, j], g.shape, x.shape, kh, kw, options)


def _input_grads(op: OpInfo, graph: TfliteGraph, g: np.ndarray, value: Callable[[int], np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """(input tensor, gradient) pairs for the activation inputs of ``op``, given the gradient at its output."""
    t = graph.tensors
    acts = [i for i in op.inputs if i >= 0 and not t[i].is_constant]
    probes = g.shape[0] if isinstance(g, np.ndarray) else g_probes(g)
    whole = _whole(g, [t[o].shape for o in op.outputs])

    def shape_of(i: int) -> tuple[int, ...]:
        return t[i].shape if whole else (probes, *t[i].shape[1:])

    if op.type == "CONV_2D":
        return [(acts[0], _conv_input_grad(g, t[op.inputs[1]].data.astype(np.float32), shape_of(acts[0]), op.options))]
    if op.type == "DEPTHWISE_CONV_2D":
        return [(acts[0], _depthwise_input_grad(g, t[op.inputs[1]].data.astype(np.float32), shape_of(acts[0]), op.options))]
    if op.type == "FULLY_CONNECTED":
        w = t[op.inputs[1]].data.astype(np.float32)
        return [(acts[0], _matmul(g.reshape(-1, w.shape[0]), w).reshape(shape_of(acts[0])))]
    if op.type == "ADD":
        return [(i, _unbroadcast(g, shape_of(i))) for i in acts]
    if op.type in ("RESHAPE", "SQUEEZE"):
        return [(acts[0], g.reshape(shape_of(acts[0])))]
    if op.type == "MEAN":
        axes = tuple(int(a) % len(t[acts[0]].shape) for a in np.atleast_1d(t[op.inputs[1]].data))
        shape = shape_of(acts[0])
        count = int(np.prod([shape[a] for a in axes]))
        keep = [1 if a in axes else s for a, s in enumerate(shape)]
        return [(acts[0], np.broadcast_to(g.reshape(keep) / count, shape).astype(np.float32))]
    if op.type == "AVERAGE_POOL_2D":
        kh, kw = op.options["filterHeight"], op.options["filterWidth"]
        return [(acts[0], _avg_pool_input_grad(g, shape_of(acts[0]), kh, kw, op.options))]
    if op.type == "MAX_POOL_2D":
        return [(acts[0], _max_pool_input_grad(g, np.broadcast_to(value(acts[0]), shape_of(acts[0])), op.options))]
    if op.type == "CONCATENATION":
        axis = op.options.get("axis", -1) % len(t[op.outputs[0]].shape)
        sizes = [t[i].shape[axis] for i in op.inputs]
        parts = np.split(g, np.cumsum(sizes)[:-1], axis=axis)
        return [(i, p) for i, p in zip(op.inputs, parts) if not t[i].is_constant]
    return _detector_input_grads(op, graph, g, value, shape_of, acts, whole)


def _constant(graph: TfliteGraph, op: OpInfo, position: int) -> np.ndarray:
    data = graph.tensors[op.inputs[position]].data
    if data is None:
        raise Unsupported(f"{op.type} whose input {position} is not a constant")
    return data


def _whole(g, out_shapes: list[tuple[int, ...]]) -> bool:
    """Whether the gradient has the op's own output shapes (one probe): then tensors without a batch
    axis (NanoDet-m's [1600, 80] outputs) and ops across axis 0 have rules too."""
    parts = g if isinstance(g, list) else [g]
    return all(p is None or p.shape == tuple(s) for p, s in zip(parts, out_shapes))


def _detector_input_grads(op: OpInfo, graph: TfliteGraph, g, value: Callable[[int], np.ndarray],
                          shape_of: Callable[[int], tuple[int, ...]], acts: list[int], whole: bool) -> list[tuple[int, np.ndarray]]:
    """The rules for what detector heads and modern backbones add: element-wise activations (their
    derivative at the run's value), products of two activations (SiLU's x·σ(x)), data movement
    (transposes, slices, pads, splits, resizes: the adjoint index map), softmax."""
    t = graph.tensors
    y = (lambda: value(op.outputs[0]))  # noqa: E731
    if op.type == "LOGISTIC":
        return [(acts[0], g * (y() * (1 - y())))]
    if op.type == "TANH":
        return [(acts[0], g * (1 - y() * y()))]
    if op.type == "EXP":
        return [(acts[0], g * y())]
    if op.type in ("LEAKY_RELU", "PRELU"):
        x = value(acts[0])
        slope = np.float32(op.options.get("alpha", 0.2)) if op.type == "LEAKY_RELU" else _constant(graph, op, 1).astype(np.float32)
        return [(acts[0], (g * np.where(x >= 0, np.float32(1), slope)).astype(np.float32))]
    if op.type == "HARD_SWISH":
        x = value(acts[0])
        return [(acts[0], g * np.where(x < -3, 0.0, np.where(x > 3, 1.0, (2 * x + 3) / 6)).astype(np.float32))]
    if op.type == "SOFTMAX":
        s = y() * op.options.get("beta", 1.0)
        return [(acts[0], (s * (g - np.sum(g * y(), axis=-1, keepdims=True))).astype(np.float32))]
    if op.type in ("MUL", "SUB"):
        out = []
        for pos, i in enumerate(op.inputs):
            if i < 0 or t[i].is_constant:
                continue
            if op.type == "SUB":
                gi = g if pos == 0 else -g
            else:
                other = op.inputs[1 - pos]
                gi = g * (t[other].data.astype(np.float32) if t[other].is_constant else value(other))
            out.append((i, _unbroadcast(gi, shape_of(i))))
        return out
    if op.type == "EXPAND_DIMS":
        return [(acts[0], g.reshape(shape_of(acts[0])))]
    if op.type == "TRANSPOSE":
        perm = [int(p) for p in _constant(graph, op, 1)]
        if perm[0] != 0 and not whole:
            raise Unsupported("TRANSPOSE that moves the batch axis")
        return [(acts[0], np.ascontiguousarray(g.transpose(np.argsort(perm))))]
    if op.type in ("STRIDED_SLICE", "SLICE"):
        shape = shape_of(acts[0])
        if op.type == "STRIDED_SLICE":
            try:
                index = strided_slice_index(shape, *(_constant(graph, op, k) for k in (1, 2, 3)), op.options)
            except ValueError as exc:
                raise Unsupported(str(exc)) from None
        else:
            begin, size = _constant(graph, op, 1), _constant(graph, op, 2)
            index = tuple(slice(int(b), None if s < 0 else int(b) + int(s)) for b, s in zip(begin, size))
        batch = t[acts[0]].shape[0]
        if not whole and (not isinstance(index[0], slice) or range(batch)[index[0]] != range(batch)):
            raise Unsupported(f"{op.type} along the batch axis")
        gx = np.zeros(shape, np.float32)
        view = gx[index if whole else (slice(None), *index[1:])]
        view += g.reshape(view.shape)
        return [(acts[0], gx)]
    if op.type in ("PAD", "PADV2"):
        pads = _constant(graph, op, 1).reshape(-1, 2)
        if pads[0].any() and not whole:
            raise Unsupported("PAD along the batch axis")
        return [(acts[0], np.ascontiguousarray(g[tuple(slice(int(b), g.shape[a] - int(e)) for a, (b, e) in enumerate(pads))]))]
    if op.type == "MIRROR_PAD":  # each padded position copies an input one: add its gradient back there
        pads, gx = _constant(graph, op, 1).reshape(-1, 2), g
        if pads[0].any() and not whole:
            raise Unsupported("MIRROR_PAD along the batch axis")
        for axis, (before, after) in enumerate(pads):
            if before or after:
                index = mirror_index(shape_of(acts[0])[axis], int(before), int(after), mirror_mode(op.options))
                folded = np.zeros((*gx.shape[:axis], shape_of(acts[0])[axis], *gx.shape[axis + 1:]), np.float32)
                np.add.at(folded, (slice(None),) * axis + (index,), gx)
                gx = folded
        return [(acts[0], gx)]
    if op.type in ("RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR"):
        shape = shape_of(acts[0])
        flags = bool(op.options.get("alignCorners", False)), bool(op.options.get("halfPixelCenters", False))
        nearest = op.type == "RESIZE_NEAREST_NEIGHBOR"
        ry = resize_matrix(shape[1], g.shape[1], *flags, nearest).astype(np.float32)
        rx = resize_matrix(shape[2], g.shape[2], *flags, nearest).astype(np.float32)
        return [(acts[0], np.einsum("oh,nopc,pw->nhwc", ry, g, rx, optimize=True))]
    if op.type in ("SPLIT", "SPLIT_V"):
        source = op.inputs[1] if op.type == "SPLIT" else op.inputs[0]
        axis = int(_constant(graph, op, 0 if op.type == "SPLIT" else 2).reshape(-1)[0]) % len(t[source].shape)
        parts = [np.zeros((g_probes(g), *t[o].shape[1:]), np.float32) if p is None else p for o, p in zip(op.outputs, g)]
        return [(source, np.concatenate(parts, axis=axis))]
    raise Unsupported(op.type)


def g_probes(g: list) -> int:
    """The number of probes of a multi-output op's gradients (a list, None where an output got none)."""
    return next(p.shape[0] for p in g if p is not None)


def _avg_pool_input_grad(g: np.ndarray, in_shape: tuple[int, ...], kh: int, kw: int, options: dict) -> np.ndarray:
    """TFLite's average pool divides by the number of in-bounds pixels of each window; every tap
    of a window gets the same share."""
    valid = patches(np.ones((1, *in_shape[1:3], 1), np.float32), kh, kw, options).sum(axis=(-1, -2))
    share = g / valid
    return _accumulate_taps(lambda i, j: share, g.shape, in_shape, kh, kw, options)


def _unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``g`` over the axes an operand of ``shape`` was broadcast along."""
    if g.shape == shape:
        return g
    axes = tuple(a for a, (gs, s) in enumerate(zip(g.shape, shape)) if s == 1 and gs != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def walk_backward(graph: TfliteGraph, seeds: dict[int, G], wanted: set[int], masked: Callable[[OpInfo, G], G],
                  input_grads: Callable[[OpInfo, G], list[tuple[int, G]]], add: Callable[[G, G], G]) -> dict[int, G]:
    """The reverse walk every backward pass takes, whatever a gradient is (a numpy array here, a tensor
    of the TFLite model being written in ``adjoint_model``): each seed at its tensor (a model with several
    outputs seeds each; a seed on a tensor another seed's walk reaches is added to it), each op's output
    gradient recorded if wanted, passed through its fused activation (``masked``), then to its inputs
    (``input_grads``), summed (``add``) where a tensor feeds several ops. Ops after ``start`` are
    ignored; returns the wanted tensors reached."""
    grads: dict[int, G] = dict(seeds)
    out: dict[int, G] = {}
    for op in reversed(graph.ops):
        if len(op.outputs) > 1:  # SPLIT: the list of its outputs' gradients, None for one that got none
            parts = [grads.pop(t, None) for t in op.outputs]
            out.update({t: p for t, p in zip(op.outputs, parts) if p is not None and t in wanted})
            if all(p is None for p in parts):
                continue
            g: G | list = parts
        else:
            g = grads.pop(op.outputs[0], None)
            if g is None:
                continue
            if op.outputs[0] in wanted:
                out[op.outputs[0]] = g
            g = masked(op, g)
        if all(i in graph.inputs and i not in wanted for i in op.inputs if i >= 0 and not graph.tensors[i].is_constant):
            continue  # reads only the model input, which nobody asked for: the costliest rule, skipped
        for tensor, gi in input_grads(op, g):
            grads[tensor] = add(grads[tensor], gi) if tensor in grads else gi
    out.update({t: g for t, g in grads.items() if t in wanted})  # graph inputs: produced by no op
    return out


def vjp(graph: TfliteGraph, start: int | dict[int, np.ndarray], probes: np.ndarray | None, value: Callable[[int], np.ndarray],
        wanted: set[int]) -> dict[int, np.ndarray]:
    """Backward pass of ``probes`` (P, *shape of tensor ``start``) to every tensor in ``wanted`` (or, with
    ``start`` a dict, of each tensor's probes at once: the sum of their passes).

    ``value(t)`` is tensor t's (dequantized) value in the run being linearised (batch 1); it is read for
    activation masks and max-pool routing. Returns tensor -> (P, *shape) gradient for the wanted
    tensors the pass reached. Ops after ``start`` are ignored; ops before it must be in
    :data:`SUPPORTED` or the pass raises :class:`Unsupported`.
    """
    def masked(op: OpInfo, g: np.ndarray) -> np.ndarray:
        mask = activation_mask(value(op.outputs[0]), op.fused_activation)
        return g if mask is None else g * mask

    seeds = start if isinstance(start, dict) else {start: probes}
    return walk_backward(graph, {t: np.asarray(p, np.float32) for t, p in seeds.items()}, wanted, masked,
                         lambda op, g: _input_grads(op, graph, g, value), np.add)


def output_error_attribution(back: dict[int, np.ndarray], removable: Mapping[K, list[tuple[int, np.ndarray]]]) -> dict[K, float]:
    """How much of ||residual||² each layer's removable error accounts for, to first order, all layers at once.

    ``back`` holds Jᵀr at every layer's float tensor: one backward pass (:func:`vjp`, or its TFLite
    form in ``adjoint_model``) of the int8 model's logit error r (int8 − float) on one sample.
    ``removable`` maps a layer to the errors e that keeping it float would remove, at each float tensor
    it writes (one for an op; each exit of a group of ops). Through the Jacobian J from there to the
    logits, e shows up as J·e, and r·J·e = (Jᵀr)·e. Removing e lowers ||r||² by 2·r·J·e − ||J·e||²;
    when the layers' errors are independent r·J·e ≈ ||J·e||², so r·J·e alone ranks layers as that
    drop does, without the one pass per layer ||J·e||² would need. A layer whose tensors the pass did
    not reach gets no share.
    """
    return {key: float(sum(np.vdot(back[t], e) for t, e in pairs)) for key, pairs in removable.items()
            if pairs and all(t in back for t, _ in pairs)}
