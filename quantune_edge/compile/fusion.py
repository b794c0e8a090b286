"""Which fusions the user's graph offers, and whether the TFLite graph actually took them.

A TFLite conv that leaves its BatchNorm, activation or Pad as separate ops is slower and, in int8,
adds a requantization step (and error) per op. So fusion is checked, not hoped for: the ONNX side
counts fusable patterns, the TFLite side lists every op that should have been folded but was not.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from quantune_edge.model.tflite_graph import OpInfo, TfliteGraph

ONNX_CONV_LIKE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
ONNX_ACTIVATIONS = {"Relu", "Clip"}
TFLITE_CONV_LIKE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D"}
TFLITE_FUSABLE_ACTIVATIONS = {"RELU", "RELU6", "RELU_N1_TO_1"}
TFLITE_AFFINE = {"MUL", "ADD", "SUB"}
TFLITE_PADS = {"PAD", "PADV2"}

PATTERNS = ("Conv+BatchNormalization", "Conv+Relu/Clip", "Add+Relu/Clip", "Pad+Conv")


def onnx_patterns(model) -> dict[str, int]:
    """Count fusable patterns in an ONNX graph (each counted where a node's only consumer matches)."""
    nodes = list(model.graph.node)
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def only_consumer(node):
        users = consumers.get(node.output[0], []) if node.output else []
        return users[0] if len(users) == 1 else None

    counts = Counter({p: 0 for p in PATTERNS})
    for n in nodes:
        nxt = only_consumer(n)
        if nxt is None:
            continue
        if n.op_type in ONNX_CONV_LIKE:
            if nxt.op_type == "BatchNormalization":
                counts["Conv+BatchNormalization"] += 1
                after_bn = only_consumer(nxt)
                if after_bn is not None and after_bn.op_type in ONNX_ACTIVATIONS:
                    counts["Conv+Relu/Clip"] += 1
            elif nxt.op_type in ONNX_ACTIVATIONS:
                counts["Conv+Relu/Clip"] += 1
        elif n.op_type == "Add" and nxt.op_type in ONNX_ACTIVATIONS:
            counts["Add+Relu/Clip"] += 1
        elif n.op_type == "Pad" and nxt.op_type == "Conv":
            counts["Pad+Conv"] += 1
    return dict(counts)


@dataclass
class Unfused:
    """A TFLite op that should have been folded into its neighbour."""

    op_index: int
    op_type: str
    neighbour_index: int
    neighbour_type: str
    kind: str

    def describe(self) -> str:
        return f"{self.kind}: {self.op_type}#{self.op_index} next to {self.neighbour_type}#{self.neighbour_index}"


def _producer_type(graph: TfliteGraph, op: OpInfo, input_pos: int = 0) -> OpInfo | None:
    if input_pos >= len(op.inputs) or op.inputs[input_pos] < 0:
        return None
    return graph.producer(op.inputs[input_pos])


MISSED_PAD = "standalone PAD before conv"
EXPLICIT_PAD = "PAD not expressible as conv SAME padding"


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_matches_same(graph: TfliteGraph, pad: OpInfo, conv: OpInfo) -> bool:
    """True if this PAD equals the conv's own SAME padding, i.e. the converter missed a fusion.

    Asymmetric "PyTorch style" pads (e.g. 1 before, 1 after at stride 2) have no TFLite conv
    padding equivalent and legitimately stay a PAD op.
    """
    pads = graph.tensors[pad.inputs[1]].data if len(pad.inputs) > 1 else None
    x_shape = graph.tensors[pad.inputs[0]].shape
    weights = graph.tensors[conv.inputs[1]].shape if len(conv.inputs) > 1 else ()
    if pads is None or len(x_shape) != 4 or len(weights) != 4 or conv.type not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        return False
    pads = np.asarray(pads).reshape(-1, 2)
    if np.any(pads[0] != 0) or np.any(pads[3] != 0):
        return False
    for axis, (stride_key, dil_key) in ((1, ("strideH", "dilationHFactor")), (2, ("strideW", "dilationWFactor"))):
        same = _same_padding(x_shape[axis], weights[axis], conv.options.get(stride_key, 1), conv.options.get(dil_key, 1))
        if tuple(int(v) for v in pads[axis]) != same:
            return False
    return True


def unfused_ops(graph: TfliteGraph) -> list[Unfused]:
    """Standalone activations/affine ops after a conv or Add, and Pads feeding a conv."""
    found: list[Unfused] = []
    for op in graph.ops:
        if op.type in TFLITE_FUSABLE_ACTIVATIONS:
            prev = _producer_type(graph, op)
            if prev is not None and (prev.type in TFLITE_CONV_LIKE or prev.type == "ADD") and len(graph.consumers(prev.outputs[0])) == 1:
                found.append(Unfused(op.index, op.type, prev.index, prev.type, "standalone activation"))
        elif op.type in TFLITE_AFFINE:
            consts = [i for i in op.inputs if i >= 0 and graph.tensors[i].is_constant]
            if len(consts) == 1:
                var = next(i for i in op.inputs if i >= 0 and i not in consts)
                prev = graph.producer(var)
                if prev is not None and prev.type in TFLITE_CONV_LIKE:
                    found.append(Unfused(op.index, op.type, prev.index, prev.type, "unfolded BatchNorm/affine"))
        elif op.type in TFLITE_PADS:
            for user in graph.consumers(op.outputs[0]):
                if user.type in TFLITE_CONV_LIKE:
                    kind = MISSED_PAD if _pad_matches_same(graph, op, user) else EXPLICIT_PAD
                    found.append(Unfused(op.index, op.type, user.index, user.type, kind))
    return found


def fused_activation_counts(graph: TfliteGraph) -> dict[str, int]:
    conv = sum(op.type in TFLITE_CONV_LIKE and op.fused_activation not in (None, "NONE") for op in graph.ops)
    add = sum(op.type == "ADD" and op.fused_activation not in (None, "NONE") for op in graph.ops)
    return {"conv_like_with_fused_activation": int(conv), "add_with_fused_activation": int(add)}


def summarize(onnx_counts: dict[str, int], graph: TfliteGraph) -> dict:
    """Fusions found: per ONNX pattern, how many the TFLite graph folded (pattern count minus leftovers).

    ``unfused`` lists missed fusions only; PADs that no conv padding mode can express are listed
    apart under ``explicit_pads``."""
    found = unfused_ops(graph)
    leftovers = [u for u in found if u.kind != EXPLICIT_PAD]
    kinds = Counter(u.kind for u in leftovers)
    acts = fused_activation_counts(graph)
    left_by_pattern = {
        "Conv+BatchNormalization": kinds["unfolded BatchNorm/affine"],
        "Conv+Relu/Clip": sum(1 for u in leftovers if u.kind == "standalone activation" and u.neighbour_type != "ADD"),
        "Add+Relu/Clip": sum(1 for u in leftovers if u.kind == "standalone activation" and u.neighbour_type == "ADD"),
        "Pad+Conv": kinds[MISSED_PAD],
    }
    patterns = [
        {"pattern": p, "in_onnx": onnx_counts.get(p, 0), "fused": max(onnx_counts.get(p, 0) - left_by_pattern[p], 0), "left_unfused": left_by_pattern[p]}
        for p in PATTERNS
    ]
    explicit = [asdict(u) for u in found if u.kind == EXPLICIT_PAD]
    return {"patterns": patterns, **acts, "unfused": [asdict(u) for u in leftovers], "explicit_pads": explicit}
