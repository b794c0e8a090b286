"""Float kernels of the common fused TFLite ops in numpy (pure: arrays in, array out), and the window
geometry (TFLite SAME padding, strides, dilations) that ``backprop`` shares.

The kernels are the numpy twins of the TFLite ops the backward rules differentiate: the rules'
tests check them against finite differences of these kernels, and these kernels against TFLite's
own. (The analysis runs the real TFLite kernels, see ``kernel_model``.)
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SAME, VALID = 0, 1
SUPPORTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "CONCATENATION")


def activation(y: np.ndarray, name: str | None) -> np.ndarray:
    if name in (None, "NONE"):
        return y
    if name == "RELU":
        return np.maximum(y, 0)
    if name == "RELU6":
        return np.clip(y, 0, 6)
    if name == "RELU_N1_TO_1":
        return np.clip(y, -1, 1)
    if name == "TANH":
        return np.tanh(y)
    raise NotImplementedError(name)


def pad_same_amounts(h: int, w: int, kh: int, kw: int, sh: int, sw: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """TFLite SAME padding ((top, bottom), (left, right)): the extra row/column goes at the end."""
    ph = max((-(-h // sh) - 1) * sh + kh - h, 0)
    pw = max((-(-w // sw) - 1) * sw + kw - w, 0)
    return (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)


def strides_dilations(options: dict) -> tuple[int, int, int, int]:
    """(stride H, stride W, dilation H, dilation W) of a windowed op."""
    return (options.get("strideH", 1), options.get("strideW", 1),
            options.get("dilationHFactor", 1), options.get("dilationWFactor", 1))


def window_padding(h: int, w: int, kh: int, kw: int, options: dict) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """((top, bottom), (left, right)) a windowed op pads an h×w input with (dilated kernel), None for VALID."""
    if options.get("padding", SAME) != SAME:
        return None
    sh, sw, dh, dw = strides_dilations(options)
    return pad_same_amounts(h, w, (kh - 1) * dh + 1, (kw - 1) * dw + 1, sh, sw)


def patches(x: np.ndarray, kh: int, kw: int, options: dict, pad_value: float = 0.0) -> np.ndarray:
    """(N, OH, OW, C, KH, KW) windows of an NHWC input, honouring stride, dilation and padding
    (filled with ``pad_value``)."""
    sh, sw, dh, dw = strides_dilations(options)
    if (pad := window_padding(x.shape[1], x.shape[2], kh, kw, options)) is not None:
        x = np.pad(x, ((0, 0), *pad, (0, 0)), constant_values=pad_value)
    # numpy 1.26's stubs type ``axis`` as one int; a tuple is documented and works.
    windows = sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))  # type: ignore[call-overload]
    return windows[:, ::sh, ::sw, :, ::dh, ::dw]


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, options: dict) -> np.ndarray:
    """x (N,H,W,I), w (O,KH,KW,I) -> (N,OH,OW,O)."""
    _, kh, kw, _ = w.shape
    if kh == kw == 1 and options.get("padding", SAME) in (SAME, VALID):
        x = x[:, :: options.get("strideH", 1), :: options.get("strideW", 1), :]
        y = (x.reshape(-1, x.shape[-1]) @ w[:, 0, 0, :].T).reshape(*x.shape[:-1], w.shape[0])
    else:
        y = np.einsum("nhwcij,oijc->nhwo", patches(x, kh, kw, options), w, optimize=True)
    return y if b is None else y + b


def depthwise_conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, options: dict) -> np.ndarray:
    """x (N,H,W,C), w (1,KH,KW,C*M) -> (N,OH,OW,C*M); output channel o reads input channel o // M."""
    _, kh, kw, out_c = w.shape
    mult = out_c // x.shape[3]
    p = patches(x, kh, kw, options)
    if mult > 1:
        p = np.repeat(p, mult, axis=3)
    y = np.einsum("nhwcij,ijc->nhwc", p, w[0])
    return y if b is None else y + b


def fully_connected(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = x.reshape(-1, w.shape[1]) @ w.T
    return y if b is None else y + b


def run(op_type: str, options: dict, inputs: list[np.ndarray], weight: np.ndarray | None, bias: np.ndarray | None,
        fused_activation: str | None, out_shape: tuple[int, ...]) -> np.ndarray | None:
    """The op's float output for these inputs, or None when the op has no reference kernel here."""
    if op_type == "CONV_2D" and weight is not None:
        y = conv2d(inputs[0], weight, bias, options)
    elif op_type == "DEPTHWISE_CONV_2D" and weight is not None:
        y = depthwise_conv2d(inputs[0], weight, bias, options)
    elif op_type == "FULLY_CONNECTED" and weight is not None:
        y = fully_connected(inputs[0], weight, bias)
    elif op_type == "ADD" and len(inputs) == 2:
        y = inputs[0] + inputs[1]
    elif op_type == "MUL" and len(inputs) == 2:
        y = inputs[0] * inputs[1]
    elif op_type == "CONCATENATION":
        y = np.concatenate(inputs, axis=options.get("axis", -1))
    else:
        return None
    try:
        return activation(y, fused_activation).reshape(out_shape)
    except NotImplementedError:
        return None


def strided_slice_index(in_shape: tuple[int, ...], begin: np.ndarray, end: np.ndarray, strides: np.ndarray,
                        options: dict) -> tuple[slice | int, ...]:
    """The numpy index of a TFLite STRIDED_SLICE (begin/end masks; a shrunk axis is an integer index).
    Ellipsis, new-axis and offset forms raise ValueError: no model here uses them."""
    if options.get("ellipsisMask", 0) or options.get("newAxisMask", 0) or options.get("offset", False):
        raise ValueError("STRIDED_SLICE with an ellipsis, a new axis or offsets")
    index: list[slice | int] = []
    for axis in range(len(in_shape)):
        if axis >= len(begin):
            index.append(slice(None))
            continue
        if options.get("shrinkAxisMask", 0) >> axis & 1:
            index.append(int(begin[axis]))
            continue
        start = None if options.get("beginMask", 0) >> axis & 1 else int(begin[axis])
        stop = None if options.get("endMask", 0) >> axis & 1 else int(end[axis])
        index.append(slice(start, stop, int(strides[axis])))
    return tuple(index)


def resize_matrix(in_size: int, out_size: int, align_corners: bool, half_pixel_centers: bool, nearest: bool) -> np.ndarray:
    """(out_size, in_size) weights of TFLite's RESIZE_NEAREST_NEIGHBOR / RESIZE_BILINEAR along one axis
    (the kernels' own index rules), so a resize is ``Ry @ x @ Rxᵀ`` per channel and its adjoint the transpose."""
    scale = (in_size - 1) / (out_size - 1) if align_corners and out_size > 1 else in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        if nearest:
            offset = 0.5 if half_pixel_centers else 0.0
            src = int(np.round((o + offset) * scale)) if align_corners else int(np.floor((o + offset) * scale))
            m[o, max(min(src, in_size - 1), 0)] = 1.0
            continue
        value = (o + 0.5) * scale - 0.5 if half_pixel_centers else o * scale
        low, high = max(int(np.floor(value)), 0), min(int(np.ceil(value)), in_size - 1)
        frac = value - low
        m[o, low] += 1 - frac
        m[o, high] += frac
    return m


def mirror_mode(options: dict) -> Literal["reflect", "symmetric"]:
    """numpy's name for a MIRROR_PAD's mode (TFLite's REFLECT = 0, SYMMETRIC = 1)."""
    return "symmetric" if options.get("mode", 0) == 1 else "reflect"


def mirror_index(size: int, before: int, after: int, mode: Literal["reflect", "symmetric"]) -> np.ndarray:
    """For each position of an axis mirror-padded by (before, after): the input index it copies."""
    return np.pad(np.arange(size), (before, after), mode=mode)


def hard_swish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x + 3, 0, 6) / 6


def softmax(x: np.ndarray, beta: float = 1.0) -> np.ndarray:
    z = np.exp(beta * (x - x.max(axis=-1, keepdims=True)))
    return z / z.sum(axis=-1, keepdims=True)


def pool_padded(x: np.ndarray, kh: int, kw: int, options: dict) -> np.ndarray:
    """A max pool's (N, OH, OW, C, KH, KW) windows, padding never winning."""
    return patches(x, kh, kw, options, pad_value=-np.inf)


def evaluate(op_type: str, options: dict, inputs: list[np.ndarray | None], constants: list[np.ndarray | None],
             out_shapes: list[tuple[int, ...]], fused_activation: str | None = None) -> list[np.ndarray] | None:
    """Every output of one op of the ops detector heads use, from its inputs in the op's order
    (``inputs[k]`` the activation value, ``constants[k]`` the constant, one of them set), batch first;
    None when there is no kernel here. The numpy twin the backward rules' tests differentiate."""
    a: list = [c if c is not None else v for v, c in zip(inputs, constants)]
    if op_type == "LOGISTIC":
        return [1 / (1 + np.exp(-a[0]))]
    if op_type == "TANH":
        return [np.tanh(a[0])]
    if op_type == "EXP":
        return [np.exp(a[0])]
    if op_type == "HARD_SWISH":
        return [hard_swish(a[0])]
    if op_type in ("LEAKY_RELU", "PRELU"):
        slope = options.get("alpha", 0.2) if op_type == "LEAKY_RELU" else a[1]
        return [np.where(a[0] >= 0, a[0], a[0] * slope)]
    if op_type == "SOFTMAX":
        return [softmax(a[0], options.get("beta", 1.0))]
    if op_type in ("MUL", "ADD", "SUB"):
        y = a[0] * a[1] if op_type == "MUL" else a[0] + a[1] if op_type == "ADD" else a[0] - a[1]
        return [activation(y, fused_activation)]
    if op_type == "TRANSPOSE":
        return [np.transpose(a[0], a[1])]
    if op_type in ("RESHAPE", "SQUEEZE", "EXPAND_DIMS"):
        same = a[0].size == int(np.prod(out_shapes[0]))
        return [a[0].reshape(out_shapes[0]) if same else a[0].reshape(a[0].shape[0], *out_shapes[0][1:])]
    if op_type == "STRIDED_SLICE":
        return [a[0][strided_slice_index(a[0].shape, a[1], a[2], a[3], options)]]
    if op_type == "SLICE":
        return [a[0][tuple(slice(int(b), None if s < 0 else int(b) + int(s)) for b, s in zip(a[1], a[2]))]]
    if op_type in ("PAD", "PADV2"):
        value = float(a[2].reshape(-1)[0]) if len(a) > 2 else 0.0
        return [np.pad(a[0], [tuple(int(p) for p in row) for row in a[1]], constant_values=value)]
    if op_type == "MIRROR_PAD":
        return [np.pad(a[0], [tuple(int(p) for p in row) for row in a[1]], mode=mirror_mode(options))]
    if op_type in ("RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR"):
        (oh, ow), nearest = out_shapes[0][1:3], op_type == "RESIZE_NEAREST_NEIGHBOR"
        flags = options.get("alignCorners", False), options.get("halfPixelCenters", False)
        ry, rx = resize_matrix(a[0].shape[1], oh, *flags, nearest), resize_matrix(a[0].shape[2], ow, *flags, nearest)
        return [np.einsum("oh,nhwc,pw->nopc", ry, a[0], rx)]
    if op_type == "SPLIT":
        return list(np.split(a[1], len(out_shapes), axis=int(a[0].reshape(-1)[0])))
    if op_type == "SPLIT_V":
        return list(np.split(a[0], np.cumsum(a[1])[:-1], axis=int(a[2].reshape(-1)[0])))
    if op_type == "CONCATENATION":
        return [activation(np.concatenate(a, axis=options.get("axis", -1)), fused_activation)]
    if op_type == "MAX_POOL_2D":
        return [pool_padded(a[0], options["filterHeight"], options["filterWidth"], options).max(axis=(-1, -2))]
    return None
