"""Float kernels of the common fused TFLite ops in numpy (pure: arrays in, array out), and the window
geometry (TFLite SAME padding, strides, dilations) that ``backprop`` shares.

The kernels are the numpy twins of the TFLite ops the backward rules differentiate: the rules'
tests check them against finite differences of these kernels, and these kernels against TFLite's
own. (The analysis runs the real TFLite kernels, see ``kernel_model``.)
"""
from __future__ import annotations

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
