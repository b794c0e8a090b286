"""Which ONNX nodes each TFLite op came from, found by value, not by name.

onnx2tf names TF ops after their TF function (``tf.nn.convolution_3``), not after the ONNX node, and
the converter fuses several of them into one TFLite op, so names cannot be mapped back. Values can:
the float32 TFLite model reproduces ONNX Runtime to ~1e-6, so every TFLite op's output equals some
ONNX tensor (in NHWC instead of NCHW). The rule:

1. Run the user's ONNX model (graph optimisations off) and the float32 TFLite model (all tensors
   kept) on the same real samples.
2. Walking the TFLite ops in graph order, an op's output is traced to the ONNX tensor, downstream of
   its inputs' counterparts, whose values equal it (relative L2 error below ``TOLERANCE``, as is or
   NHWC vs NCHW); of several, one of the same shape before a reshaped one, then the most downstream
   (a Conv → BN → Clip chain ends at the Clip).
3. The op came from the ONNX nodes between its inputs' counterparts and its output's: all nodes the
   output depends on that the inputs do not. Constant-only nodes (pads, shapes, weight
   reformatting) are folded into weights by the converter and not listed.
4. An op whose output equals one of its inputs' counterparts adds no ONNX node (layout transposes
   onnx2tf inserts); an op whose output matches no ONNX tensor is untraced. Both are reported with
   their reason, never guessed. In the int8 model, an op inherits the trace of its float32 partner
   (:mod:`layers`); QUANTIZE/DEQUANTIZE are the quantizer's boundaries.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from quantune_edge.common.inputs import InputSpec, onnx_feed
from quantune_edge.model.layers import BOUNDARY_OPS, LayerMatch
from quantune_edge.model.tflite_graph import TfliteGraph

TOLERANCE = 1e-3
TRACE_SAMPLES = 2  # real samples the ONNX -> TFLite trace compares values on
# The ONNX op that names a fused TFLite op (its weights come from it); else the last node.
_MAIN_ONNX_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class OnnxGraph:
    """What tracing needs of an ONNX graph: nodes in order, who produces each tensor, which tensors
    depend on the model input (the rest are constants)."""

    names: list[str]  # node name, or its first output when the exporter left it unnamed
    op_types: list[str]
    inputs: list[list[str]]
    outputs: list[list[str]]
    graph_inputs: list[str]
    producer: dict[str, int] = field(default_factory=dict)
    dynamic: set[str] = field(default_factory=set)

    @classmethod
    def from_model(cls, model) -> OnnxGraph:
        initializers = {t.name for t in model.graph.initializer}
        graph_inputs = [i.name for i in model.graph.input if i.name not in initializers]
        g = cls(
            names=[n.name or (n.output[0] if n.output else f"{n.op_type}_{i}") for i, n in enumerate(model.graph.node)],
            op_types=[n.op_type for n in model.graph.node],
            inputs=[[x for x in n.input if x] for n in model.graph.node],
            outputs=[[x for x in n.output if x] for n in model.graph.node],
            graph_inputs=graph_inputs,
        )
        g.dynamic = set(graph_inputs)
        for i, (ins, outs) in enumerate(zip(g.inputs, g.outputs)):
            for t in outs:
                g.producer[t] = i
            if any(t in g.dynamic for t in ins):
                g.dynamic.update(outs)
        return g

    def computed_tensors(self) -> list[str]:
        """Tensors that depend on the model input, in node order (what ONNX Runtime is asked for)."""
        return [t for outs in self.outputs for t in outs if t in self.dynamic]

    def ancestors(self, tensor: str, memo: dict[str, frozenset[int]]) -> frozenset[int]:
        """Input-dependent nodes ``tensor`` is computed by, its producer included."""
        if tensor in memo:
            return memo[tensor]
        stack, seen = [tensor], set()
        while stack:
            t = stack.pop()
            node = self.producer.get(t)
            if node is None or node in seen or t not in self.dynamic:
                continue
            seen.add(node)
            stack.extend(x for x in self.inputs[node] if x in self.dynamic)
        memo[tensor] = frozenset(seen)
        return memo[tensor]


@dataclass
class OpTrace:
    op: int
    op_type: str
    tensor: str  # the op's (first) output tensor name in its TFLite model
    onnx_nodes: list[str]
    onnx_ops: list[str]
    onnx_output: str | None = None  # the ONNX tensor the op's output equals
    float32_op: int | None = None  # int8 model only: the float32 op it was matched to
    reason: str | None = None  # why there are no ONNX nodes

    def to_dict(self) -> dict:
        return asdict(self)


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = float(np.linalg.norm(b64))
    return float(np.linalg.norm(a64 - b64)) / norm if norm > 0 else (0.0 if not a64.any() else float("inf"))


def layout_match(tflite_value: np.ndarray, onnx_value: np.ndarray, tolerance: float = TOLERANCE) -> int:
    """2 when the TFLite tensor holds the ONNX tensor's values in the same shape, as is or
    channels-last; 1 when only a reshape of them (a fused Flatten); 0 when it does not."""
    if tflite_value.size != onnx_value.size:
        return 0
    views = [tflite_value]
    if tflite_value.ndim == 4:
        views.append(tflite_value.transpose(0, 3, 1, 2))
    elif tflite_value.ndim == 3:
        views.append(tflite_value.transpose(0, 2, 1))
    best = 0
    for v in views:
        if v.shape[0] == onnx_value.shape[0] and _relative_error(v.reshape(onnx_value.shape), onnx_value) < tolerance:
            best = max(best, 2 if v.shape == onnx_value.shape else 1)
    return best


def trace_float_model(onnx: OnnxGraph, onnx_values: dict[str, np.ndarray], graph: TfliteGraph,
                      tflite_values: dict[int, np.ndarray], tolerance: float = TOLERANCE) -> list[OpTrace]:
    """One entry per op of the float32 TFLite model (rule in the module docstring).

    ``onnx_values`` holds every computed ONNX tensor and ``tflite_values`` every op output, each
    stacked over the same samples (batch axis first)."""
    memo: dict[str, frozenset[int]] = {}
    order = {t: i for i, t in enumerate(onnx.computed_tensors())}
    counterpart: dict[int, str] = {}
    for t_in, o_in in _matched_inputs(graph, onnx.graph_inputs):
        counterpart[t_in] = o_in

    def frontier(tensors: Iterable[int]) -> set[str]:
        """ONNX counterparts of ``tensors``, walking back through untraced producers."""
        found, stack, seen = set(), list(tensors), set()
        while stack:
            t = stack.pop()
            if t in seen or t < 0 or graph.tensors[t].is_constant:
                continue
            seen.add(t)
            if t in counterpart:
                found.add(counterpart[t])
            elif (producer := graph.producer(t)) is not None:
                stack.extend(producer.inputs)
        return found

    traces = []
    for op in graph.ops:
        ins = frontier(op.inputs)
        covered = frozenset().union(*(onnx.ancestors(t, memo) for t in ins)) if ins else frozenset()
        value = tflite_values.get(op.outputs[0])
        match = None
        if value is not None and np.ptp(value) > 0:
            candidates = [t for t in order if t not in ins and t in onnx_values and onnx_values[t].size == value.size
                          and covered <= onnx.ancestors(t, memo)]
            reshaped = None
            for t in sorted(candidates, key=order.get, reverse=True):
                quality = layout_match(value, onnx_values[t], tolerance)
                if quality == 2:
                    match = t
                    break
                if quality == 1 and reshaped is None:
                    reshaped = t
            match = match or reshaped
        name = graph.tensors[op.outputs[0]].name
        if match is None:
            same = next((t for t in ins if value is not None and t in onnx_values and layout_match(value, onnx_values[t], tolerance)), None)
            if same is not None:
                counterpart[op.outputs[0]] = same
                traces.append(OpTrace(op.index, op.type, name, [], [], same, reason="adds no ONNX node (layout or no-op inserted by the converter)"))
            else:
                reason = "constant output: values cannot identify it" if value is not None and np.ptp(value) == 0 else "output equals no ONNX tensor"
                traces.append(OpTrace(op.index, op.type, name, [], [], None, reason=reason))
            continue
        counterpart[op.outputs[0]] = match
        nodes = sorted(onnx.ancestors(match, memo) - covered)
        traces.append(OpTrace(op.index, op.type, name, [onnx.names[i] for i in nodes], [onnx.op_types[i] for i in nodes], match))
    _attribute_helpers(traces, graph)
    return traces


def _attribute_helpers(traces: list[OpTrace], graph: TfliteGraph) -> None:
    """An untraced op feeding only traced ops computes an intermediate the ONNX node never
    materialises (onnx2tf's explicit PAD before a Conv with asymmetric or strided padding): name that
    node, and keep the op listed as untraced with the reason."""
    by_op = {t.op: t for t in traces}
    for t in reversed(traces):
        if t.onnx_output is not None or t.onnx_nodes:
            continue
        users = [u for out in graph.ops[t.op].outputs for u in graph.consumers(out)]
        mains = [main_node(by_op[u.index].onnx_nodes, by_op[u.index].onnx_ops) for u in users]
        if users and all(mains):
            unique = list(dict.fromkeys(mains))
            t.onnx_nodes, t.onnx_ops = [name for name, _ in unique], [op for _, op in unique]
            t.reason = f"{t.reason}; part of the ONNX node(s) it feeds: {', '.join(t.onnx_nodes)}"


def trace_int8_model(float_traces: list[OpTrace], graph: TfliteGraph, match: LayerMatch) -> list[OpTrace]:
    """The int8 model's ops, each with the trace of its float32 partner."""
    by_float = {t.op: t for t in float_traces}
    partner = {layer.int8_op: layer.float_op for layer in match.layers}
    traces = []
    for op in graph.ops:
        name = graph.tensors[op.outputs[0]].name
        if op.index in partner:
            f = by_float[partner[op.index]]
            traces.append(OpTrace(op.index, op.type, name, list(f.onnx_nodes), list(f.onnx_ops), f.onnx_output, f.op, f.reason))
        elif op.type in BOUNDARY_OPS:
            traces.append(OpTrace(op.index, op.type, name, [], [], None, reason="int8/float boundary inserted by the quantizer"))
        else:
            traces.append(OpTrace(op.index, op.type, name, [], [], None, reason="no float32 partner op"))
    return traces


def main_node(nodes: list[str], ops: list[str]) -> tuple[str, str] | None:
    """The (name, op type) of the ONNX node that names a fused op: its Conv/Gemm/MatMul, else its last."""
    for name, op in zip(nodes, ops):
        if op in _MAIN_ONNX_OPS:
            return name, op
    return (nodes[-1], ops[-1]) if nodes else None


def short_label(name: str, op_type: str = "") -> str:
    """``/_blocks.1/_expand_conv/Conv`` -> ``_blocks.1/_expand_conv``: exporters (torch.onnx) name a
    node by its module path plus its op type; the module path is what users recognise."""
    parts = [p for p in name.split("/") if p]
    if len(parts) > 1 and op_type and parts[-1].split("_")[0] == op_type:
        parts = parts[:-1]
    return "/".join(parts) or name


def summary(float_traces: list[OpTrace], int8_traces: list[OpTrace], onnx: OnnxGraph) -> dict:
    """compile.json's ``trace`` section."""
    assigned = {n for t in float_traces for n in t.onnx_nodes}
    compute = [onnx.names[i] for i, outs in enumerate(onnx.outputs) if any(o in onnx.dynamic for o in outs)]
    return {
        "rule": "by value: each TFLite op's output equals an ONNX Runtime tensor; its ONNX nodes are those between its inputs' and its output's counterparts",
        "tolerance": TOLERANCE,
        "float32": [t.to_dict() for t in float_traces],
        "int8": [t.to_dict() for t in int8_traces],
        "untraced": {
            "float32": [{"op": t.op, "op_type": t.op_type, "tensor": t.tensor, "reason": t.reason} for t in float_traces if t.onnx_output is None],
            "int8": [{"op": t.op, "op_type": t.op_type, "tensor": t.tensor, "reason": t.reason} for t in int8_traces
                     if t.onnx_output is None and t.op_type not in BOUNDARY_OPS],
        },
        "onnx_nodes_without_op": [n for n in compute if n not in assigned],
        "onnx_compute_nodes": len(compute),
    }


def _matched_inputs(graph: TfliteGraph, onnx_inputs: list[str]) -> list[tuple[int, str]]:
    """The TFLite model's input tensors paired with the ONNX inputs: by name (the converter keeps
    it inside the tensor's, ``serving_default_meta:0``), else in order."""
    if len(onnx_inputs) == 1:
        return list(zip(graph.inputs, onnx_inputs))
    pairs = []
    for t in graph.inputs:
        name = graph.tensors[t].name
        found = [o for o in onnx_inputs if name in (o, f"serving_default_{o}:0")]
        if len(found) != 1:
            return list(zip(graph.inputs, onnx_inputs))
        pairs.append((t, found[0]))
    return pairs


def onnx_values(model, graph: OnnxGraph, specs: list[InputSpec], feed: np.ndarray) -> dict[str, np.ndarray]:
    """Every input-dependent tensor of ``model`` (whose :class:`OnnxGraph` is ``graph``) on ``feed``
    (N samples held as the TFLite model takes them, one run each), stacked.

    Graph optimisations are off so ONNX Runtime computes each node as written."""
    import onnx
    import onnxruntime as ort

    wanted = graph.computed_tensors()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    runs = [session.run(None, onnx_feed(specs, feed[i:i + 1])) for i in range(len(feed))]
    return {name: np.concatenate([np.asarray(r[i]) for r in runs]) for i, name in enumerate(names)
            if all(isinstance(r[i], np.ndarray) and r[i].dtype.kind == "f" for r in runs)}


def tflite_values(path, graph: TfliteGraph, feed: np.ndarray) -> dict[int, np.ndarray]:
    """Every op output of the TFLite model at ``path`` (parsed as ``graph``) on ``feed`` (all tensors
    kept), stacked over samples."""
    from quantune_edge.model.runtime import TfliteRunner

    runner = TfliteRunner(path, preserve_all_tensors=True)
    outputs = [t for op in graph.ops for t in op.outputs]
    per_sample = []
    for i in range(len(feed)):
        runner.invoke(feed[i:i + 1])
        per_sample.append({t: runner.tensor(t) for t in outputs})
    return {t: np.concatenate([s[t] for s in per_sample]) for t in outputs}


def trace_models(model, specs: list[InputSpec], float_path, int8_path, feed: np.ndarray) -> dict:
    """compile.json's ``trace`` section for a float32/int8 pair converted from ``model``."""
    from quantune_edge.model import tflite_graph
    from quantune_edge.model.layers import match_layers

    onnx_graph = OnnxGraph.from_model(model)
    fg, qg = tflite_graph.read(float_path), tflite_graph.read(int8_path)
    float_traces = trace_float_model(onnx_graph, onnx_values(model, onnx_graph, specs, feed), fg, tflite_values(float_path, fg, feed))
    return summary(float_traces, trace_int8_model(float_traces, qg, match_layers(fg, qg)), onnx_graph)


def onnx_label(layer: dict) -> str | None:
    """A layer's (analysis/tune dict) short ONNX name, or None when it was not traced."""
    main = main_node(layer.get("onnx_nodes") or [], layer.get("onnx_ops") or [])
    return short_label(*main) if main else None


def trace_or_error(model, specs: list[InputSpec], float_path: Path, int8_path: Path, feed: np.ndarray) -> dict:
    """The ``trace`` section; a model ONNX Runtime cannot expose every tensor of gets the reason
    instead (the compile itself stays valid)."""
    try:
        return trace_models(model, specs, float_path, int8_path, feed)
    except Exception as exc:  # noqa: BLE001 - any failure here only costs the ONNX names
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"error": first[:300], "float32": [], "int8": [], "untraced": {"float32": [], "int8": []}}
