"""Layers = fused TFLite ops, matched between the float32 and the int8 model of one compile.

Matching rule (both models come from the same SavedModel): an op's output tensor name is the
';'-joined list of the TF ops fused into it, e.g.
``model/tf.nn.relu6_1/Relu6;model/tf.math.add_1/Add;model/tf.nn.depthwise_conv2d/depthwise;Const_101``.
The ``Const_N`` parts name folded constants and are renumbered by every conversion, so the key is
the remaining parts. The int8 model's last op may hand its name to the DEQUANTIZE that follows it
(``PartitionedCall:01`` → ``PartitionedCall:0``); then the DEQUANTIZE output's key is used.
Ops that still find no partner are reported, never guessed.

A layer's ``name`` is the output tensor name of the same op in the calibrated model (same key):
that exact string is what TF's selective quantization accepts in its denylist; the int8 model's
own names can differ (the DEQUANTIZE hand-over above).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from quantune_edge.errors import InputError
from quantune_edge.model.tflite_graph import OpInfo, TensorInfo, TfliteGraph

WEIGHTED_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}
BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}
_MAIN_OP_HINTS = ("conv", "depthwise", "matmul", "dense")


def tensor_key(name: str) -> str:
    parts = [p for p in name.split(";") if not p.startswith("Const")]
    return ";".join(parts) if parts else name


@dataclass
class Layer:
    """One fused op present in both models."""

    index: int  # position among layers, graph order
    name: str  # calibrated-model output tensor name (= the name TF's selective quantization takes)
    op_type: str
    float_op: int
    int8_op: int
    float_output: int  # tensor indices
    int8_output: int
    float_inputs: list[int]  # activation inputs only
    int8_inputs: list[int]
    float_weight: int | None
    int8_weight: int | None
    params: int
    macs: int
    fused_activation: str | None

    @property
    def short_name(self) -> str:
        """The fused part that names the main op (the conv, not its bias Add or activation)."""
        parts = [p for p in self.name.split(";") if not p.startswith("Const")] or [self.name]
        main = next((p for p in parts if any(k in p.lower() for k in _MAIN_OP_HINTS)), parts[0])
        return main.split("/")[-2] if main.count("/") >= 2 else main


@dataclass
class LayerMatch:
    layers: list[Layer]
    unmatched_float: list[str]
    unmatched_int8: list[str]
    tensor_map: dict[int, int]  # int8 activation tensor -> its float tensor
    exact: list[str] = field(default_factory=list)  # ops matched but computing integers (no precision to choose)


def _macs(op: OpInfo, graph: TfliteGraph) -> int:
    if op.type not in WEIGHTED_OPS or len(op.inputs) < 2:
        return 0
    w = graph.tensors[op.inputs[1]].shape
    out = graph.tensors[op.outputs[0]].shape
    if op.type == "FULLY_CONNECTED":
        return int(np.prod(w))
    spatial = int(np.prod(out[1:-1])) if len(out) >= 3 else 1
    if op.type == "DEPTHWISE_CONV_2D":  # weights [1, KH, KW, C*M]
        return spatial * int(np.prod(w))
    return spatial * int(np.prod(w))  # CONV_2D / TRANSPOSE_CONV weights [O, KH, KW, I]


def _activation_inputs(op: OpInfo, graph: TfliteGraph) -> list[int]:
    return [i for i in op.inputs if i >= 0 and not graph.tensors[i].is_constant]


FLOAT_DTYPES = ("float32", "float16")


def match_layers(float_graph: TfliteGraph, int8_graph: TfliteGraph, calibrated_graph: TfliteGraph | None = None) -> LayerMatch:
    """Pair the ops of a float and an int8 model by the rule in the module docstring; names come from
    ``calibrated_graph`` when given (else the int8 model's)."""
    denylist_name: dict[str, str] = {}
    if calibrated_graph is not None:
        for op in calibrated_graph.ops:
            name = calibrated_graph.tensors[op.outputs[0]].name
            denylist_name.setdefault(tensor_key(name), name)
    float_by_key: dict[str, OpInfo] = {}
    for op in float_graph.ops:
        float_by_key.setdefault(tensor_key(float_graph.tensors[op.outputs[0]].name), op)
    if len(float_graph.inputs) != len(int8_graph.inputs):
        raise InputError("float and int8 models have different numbers of inputs: not a pair from one compile")

    # int8 tensor -> float tensor, seeded with the model inputs (through the input QUANTIZE).
    tensor_map: dict[int, int] = dict(zip(int8_graph.inputs, float_graph.inputs))
    for op in int8_graph.ops:
        if op.type == "QUANTIZE" and op.inputs[0] in tensor_map:
            tensor_map[op.outputs[0]] = tensor_map[op.inputs[0]]

    layers: list[Layer] = []
    unmatched_int8: list[str] = []
    used_float: set[int] = set()
    exact: list[str] = []
    for op in int8_graph.ops:
        if op.type in BOUNDARY_OPS:
            continue
        out = int8_graph.tensors[op.outputs[0]]
        partner = float_by_key.get(tensor_key(out.name))
        if partner is None:
            for user in int8_graph.consumers(op.outputs[0]):
                if user.type == "DEQUANTIZE":
                    partner = float_by_key.get(tensor_key(int8_graph.tensors[user.outputs[0]].name))
                    if partner is not None:
                        break
        if partner is None or partner.type != op.type or partner.index in used_float:
            unmatched_int8.append(out.name)
            continue
        used_float.add(partner.index)
        tensor_map[op.outputs[0]] = partner.outputs[0]
        if float_graph.tensors[partner.outputs[0]].dtype not in FLOAT_DTYPES:
            exact.append(out.name)  # integer or bool arithmetic (an index computation) is exact either way: not a precision choice
            continue
        weighted = op.type in WEIGHTED_OPS and len(op.inputs) > 1
        layers.append(
            Layer(
                index=len(layers),
                name=denylist_name.get(tensor_key(float_graph.tensors[partner.outputs[0]].name), out.name),
                op_type=op.type,
                float_op=partner.index,
                int8_op=op.index,
                float_output=partner.outputs[0],
                int8_output=op.outputs[0],
                float_inputs=_activation_inputs(partner, float_graph),
                int8_inputs=_activation_inputs(op, int8_graph),
                float_weight=partner.inputs[1] if weighted else None,
                int8_weight=op.inputs[1] if weighted else None,
                params=sum(int(np.prod(float_graph.tensors[i].shape)) for i in partner.inputs if i >= 0 and float_graph.tensors[i].is_constant),
                macs=_macs(partner, float_graph),
                fused_activation=op.fused_activation,
            )
        )
    unmatched_float = [float_graph.tensors[op.outputs[0]].name for op in float_graph.ops if op.index not in used_float]
    return LayerMatch(layers, unmatched_float, unmatched_int8, tensor_map, exact)


def dequantized_weights(tensor: TensorInfo) -> np.ndarray:
    """int8 weights back to float with their (per-channel or per-tensor) scales and zero points."""
    if tensor.data is None:
        raise ValueError(f"tensor {tensor.name} holds no constant data")
    data = tensor.data.astype(np.float32)
    if not tensor.scales:
        return data
    scales = np.asarray(tensor.scales, np.float32)
    zps = np.asarray(tensor.zero_points or [0] * len(scales), np.float32)
    if len(scales) == 1:
        return (data - zps[0]) * scales[0]
    shape = [1] * data.ndim
    shape[tensor.quantized_dimension] = len(scales)
    return (data - zps.reshape(shape)) * scales.reshape(shape)
