"""Reading, validating and cleaning up ONNX models before conversion.

Real exports carry graph noise that onnx2tf cannot convert (PyTorch's "same" padding written as
Pad/Slice/Concat subgraphs on computed shapes). :func:`prepare` fixes the input shape, simplifies the
graph (constant folding + shape inference via onnxsim) and folds any remaining zero Pad into the
following Conv's padding, so the converter sees one Conv where the user wrote Pad+Conv.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantune_edge.common.inputs import PLAIN, InputSpec
from quantune_edge.errors import ConversionError, InputError

CHANNEL_COUNTS = (1, 3, 4)


def load(path: str | Path) -> onnx.ModelProto:  # noqa: F821
    """Load and check an ONNX file, turning every failure into a one-line :class:`InputError`."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if not path.is_file():
        raise InputError(f"model path is not a file: {path}")
    raw = path.read_bytes()
    if not raw:
        raise InputError(f"model file is empty: {path}")
    try:
        model = onnx.load_from_string(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        kind = "truncated or corrupt ONNX file" if raw[:1] == b"\x08" else "not an ONNX model"
        raise InputError(f"{path}: {kind} ({exc})") from None
    if model.ir_version == 0 or not model.graph.node or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph, opset or IR version)")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: invalid ONNX model ({first})") from None
    return model


def _dims(value_info) -> list[int | str]:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?"))
    return dims


def graph_inputs(model) -> list:
    initializers = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 2: "uint8", 3: "int8"}  # TensorProto element types fed as numpy


def input_specs(model, input_size: tuple[int, int] | None = None, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[list[InputSpec], list[str]]:
    """Every input of the model, with notes on what was fixed (dynamic dims). A 4-D float input with
    a channel axis of 1, 3 or 4 is an image (``input_size`` (H, W) fixes its dynamic spatial size); any
    other input is fed in its own layout. ``shapes`` (``--input-shape NAME=1x3x640x640``) sets
    dynamic dimensions by input name; the batch becomes 1."""
    inputs = graph_inputs(model)
    if not inputs:
        raise InputError("the model has no inputs")
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {i.name for i in inputs})
    if unknown:
        raise InputError(f"--input-shape names {unknown[0]!r}, which is not an input of the model (inputs: {', '.join(i.name for i in inputs)})")
    specs, notes = [], []
    for inp in inputs:
        spec, fixed = _input_spec(inp, input_size if len(inputs) == 1 else None, shapes.get(inp.name))
        specs.append(spec)
        notes += fixed
    if input_size is not None and not any(s.is_image for s in specs):
        raise InputError("--input-size applies to an image input; the model has none (set other shapes with --input-shape NAME=1x49x10)")
    return specs, notes


def _input_spec(inp, input_size: tuple[int, int] | None, given: tuple[int, ...] | None) -> tuple[InputSpec, list[str]]:
    import onnx

    elem = inp.type.tensor_type.elem_type
    if elem not in ONNX_DTYPES:
        raise InputError(f"model input {inp.name!r} is {onnx.TensorProto.DataType.Name(elem)}; supported: "
                         f"{', '.join(onnx.TensorProto.DataType.Name(e) for e in ONNX_DTYPES)}")
    dims = _dims(inp)
    notes: list[str] = []
    if not dims:
        raise InputError(f"model input {inp.name!r} is a scalar or has no shape; give it one with --input-shape {inp.name}=1xN")
    if given is not None:
        if len(given) != len(dims) or any(isinstance(d, int) and d != g for d, g in zip(dims[1:], given[1:])):
            raise InputError(f"--input-shape {inp.name}={'x'.join(map(str, given))} does not fit the model input of shape {dims}")
        dims = list(given)
        notes.append(f"input {inp.name!r} shape set to {list(given)} (--input-shape)")
    if not isinstance(dims[0], int):
        notes.append(f"dynamic batch dimension {dims[0]!r} of input {inp.name!r} fixed to 1")
    elif dims[0] != 1:
        notes.append(f"batch dimension {dims[0]} of input {inp.name!r} set to 1")
    dims[0] = 1
    layout = _image_layout(dims) if elem == onnx.TensorProto.FLOAT else None
    if layout is not None:
        spatial = (2, 3) if layout == "NCHW" else (1, 2)
        for axis, size in zip(spatial, input_size or (None, None)):
            if not isinstance(dims[axis], int):
                if size is None:
                    raise InputError(f"model input {inp.name!r} has dynamic spatial size {dims}; pass --input-size or --input-shape {inp.name}=...")
                notes.append(f"dynamic spatial dimension of input {inp.name!r} fixed to {size}")
                dims[axis] = size
        if input_size is not None and (dims[spatial[0]], dims[spatial[1]]) != tuple(input_size):
            raise InputError(f"--input-size {'x'.join(map(str, input_size))} does not match the model input {inp.name!r} of shape {dims}")
    elif any(not isinstance(d, int) for d in dims):
        example = "x".join(str(d) if isinstance(d, int) else "N" for d in dims)
        raise InputError(f"model input {inp.name!r} has dynamic dimensions {dims}; set them with --input-shape {inp.name}={example}")
    return InputSpec(inp.name, layout or PLAIN, tuple(int(d) for d in dims), ONNX_DTYPES[elem]), notes


def _image_layout(dims: list) -> str | None:
    """"NCHW" or "NHWC" for a 4-D tensor with a channel axis of 1, 3 or 4; None: not an image."""
    if len(dims) != 4:
        return None
    if isinstance(dims[1], int) and dims[1] in CHANNEL_COUNTS:
        return "NCHW"
    if isinstance(dims[3], int) and dims[3] in CHANNEL_COUNTS:
        return "NHWC"
    return None


def parse_input_shapes(texts: list[str]) -> dict[str, tuple[int, ...]]:
    """``--input-shape NAME=1x3x640x640`` (repeatable) as {name: shape}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for text in texts:
        name, sep, dims = text.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise InputError(f"--input-shape takes NAME=1x3x640x640 (positive sizes), got {text!r}")
        if name in shapes:
            raise InputError(f"--input-shape gives input {name!r} twice")
        shapes[name] = shape
    return shapes


def op_histogram(model) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


@functools.lru_cache(maxsize=1)
def onnx2tf_supported_ops() -> frozenset[str]:
    """onnx2tf has one module per ONNX op it converts; that list is the ground truth.

    Found without importing onnx2tf (which would import TensorFlow just to validate a graph)."""
    import importlib.util

    spec = importlib.util.find_spec("onnx2tf")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("onnx2tf is not installed; install the host extra: pip install 'quantune-edge[host]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "ops"
    return frozenset(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def check_supported(model) -> None:
    """Fail before converting if any node is an op onnx2tf has no converter for."""
    supported = onnx2tf_supported_ops()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in supported:
            domain = f" (domain {node.domain!r})" if node.domain not in ("", "ai.onnx") else ""
            raise ConversionError(f"unsupported op {node.op_type!r}{domain} at node {node.name or node.output[0]!r}: onnx2tf cannot convert it")


def _fix_input_shapes(model, specs: list[InputSpec]) -> None:
    by_name = {s.name: s for s in specs}
    for inp in model.graph.input:
        if inp.name in by_name:
            for dim, value in zip(inp.type.tensor_type.shape.dim, by_name[inp.name].shape):
                dim.Clear()
                dim.dim_value = value


def fold_pads(model) -> int:
    """Fold constant zero-padding Pad nodes into the padding of the Conv they feed.

    Only a Pad whose sole consumer is a Conv without auto_pad, padding spatial axes with zeros, is
    folded; anything else is left for the converter. Returns the number of Pads folded.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: Counter[str] = Counter(name for n in model.graph.node for name in n.input)
    graph_outputs = {o.name for o in model.graph.output}
    by_input = {}
    for n in model.graph.node:
        for name in n.input:
            by_input.setdefault(name, []).append(n)
    folded = 0
    for pad in [n for n in model.graph.node if n.op_type == "Pad"]:
        out = pad.output[0]
        users = by_input.get(out, [])
        if len(users) != 1 or consumers[out] != 1 or out in graph_outputs or users[0].op_type != "Conv":
            continue
        conv = users[0]
        if conv.input[0] != out:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        mode = attrs.get("mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            continue
        if len(pad.input) > 1 and pad.input[1]:
            if pad.input[1] not in inits:
                continue
            pads = numpy_helper.to_array(inits[pad.input[1]]).astype(int).tolist()
        else:
            pads = list(attrs.get("pads", []))
        if len(pad.input) > 2 and pad.input[2]:
            if pad.input[2] not in inits or np.any(numpy_helper.to_array(inits[pad.input[2]]) != 0):
                continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # explicit axes: leave to the converter
        rank = len(pads) // 2
        if rank < 3 or any(pads[i] != 0 or pads[i + rank] != 0 for i in (0, 1)) or any(p < 0 for p in pads):
            continue
        conv_attrs = {a.name: a for a in conv.attribute}
        auto_pad = helper.get_attribute_value(conv_attrs["auto_pad"]) if "auto_pad" in conv_attrs else b"NOTSET"
        if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
            continue
        spatial = rank - 2
        old = list(helper.get_attribute_value(conv_attrs["pads"])) if "pads" in conv_attrs else [0] * (2 * spatial)
        begin = [old[i] + pads[2 + i] for i in range(spatial)]
        end = [old[spatial + i] + pads[rank + 2 + i] for i in range(spatial)]
        if "pads" in conv_attrs:
            conv.attribute.remove(conv_attrs["pads"])
        conv.attribute.append(helper.make_attribute("pads", begin + end))
        conv.input[0] = pad.input[0]
        model.graph.node.remove(pad)
        folded += 1
    return folded


@dataclass
class PreparedModel:
    """The cleaned-up model handed to the converter, and what the clean-up did."""

    model: object
    specs: list[InputSpec]
    notes: list[str]
    simplified: bool
    pads_folded: int


CONVERTED_OPSET = 13  # older exports are rewritten to this opset's meaning before conversion


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), CONVERTED_OPSET)


def _to_current_opset(model, notes: list[str]):
    """An export older than opset 13 rewritten to opset 13's meaning (ONNX's version converter).

    Before 13, Softmax, LogSoftmax and Hardmax took ``axis`` with "coerce to 2-D" semantics (all axes
    from ``axis`` on flattened): over an N x C x H x W tensor, axis=1 spans C*H*W values, and onnx2tf
    applies it to C alone, so the float32 TFLite would not match ONNX Runtime. The converter writes
    them as Flatten, Softmax, Reshape, and moves attributes that became inputs (Split, Squeeze, Clip,
    Pad, ...)."""
    from onnx import version_converter

    old = _opset(model)
    if old >= CONVERTED_OPSET:
        return model
    flattened = _flatten_coerced_axis_ops(model)
    if flattened:
        notes.append(f"{flattened} Softmax/LogSoftmax/Hardmax node(s) of the opset {old} export written as Flatten, op, Reshape "
                     "(their old axis meant: every axis from it on)")
    try:
        converted = version_converter.convert_version(model, CONVERTED_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors for ops it has no adapter for
        notes.append(f"opset {old} export kept as is: ONNX's version converter failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
        return model
    notes.append(f"opset {old} export rewritten to opset {CONVERTED_OPSET} (ONNX version converter): old Softmax/LogSoftmax/Hardmax "
                 "axis semantics, and attributes that became inputs, keep their meaning")
    return converted


COERCED_AXIS_OPS = ("Softmax", "LogSoftmax", "Hardmax")


def _flatten_coerced_axis_ops(model) -> int:
    """Before opset 13, ``Softmax(axis=a)`` (and LogSoftmax, Hardmax) on a rank-r tensor flattened it
    to 2-D at ``a`` and worked over the second axis: every axis from ``a`` on. Written out as
    Shape + Flatten + the op on a 2-D tensor + Reshape, it means the same at every opset (ONNX's
    version converter does this for Softmax and LogSoftmax, not for Hardmax). Edits ``model`` in
    place; returns how many nodes were rewritten (those already over the last axis are left)."""
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(model)
    known = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in known if v.type.tensor_type.HasField("shape")}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        rank = ranks.get(node.input[0]) if node.input else None
        if node.op_type not in COERCED_AXIS_OPS or node.domain not in ("", "ai.onnx") or not rank:
            nodes.append(node)
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        axis = axis + rank if axis < 0 else axis
        if axis == rank - 1:
            nodes.append(node)
            continue
        base = node.name or node.output[0]
        shape, flat, two_d = f"{base}/coerced_shape", f"{base}/coerced_flat", f"{base}/coerced_2d"
        nodes += [helper.make_node("Shape", [node.input[0]], [shape], name=shape),
                  helper.make_node("Flatten", [node.input[0]], [flat], name=flat, axis=axis),
                  helper.make_node(node.op_type, [flat], [two_d], name=node.name, axis=1),
                  helper.make_node("Reshape", [two_d, shape], list(node.output), name=f"{base}/coerced_reshape")]
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def _same_padding(shape: list[int], attrs: dict) -> list[int] | None:
    """The ONNX ``pads`` TF's SAME padding gives a pool over an NCHW input of ``shape`` (the extra
    row or column at the end), None when the spatial sizes are unknown."""
    kernel = list(attrs.get("kernel_shape", []))
    sizes = shape[2:]
    if not kernel or len(sizes) != len(kernel) or not all(sizes):
        return None
    strides = list(attrs.get("strides", [1] * len(kernel)))
    begin, end = [], []
    for size, k, s in zip(sizes, kernel, strides):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return begin + end


def edge_pad_max_pools(model) -> int:
    """MaxPool's own padding rewritten as an edge Pad in front of it (same outputs: a window reaching
    into the padding also holds the edge value the pad repeats), where TF's SAME padding cannot say
    it. onnx2tf then pads with the most negative float32, which int8 calibration takes as the tensor's
    range: on NanoDet-m (k3 s2 p1), a scale of 1.3e36 tied through the pool to the LeakyReLU before it,
    every value rounded to zero. Edits ``model`` in place; returns how many nodes were rewritten
    (ceil_mode and auto_pad ones, and those SAME pads, are left)."""
    import onnx
    from onnx import helper, numpy_helper

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    known = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in known if v.type.tensor_type.HasField("shape")}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        pads = list(attrs.get("pads", []))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        if (node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or not any(pads) or attrs.get("ceil_mode", 0)
                or auto_pad not in (b"NOTSET", "NOTSET") or len(node.output) > 1
                or _same_padding(shapes.get(node.input[0], []), attrs) == pads):
            nodes.append(node)
            continue
        half = len(pads) // 2
        base = node.name or node.output[0]
        amounts = numpy_helper.from_array(np.asarray([0, 0, *pads[:half], 0, 0, *pads[half:]], np.int64), f"{base}/edge_pads")
        model.graph.initializer.append(amounts)
        padded = f"{base}/edge_padded"
        nodes.append(helper.make_node("Pad", [node.input[0], amounts.name], [padded], name=padded, mode="edge"))
        pool = helper.make_node("MaxPool", [padded], list(node.output), name=node.name,
                                **{k: v for k, v in attrs.items() if k != "pads"})
        nodes.append(pool)
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten


def prepare(model, input_size: tuple[int, int] | None = None, shapes: dict[str, tuple[int, ...]] | None = None) -> PreparedModel:
    """Fix the input shapes (batch 1), simplify, fold pads; keeps the original model untouched."""
    import onnx

    specs, notes = input_specs(model, input_size, shapes)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _fix_input_shapes(work, specs)
    work = _to_current_opset(work, notes)
    simplified = False
    try:
        import onnxsim

        candidate, ok = onnxsim.simplify(work)
        if ok:
            work, simplified = candidate, True
        else:
            notes.append("onnxsim could not verify the simplified graph; converting the original graph")
    except Exception as exc:  # onnxsim raises bare RuntimeErrors from C++ on odd graphs
        notes.append(f"graph simplification skipped ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    folded = fold_pads(work)
    if folded:
        notes.append(f"folded {folded} Pad node(s) into Conv padding")
    edged = edge_pad_max_pools(work)
    if edged:
        notes.append(f"{edged} padded MaxPool node(s) given an edge Pad instead (the converter's -3.4e38 padding would set the int8 range)")
    try:
        work = onnx.shape_inference.infer_shapes(work)
    except Exception:
        pass
    return PreparedModel(work, specs, notes, simplified, folded)
