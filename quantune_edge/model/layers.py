"""Layers = fused TFLite ops, matched between the float32 and the int8 model of one compile.

Matching rule (both models come from the same SavedModel): an op's output tensor name is the
';'-joined list of the TF ops fused into it, e.g.
``model/tf.nn.relu6_1/Relu6;model/tf.math.add_1/Add;model/tf.nn.depthwise_conv2d/depthwise;Const_101``.
The ``Const_N`` parts name folded constants and are renumbered by every conversion, so the key is
the remaining parts. The int8 model's last op may hand its name to the DEQUANTIZE that follows it
(``PartitionedCall:01`` → ``PartitionedCall:0``); then the DEQUANTIZE output's key is used.
Ops that still find no partner are reported, never guessed.

A layer's ``name`` is the output tensor name of the same op in the calibrated model (same key): a
stable name for analysis.json, tune.json and ``--keep-float`` (the int8 model's own names can differ:
the DEQUANTIZE hand-over above). Ops a requantizing QUANTIZE renamed are paired by type and inputs.
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
    name: str  # calibrated-model output tensor name
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

    def int8_tensors(self) -> dict[int, int]:
        """float tensor -> the int8 tensor holding its value at its own scale: the producer's output,
        not a requantized copy (those come later in the graph, and map to the same float tensor)."""
        out: dict[int, int] = {}
        for q, f in self.tensor_map.items():
            out.setdefault(f, q)
        return out


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
    calibrated_name: dict[str, str] = {}
    if calibrated_graph is not None:
        for op in calibrated_graph.ops:
            name = calibrated_graph.tensors[op.outputs[0]].name
            calibrated_name.setdefault(tensor_key(name), name)
    float_by_key: dict[str, OpInfo] = {}
    for op in float_graph.ops:
        float_by_key.setdefault(tensor_key(float_graph.tensors[op.outputs[0]].name), op)
    if len(float_graph.inputs) != len(int8_graph.inputs):
        raise InputError("float and int8 models have different numbers of inputs: not a pair from one compile")

    # int8 tensor -> float tensor, seeded with the model inputs; a QUANTIZE's output (the input's
    # quantized copy, a requantized tensor) maps to what its input maps to.
    tensor_map: dict[int, int] = dict(zip(int8_graph.inputs, float_graph.inputs))

    layers: list[Layer] = []
    unmatched_int8: list[str] = []
    used_float: set[int] = set()
    exact: list[str] = []
    float_readers: dict[tuple[str, tuple[int, ...]], list[OpInfo]] = {}
    for op in float_graph.ops:
        float_readers.setdefault((op.type, tuple(_activation_inputs(op, float_graph))), []).append(op)
    for op in int8_graph.ops:
        if op.type == "QUANTIZE" and op.inputs[0] in tensor_map:
            tensor_map[op.outputs[0]] = tensor_map[op.inputs[0]]  # a requantized copy holds the same value
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
            partner = _same_op_on_same_inputs(op, int8_graph, tensor_map, float_readers, used_float)
        if partner is None:
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
                name=calibrated_name.get(tensor_key(float_graph.tensors[partner.outputs[0]].name), out.name),
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


def _same_op_on_same_inputs(op: OpInfo, int8_graph: TfliteGraph, tensor_map: dict[int, int],
                            float_readers: dict[tuple[str, tuple[int, ...]], list[OpInfo]], used: set[int]) -> OpInfo | None:
    """The float op of the same type reading the same values, when names do not pair them: a requantize
    the converter inserts renames what follows it (``…/transpose1`` in float32 is ``…/transpose11``
    after the QUANTIZE that took ``…/transpose1``)."""
    inputs = _activation_inputs(op, int8_graph)
    if not inputs or any(t not in tensor_map for t in inputs):
        return None
    free = [f for f in float_readers.get((op.type, tuple(tensor_map[t] for t in inputs)), []) if f.index not in used]
    return free[0] if len(free) == 1 else None


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


# Ops that only move or select values: int8 kernels require (and the converter gives) one scale on
# their input and output, so a value entering such a chain keeps the chain's scale throughout.
SCALE_TIED_OPS = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "STRIDED_SLICE", "SLICE", "SPLIT", "SPLIT_V",
                  "CONCATENATION", "PAD", "PADV2", "MAX_POOL_2D", "GATHER"}


@dataclass(frozen=True)
class RequantizedTail:
    """What an int8→int8 QUANTIZE the converter inserted feeds: ``entry`` (the first layer reading the
    requantized tensor) and ``layers`` (every layer downstream of it up to the next weighted op or the
    model output, graph order). Keeping them float lets the entry read the value before the requantize,
    and the rest compute on it in float; a single one of them float would only move the loss."""

    quantize_op: int
    entry: int
    layers: tuple[int, ...]
    scales: tuple[float, float]  # the requantize's input and output scale


def requantized_tails(match: LayerMatch, int8_graph: TfliteGraph) -> list[RequantizedTail]:
    """Every requantize of the int8 model (QUANTIZE from int8 to int8 at another scale) with the
    layers that keeping it out of the model needs float."""
    by_op = {layer.int8_op: layer for layer in match.layers}
    tails = []
    for op in int8_graph.ops:
        src, dst = (int8_graph.tensors[op.inputs[0]], int8_graph.tensors[op.outputs[0]]) if op.type == "QUANTIZE" else (None, None)
        if src is None or dst is None or src.dtype != "int8" or not src.scales or not dst.scales or src.scales[0] == dst.scales[0]:
            continue
        reached: set[int] = set()
        frontier = [op.outputs[0]]
        while frontier:
            for user in int8_graph.consumers(frontier.pop()):
                if user.type == "QUANTIZE":
                    frontier.extend(user.outputs)
                elif user.index in by_op and user.index not in reached and user.type not in WEIGHTED_OPS:
                    reached.add(user.index)
                    frontier.extend(user.outputs)
        readers = [user.index for user in int8_graph.consumers(op.outputs[0]) if user.index in by_op]
        if readers and reached:
            tails.append(RequantizedTail(op.index, by_op[min(readers)].index, tuple(sorted(by_op[i].index for i in reached)),
                                         (src.scales[0], dst.scales[0])))
    return tails


@dataclass(frozen=True)
class Requantization:
    """An int8→int8 QUANTIZE of the int8 model, for pricing: the spliced model drops it when the layer
    whose value it requantizes (``source``) is float, or when every reader is a float layer (``readers``;
    None when something else reads it too: another requantize, a model output)."""

    op: int
    source: int | None
    readers: frozenset[int] | None


def requantizations(match: LayerMatch, int8_graph: TfliteGraph) -> list[Requantization]:
    """Every QUANTIZE of the int8 model whose input is already integer."""
    by_op = {layer.int8_op: layer.index for layer in match.layers}
    by_output = {layer.int8_output: layer.index for layer in match.layers}
    out = []
    for op in int8_graph.ops:
        if op.type != "QUANTIZE" or int8_graph.tensors[op.inputs[0]].dtype == "float32":
            continue
        source = op.inputs[0]
        while source not in by_output and (producer := int8_graph.producer(source)) is not None and producer.type == "QUANTIZE":
            source = producer.inputs[0]
        users = [by_op.get(user.index) for user in int8_graph.consumers(op.outputs[0])]
        readers = frozenset(i for i in users if i is not None) if users and None not in users and op.outputs[0] not in int8_graph.outputs else None
        out.append(Requantization(op.index, by_output.get(source), readers))
    return out


def scale_tied_chains(match: LayerMatch, int8_graph: TfliteGraph) -> list[frozenset[int]]:
    """Connected groups (two or more) of scale-tied layers sharing one int8 scale: a float region that
    takes one of them takes them all, so it never ends inside a transpose/reshape/concat chain."""
    by_output = {layer.int8_output: layer for layer in match.layers}
    parent = {layer.index: layer.index for layer in match.layers if layer.op_type in SCALE_TIED_OPS}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def scale(t: int) -> float | None:
        scales = int8_graph.tensors[t].scales
        return scales[0] if scales else None

    for layer in match.layers:
        if layer.index not in parent:
            continue
        for t in layer.int8_inputs:
            producer = by_output.get(t)
            if producer is not None and producer.index in parent and scale(t) == scale(layer.int8_output):
                parent[root(producer.index)] = root(layer.index)
    groups: dict[int, set[int]] = {}
    for i in parent:
        groups.setdefault(root(i), set()).add(i)
    return [frozenset(g) for g in groups.values() if len(g) > 1]


def float_units(match: LayerMatch, int8_graph: TfliteGraph) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(layers, the layers each of them takes float with it): a requantized tail's entry takes the tail,
    a scale-tied chain's member takes the chain (``tune.selection.LayerGraph.closed``)."""
    units = [((tail.entry,), (tail.entry, *tail.layers)) for tail in requantized_tails(match, int8_graph)]
    return units + [(tuple(sorted(chain)), tuple(sorted(chain))) for chain in scale_tied_chains(match, int8_graph)]


def unit_notes(match: LayerMatch, int8_graph: TfliteGraph) -> dict[int, str]:
    """Layer index -> what keeping it float takes with it, in words, for the layers that take more than
    themselves (how ``layers``, analyze and the report name these candidates)."""
    notes: dict[int, str] = {}
    for chain in scale_tied_chains(match, int8_graph):
        for i in chain:
            notes[i] = f"scale-tied chain of {len(chain)} layers (one int8 scale)"
    for tail in requantized_tails(match, int8_graph):
        notes[tail.entry] = (f"reads a requantized tensor (int8 scale {tail.scales[0]:.3g} -> {tail.scales[1]:.3g}); "
                             f"float with its {len(tail.layers)}-layer tail")
    return notes
