"""The backward pass of a float TFLite graph, written as a TFLite model of its own.

``backprop`` states the vector-Jacobian rules in numpy, which runs them several times slower than
XNNPACK runs the same work. Every rule the common mobile nets need is itself a TFLite op:
- a conv's input gradient is a conv (a depthwise conv's, a depthwise conv) with the kernel flipped,
  over the gradient spread out by the stride (zeros interleaved by DEPTH_TO_SPACE);
- a fully-connected layer's is one with the weights transposed;
- a max pool's is each kernel tap's routed gradient, shifted into place on the coarse grid and
  interleaved;
- ADD / RESHAPE / MEAN / CONCATENATION become copies, sums, scaled broadcasts and splits.
What depends on the run being linearised (activation masks, max-pool routes) is fed per sample as
model inputs. Graphs with an op outside these rules (unequal strides, depth multipliers, non-global
average pools) raise :class:`backprop.Unsupported`; the caller then runs the numpy rules, which
cover them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantune_edge.analyze.grad.backprop import Unsupported, activation_mask, has_mask, max_pool_routes, vjp, walk_backward
from quantune_edge.analyze.grad.reference_ops import VALID, strides_dilations, window_padding
from quantune_edge.model.tflite_graph import OpInfo, TfliteGraph, operator_code


@dataclass
class AdjointModel:
    """``probe``: the input fed the vector at the start tensor; ``masks``: (model input, float tensor,
    fused activation) — each input is fed that activation's derivative at the tensor's value;
    ``routes``: per max pool, (tap -> model input, the pool's input tensor, pool options) — each fed
    the tap's route mask at that value; ``gradients``: wanted float tensor -> the model tensor holding
    its gradient."""

    content: bytes
    probe: int
    masks: list[tuple[int, int, str]]
    routes: list[tuple[dict[tuple[int, int], int], int, dict]]
    gradients: dict[int, int]


class _Writer:
    """A TFLite model being written with the flatbuffer object API."""

    def __init__(self) -> None:
        from ai_edge_litert import schema_py_generated as schema

        self.schema = schema
        self.buffers = [schema.BufferT()]  # buffer 0: empty, for every non-constant tensor
        self.tensors: list = []
        self.shapes: list[tuple[int, ...]] = []
        self.ops: list = []
        self.codes: dict[int, int] = {}
        self.inputs: list[int] = []

    def tensor(self, shape: tuple[int, ...], name: str, data: np.ndarray | None = None, dtype: str = "FLOAT32") -> int:
        t = self.schema.TensorT()
        t.shape, t.name, t.type, t.buffer = np.asarray(shape, np.int32), name.encode(), getattr(self.schema.TensorType, dtype), 0
        if data is not None:
            buf = self.schema.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        self.shapes.append(tuple(int(s) for s in shape))
        return len(self.tensors) - 1

    def const(self, array: np.ndarray, name: str) -> int:
        array = np.asarray(array)
        dtype = "INT32" if array.dtype.kind in "iu" else "FLOAT32"
        array = array.astype(np.int32 if dtype == "INT32" else np.float32)
        return self.tensor(array.shape, name, array, dtype)

    def input(self, shape: tuple[int, ...], name: str) -> int:
        self.inputs.append(self.tensor(shape, name))
        return self.inputs[-1]

    def op(self, kind: str, inputs: list[int], out_shapes: list[tuple[int, ...]], options: str | None = None, **fields) -> list[int]:
        schema = self.schema
        code = getattr(schema.BuiltinOperator, kind)
        if code not in self.codes:
            self.codes[code] = len(self.codes)
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs = self.codes[code], np.asarray(inputs, np.int32)
        outs = [self.tensor(s, f"{kind.lower()}_{len(self.ops)}_{k}") for k, s in enumerate(out_shapes)]
        op.outputs = np.asarray(outs, np.int32)
        if options:
            opts = getattr(schema, options + "T")()
            for key, value in fields.items():
                setattr(opts, key, value)
            op.builtinOptionsType, op.builtinOptions = getattr(schema.BuiltinOptions, options), opts
        self.ops.append(op)
        return outs

    def finish(self, outputs: list[int]) -> bytes:
        import flatbuffers

        schema = self.schema
        codes = [operator_code(code, 1) for code in sorted(self.codes, key=self.codes.get)]
        graph = schema.SubGraphT()
        graph.tensors, graph.operators = self.tensors, self.ops
        graph.inputs, graph.outputs = np.asarray(self.inputs, np.int32), np.asarray(outputs, np.int32)
        model = schema.ModelT()
        model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, codes, [graph], self.buffers
        model.description = b"quantune-edge adjoint"
        builder = flatbuffers.Builder(sum(len(b.data) for b in self.buffers if b.data is not None) + 65536)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _correlation_frame(w: _Writer, op: OpInfo, g: int, in_shape: tuple[int, ...], kh: int, kw: int) -> int:
    """The gradient of a windowed op spread by its stride and framed so that a VALID, stride-1
    correlation with the flipped kernel yields the input gradient (as ``backprop._transposed_windows``
    frames it)."""
    sh, sw, dh, dw = strides_dilations(op.options)
    if sh != sw:
        raise Unsupported(f"{op.type} with unequal strides")
    (top, _), (left, _) = window_padding(*in_shape[1:3], kh, kw, op.options) or ((0, 0), (0, 0))
    reach_h, reach_w = (kh - 1) * dh, (kw - 1) * dw
    return _place(w, _spread(w, g, sh), (reach_h - top, reach_w - left), (in_shape[1] + reach_h, in_shape[2] + reach_w))


def _conv(w: _Writer, op: OpInfo, graph: TfliteGraph, g: int, in_shape: tuple[int, ...]) -> int:
    """The transposed conv as a plain one (measured faster here than TRANSPOSE_CONV): the framed
    gradient correlated with the kernel flipped and its channel axes swapped."""
    weight = graph.tensors[op.inputs[1]].data.astype(np.float32)  # (O, KH, KW, I)
    _, kh, kw, in_c = weight.shape
    g = _correlation_frame(w, op, g, in_shape, kh, kw)
    _, _, dh, dw = strides_dilations(op.options)
    kernel = w.const(np.ascontiguousarray(weight.transpose(3, 1, 2, 0)[:, ::-1, ::-1, :]), f"w_flip_{op.index}")  # (I, KH, KW, O)
    zero_bias = w.const(np.zeros(in_c, np.float32), f"zero_bias_{len(w.ops)}")
    return w.op("CONV_2D", [g, kernel, zero_bias], [in_shape], "Conv2DOptions", padding=VALID, strideW=1, strideH=1,
                dilationWFactor=dw, dilationHFactor=dh)[0]


def _depthwise(w: _Writer, op: OpInfo, graph: TfliteGraph, g: int, in_shape: tuple[int, ...]) -> int:
    """The framed gradient correlated, channel by channel, with the flipped kernel."""
    weight = graph.tensors[op.inputs[1]].data.astype(np.float32)  # (1, KH, KW, C·M)
    _, kh, kw, out_c = weight.shape
    in_c = in_shape[3]
    if out_c != in_c:
        raise Unsupported("DEPTHWISE_CONV_2D with a depth multiplier")
    g = _correlation_frame(w, op, g, in_shape, kh, kw)
    _, _, dh, dw = strides_dilations(op.options)
    kernel = w.const(np.ascontiguousarray(weight[:, ::-1, ::-1, :]), f"w_flip_{op.index}")
    zero_bias = w.const(np.zeros(in_c, np.float32), f"zero_bias_{len(w.ops)}")
    return w.op("DEPTHWISE_CONV_2D", [g, kernel, zero_bias], [in_shape], "DepthwiseConv2DOptions", padding=VALID,
                strideW=1, strideH=1, depthMultiplier=1, dilationWFactor=dw, dilationHFactor=dh)[0]


def _reshape(w: _Writer, g: int, shape: tuple[int, ...]) -> int:
    if w.shapes[g] == tuple(shape):
        return g
    return w.op("RESHAPE", [g, w.const(np.asarray(shape, np.int32), f"shape_{len(w.ops)}")], [tuple(shape)],
                "ReshapeOptions", newShape=np.asarray(shape, np.int32))[0]


def _spread(w: _Writer, g: int, stride: int) -> int:
    """(1, H, W, C) -> (1, s·H, s·W, C) with g at every s-th row and column, zeros between."""
    if stride == 1:
        return g
    _, h, wd, c = w.shapes[g]
    zeros = w.const(np.zeros((1, h, wd, c * (stride * stride - 1)), np.float32), f"spread_zeros_{len(w.ops)}")
    wide = w.op("CONCATENATION", [g, zeros], [(1, h, wd, c * stride * stride)], "ConcatenationOptions", axis=3)[0]
    return w.op("DEPTH_TO_SPACE", [wide], [(1, h * stride, wd * stride, c)], "DepthToSpaceOptions", blockSize=stride)[0]


def _place(w: _Writer, g: int, offset: tuple[int, int], size: tuple[int, int]) -> int:
    """g shifted down/right by ``offset`` in a zero (1, *size, C) frame; what falls past the frame's
    end is cut (the callers only cut zeros of a spread)."""
    _, h, wd, c = w.shapes[g]
    after = (size[0] - offset[0] - h, size[1] - offset[1] - wd)
    if min(after) < 0:
        keep = (h + min(after[0], 0), wd + min(after[1], 0))
        g = w.op("SLICE", [g, w.const(np.zeros(4, np.int32), f"begin_{len(w.ops)}"),
                           w.const(np.asarray([1, *keep, c], np.int32), f"size_{len(w.ops)}")], [(1, *keep, c)])[0]
        after = (max(after[0], 0), max(after[1], 0))
    if any(offset) or any(after):
        pads = np.asarray([[0, 0], [offset[0], after[0]], [offset[1], after[1]], [0, 0]], np.int32)
        g = w.op("PAD", [g, w.const(pads, f"pads_{len(w.ops)}")], [(1, *size, c)], "PadOptions")[0]
    return g


def _max_pool(w: _Writer, op: OpInfo, g: int, in_shape: tuple[int, ...], x: int, routes: list) -> int:
    """Each tap's routed gradient (route masks fed per sample) lands at row i + s·y of the padded input.
    Taps of one stride phase (i mod s, j mod s) are summed on the coarse output grid, shifted by
    (i // s, j // s); DEPTH_TO_SPACE interleaves the s² phase sums; the padding is cut off last."""
    kh, kw = op.options["filterHeight"], op.options["filterWidth"]
    s, sw, _, _ = strides_dilations(op.options)
    if s != sw:
        raise Unsupported("MAX_POOL_2D with unequal strides")
    (top, bottom), (left, right) = window_padding(*in_shape[1:3], kh, kw, op.options) or ((0, 0), (0, 0))
    coarse = (-(-(in_shape[1] + top + bottom) // s), -(-(in_shape[2] + left + right) // s))
    c = in_shape[3]
    taps, phases = {}, []
    for pi in range(s):
        for pj in range(s):
            total = None
            for i in range(pi, kh, s):
                for j in range(pj, kw, s):
                    taps[i, j] = w.input(w.shapes[g], f"route_{op.index}_{i}_{j}")
                    routed = w.op("MUL", [g, taps[i, j]], [w.shapes[g]], "MulOptions")[0]
                    placed = _place(w, routed, (i // s, j // s), coarse)
                    total = placed if total is None else w.op("ADD", [total, placed], [w.shapes[placed]], "AddOptions")[0]
            phases.append(total if total is not None else w.const(np.zeros((1, *coarse, c), np.float32), f"no_tap_{len(w.ops)}"))
    routes.append((taps, x, op.options))
    fine = phases[0]
    if s > 1:
        wide = w.op("CONCATENATION", phases, [(1, *coarse, c * s * s)], "ConcatenationOptions", axis=3)[0]
        fine = w.op("DEPTH_TO_SPACE", [wide], [(1, coarse[0] * s, coarse[1] * s, c)], "DepthToSpaceOptions", blockSize=s)[0]
    if w.shapes[fine] == tuple(in_shape):
        return fine
    return w.op("SLICE", [fine, w.const(np.asarray([0, top, left, 0], np.int32), f"begin_{len(w.ops)}"),
                          w.const(np.asarray(in_shape, np.int32), f"size_{len(w.ops)}")], [tuple(in_shape)])[0]


def _input_grads(w: _Writer, op: OpInfo, graph: TfliteGraph, g: int, routes: list) -> list[tuple[int, int]]:
    t = graph.tensors
    acts = [i for i in op.inputs if i >= 0 and not t[i].is_constant]
    if op.type == "MAX_POOL_2D":
        return [(acts[0], _max_pool(w, op, g, t[acts[0]].shape, acts[0], routes))]
    if op.type == "CONV_2D":
        return [(acts[0], _conv(w, op, graph, g, t[acts[0]].shape))]
    if op.type == "DEPTHWISE_CONV_2D":
        return [(acts[0], _depthwise(w, op, graph, g, t[acts[0]].shape))]
    if op.type == "FULLY_CONNECTED":
        weight = t[op.inputs[1]].data.astype(np.float32)  # (O, I)
        flat = _reshape(w, g, (1, weight.shape[0]))
        kernel = w.const(np.ascontiguousarray(weight.T), f"w_t_{op.index}")
        zero_bias = w.const(np.zeros(weight.shape[1], np.float32), f"zero_bias_{len(w.ops)}")
        gx = w.op("FULLY_CONNECTED", [flat, kernel, zero_bias], [(1, weight.shape[1])], "FullyConnectedOptions")[0]
        return [(acts[0], _reshape(w, gx, t[acts[0]].shape))]
    if op.type == "ADD":
        out = []
        for i in acts:
            shape = t[i].shape
            axes = [a for a, (gs, s) in enumerate(zip(w.shapes[g], shape)) if s == 1 and gs != 1]
            gi = g
            if axes:
                summed = tuple(1 if a in axes else s for a, s in enumerate(w.shapes[g]))
                gi = w.op("SUM", [g, w.const(np.asarray(axes, np.int32), f"axes_{len(w.ops)}")], [summed], "ReducerOptions", keepDims=True)[0]
            out.append((i, _reshape(w, gi, shape)))
        return out
    if op.type in ("RESHAPE", "SQUEEZE"):
        return [(acts[0], _reshape(w, g, t[acts[0]].shape))]
    if op.type in ("MEAN", "AVERAGE_POOL_2D"):
        shape = t[acts[0]].shape
        if op.type == "MEAN":
            axes = tuple(int(a) % len(shape) for a in np.atleast_1d(t[op.inputs[1]].data))
        elif len(shape) == 4 and (op.options["filterHeight"], op.options["filterWidth"]) == shape[1:3] and t[op.outputs[0]].shape[1:3] == (1, 1):
            axes = (1, 2)  # a global average pool
        else:
            raise Unsupported("AVERAGE_POOL_2D other than global")
        count = int(np.prod([shape[a] for a in axes]))
        keep = tuple(1 if a in axes else s for a, s in enumerate(shape))
        spread = np.full(tuple(s if a in axes else 1 for a, s in enumerate(shape)), 1.0 / count, np.float32)
        gk = _reshape(w, g, keep)
        return [(acts[0], w.op("MUL", [gk, w.const(spread, f"mean_{op.index}")], [shape], "MulOptions")[0])]
    if op.type == "CONCATENATION":
        axis = op.options.get("axis", -1) % len(t[op.outputs[0]].shape)
        sizes = [t[i].shape[axis] for i in op.inputs]
        parts = w.op("SPLIT_V", [g, w.const(np.asarray(sizes, np.int32), f"sizes_{op.index}"), w.const(np.asarray(axis, np.int32), f"axis_{op.index}")],
                     [t[i].shape for i in op.inputs], "SplitVOptions", numSplits=len(sizes))
        return [(i, p) for i, p in zip(op.inputs, parts) if not t[i].is_constant]
    raise Unsupported(op.type)


def build(graph: TfliteGraph, start: int, wanted: set[int]) -> AdjointModel:
    """The backward pass of one probe at tensor ``start`` (batch 1) to the ``wanted`` tensors, on the
    walk ``backprop.vjp`` takes too; raises :class:`Unsupported` for an op it has no TFLite rule for."""
    w = _Writer()
    probe = w.input(graph.tensors[start].shape, "probe")
    masks: list[tuple[int, int, str]] = []
    routes: list[tuple[dict[tuple[int, int], int], int, dict]] = []

    def masked(op: OpInfo, g: int) -> int:
        if not has_mask(op.fused_activation):
            return g
        mask = w.input(w.shapes[g], f"mask_{op.index}")
        masks.append((mask, op.outputs[0], op.fused_activation))
        return w.op("MUL", [g, mask], [w.shapes[g]], "MulOptions")[0]

    def add(a: int, b: int) -> int:
        return w.op("ADD", [a, b], [w.shapes[b]], "AddOptions")[0]

    gradients = walk_backward(graph, {start: probe}, wanted, masked, lambda op, g: _input_grads(w, op, graph, g, routes), add)
    outputs = sorted({g for g in gradients.values() if g not in w.inputs})
    return AdjointModel(w.finish(outputs), probe, masks, routes, gradients)


class AdjointRunner:
    """An interpreter on an :class:`AdjointModel`: one invocation per probe."""

    def __init__(self, adjoint: AdjointModel, num_threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.adjoint = adjoint
        self.interpreter = Interpreter(model_content=adjoint.content, num_threads=num_threads)
        self.interpreter.allocate_tensors()

    def vjp(self, probe: np.ndarray, value: Callable[[int], np.ndarray]) -> dict[int, np.ndarray]:
        """Gradients of ``probe`` (shape of the start tensor) at the wanted tensors, linearised around
        ``value`` (float tensor -> its value in the run)."""
        a, interp = self.adjoint, self.interpreter
        interp.set_tensor(a.probe, np.asarray(probe, np.float32))
        for tensor, source, act in a.masks:
            interp.set_tensor(tensor, activation_mask(value(source), act))
        for taps, source, options in a.routes:
            for tap, hit in max_pool_routes(value(source), options).items():
                interp.set_tensor(taps[tap], hit.astype(np.float32))
        interp.invoke()
        return {t: probe if g == a.probe else interp.get_tensor(g) for t, g in a.gradients.items()}


def backward_pass(graph: TfliteGraph, starts: list[int], wanted: set[int], num_threads: int = 2
                  ) -> tuple[Callable[[dict[int, np.ndarray], Callable[[int], np.ndarray]], dict[int, np.ndarray]], str]:
    """(probe per start tensor, value) -> gradients at the wanted tensors, and which engine runs it:
    this module's TFLite model when there is one start and every op on the path has a rule here (and
    the runtime loads it), else ``backprop.vjp`` in numpy."""
    if len(starts) == 1:
        try:
            runner = AdjointRunner(build(graph, starts[0], wanted), num_threads)
            return (lambda seeds, value: runner.vjp(seeds[starts[0]], value)), "tflite"
        except (Unsupported, ValueError, RuntimeError):  # the runtime's refusals are ValueError/RuntimeError
            pass
    return (lambda seeds, value: vjp(graph, seeds, None, value, wanted)), "numpy"
