"""Which layers to keep float: fusion-aware regions, int8↔float boundaries, a latency estimate, and
the bisection over the sensitivity ranking (pure: graphs and numbers in, choices out).

TFLite already fuses a conv's BatchNorm and activation into the op, so a layer kept float takes
them with it. What is left to decide is the region: every tensor that crosses from an int8 op to a
float op (or back) costs one DEQUANTIZE (or QUANTIZE) op and a pass over that tensor, so a float
island in the middle of an int8 pipeline can cost more than it saves. :func:`grow_regions` adds a
neighbouring layer when that lowers the estimated latency by a measurable amount (typically an Add,
Mean or small conv squeezed between two float layers) and the analysis does not expect it to cost
accuracy, and :func:`boundaries` counts the conversions as the splice (``model.splice``) inserts
them: one per crossing tensor and precision.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from quantune_edge.model.layers import Layer, Requantization
from quantune_edge.model.tflite_graph import TfliteGraph


@dataclass(frozen=True)
class LayerGraph:
    """Layers and the activation tensors between them (from the int8 model)."""

    layers: tuple[int, ...]
    producer: dict[int, int]  # tensor -> layer index producing it (absent: graph input)
    consumers: dict[int, tuple[int, ...]]  # tensor -> layer indices reading it
    outputs: dict[int, int]  # layer index -> its output tensor
    elements: dict[int, int]  # tensor -> number of elements
    macs: dict[int, int]
    graph_inputs: tuple[int, ...]
    graph_outputs: tuple[int, ...]
    float_io: bool
    units: dict[int, frozenset[int]] = field(default_factory=dict)  # layer -> the layers float with it
    requantizations: tuple[Requantization, ...] = ()

    @classmethod
    def build(cls, graph: TfliteGraph, layers: Sequence[Layer], units: Iterable[tuple[Iterable[int], Iterable[int]]] = (),
              requantizations: Iterable[Requantization] = ()) -> LayerGraph:
        """Q/DQ ops of the int8 graph are looked through: a tensor produced by QUANTIZE counts as its input.
        ``units``: (layers, what each of them takes float with it): a requantized tail's entry and the tail,
        a scale-tied chain and itself. ``requantizations``: the int8→int8 QUANTIZE ops, which cost time
        until a float layer makes them go."""
        alias: dict[int, int] = {}
        for op in graph.ops:
            if op.type in ("QUANTIZE", "DEQUANTIZE"):
                alias[op.outputs[0]] = alias.get(op.inputs[0], op.inputs[0])
        def real(t: int) -> int:
            return alias.get(t, t)

        producer: dict[int, int] = {}
        consumers: dict[int, list[int]] = {}
        outputs: dict[int, int] = {}
        for layer in layers:
            producer[real(layer.int8_output)] = layer.index
            outputs[layer.index] = real(layer.int8_output)
            for t in layer.int8_inputs:
                consumers.setdefault(real(t), []).append(layer.index)
        elements = {t: max(1, int(np.prod(graph.tensors[t].shape))) for t in set(producer) | set(consumers)}
        float_io = graph.tensors[graph.inputs[0]].dtype == "float32"
        return cls(
            layers=tuple(layer.index for layer in layers), producer=producer,
            consumers={t: tuple(c) for t, c in consumers.items()}, outputs=outputs, elements=elements,
            macs={layer.index: layer.macs for layer in layers},
            graph_inputs=tuple(real(t) for t in graph.inputs), graph_outputs=tuple(real(t) for t in graph.outputs),
            float_io=float_io, units=_units(units), requantizations=tuple(requantizations),
        )

    def closed(self, float_set: Iterable[int], never: Iterable[int] = ()) -> frozenset[int]:
        """``float_set`` with every layer its members take float with them (but none of ``never``), until
        nothing more is added: a float region never ends inside a scale-tied chain or a requantized tail."""
        never = frozenset(never)
        out, todo = set(float_set), list(float_set)
        while todo:
            for j in self.units.get(todo.pop(), ()):
                if j not in out and j not in never:
                    out.add(j)
                    todo.append(j)
        return frozenset(out)

    def requantizations_kept(self, float_set: frozenset[int]) -> list[int]:
        """The requantize ops a model with ``float_set`` float still holds (``model.splice``: one reading a
        float layer's value quantizes it directly, one read only by float layers is dropped)."""
        return [r.op for r in self.requantizations
                if r.source not in float_set and not (r.readers and r.readers <= float_set)]

    def neighbours(self, index: int) -> set[int]:
        out = set(self.consumers.get(self.outputs[index], ()))
        out |= {self.producer[t] for t, users in self.consumers.items() if index in users and t in self.producer}
        return out


def _units(units: Iterable[tuple[Iterable[int], Iterable[int]]]) -> dict[int, frozenset[int]]:
    out: dict[int, frozenset[int]] = {}
    for members, taken in units:
        taken = frozenset(taken)
        for i in members:
            out[i] = out.get(i, frozenset()) | taken
    return out


def _crossings(lg: LayerGraph, float_set: frozenset[int]) -> list[int]:
    """Tensors needing a QUANTIZE or DEQUANTIZE (one each per tensor and target precision)."""
    crossing = []
    for t in set(lg.producer) | set(lg.consumers) | set(lg.graph_inputs):
        src_float = lg.producer[t] in float_set if t in lg.producer else lg.float_io
        sinks = [c in float_set for c in lg.consumers.get(t, ())]
        if t in lg.graph_outputs:
            sinks.append(lg.float_io)
        crossing += [t] * len({s for s in sinks if s != src_float})
    return crossing


def boundaries(lg: LayerGraph, float_set: Iterable[int]) -> int:
    """Number of QUANTIZE + DEQUANTIZE ops the mixed model will hold (model I/O conversions included)."""
    return len(_crossings(lg, frozenset(float_set)))


@dataclass(frozen=True)
class AloneTimes:
    """Ops timed alone (``model.op_models``), in ms: each layer's int8 and float op, each requantize op
    (by int8 op index); a None is an op the runtime could not run alone. ``conversion_ms_per_element``:
    the int8 model's own input QUANTIZE / output DEQUANTIZE per element (None: int8 I/O, there are none)."""

    int8: dict[int, float | None]
    float32: dict[int, float | None]
    requantize: dict[int, float | None]
    conversion_ms_per_element: float | None

    def to_dict(self) -> dict:
        return {"int8": _keyed(self.int8), "float32": _keyed(self.float32), "requantize": _keyed(self.requantize),
                "conversion_ms_per_element": self.conversion_ms_per_element}

    @classmethod
    def from_dict(cls, d: dict) -> AloneTimes:
        return cls(_indexed(d["int8"]), _indexed(d["float32"]), _indexed(d["requantize"]), d["conversion_ms_per_element"])


def _keyed(times: Mapping[int, float | None]) -> dict[str, float | None]:
    return {str(k): v for k, v in sorted(times.items())}


def _indexed(times: Mapping[str, float | None]) -> dict[int, float | None]:
    return {int(k): v for k, v in times.items()}


@dataclass(frozen=True)
class OpCosts:
    """Each layer's share of the model's latency in int8 and in float, and each requantize op's (ms):
    the ops' times alone, scaled so they add up to the measured full-int8 and float32 models."""

    int8_ms: dict[int, float]
    float_ms: dict[int, float]
    requantize_ms: dict[int, float]


@dataclass(frozen=True)
class CostModel:
    """Latency ≈ int8 MACs · a + float MACs · b + converted elements · c (ms), or, with ``ops``, the
    sum of each layer's own int8 or float cost, the requantize ops still in the model, and c per
    converted element.

    a and b come from the measured full-int8 and float32 latencies. MACs alone miss what detectors
    are made of: element-wise ops and requantizations cost time with no MAC, and some convs are
    faster in float (YOLOv5n's 3-channel stem); the ops timed alone price each layer as it is.
    """

    int8_ms_per_mac: float
    float_ms_per_mac: float
    boundary_ms_per_element: float
    ops: OpCosts | None = None

    @classmethod
    def from_measurements(cls, lg: LayerGraph, int8_ms: float, float_ms: float, alone: AloneTimes | None = None) -> CostModel:
        """From the full-int8 and float32 latencies; with ``alone``, priced op by op (unless the parts
        cannot add up to the whole: then by MACs)."""
        total = max(1, sum(lg.macs.values()))
        # Converting one element (load, scale, round, store) costs about as much as ~20 int8 MACs.
        by_macs = cls(int8_ms / total, float_ms / total, 20.0 * int8_ms / total)
        if alone is None:
            return by_macs
        c = alone.conversion_ms_per_element if alone.conversion_ms_per_element is not None else by_macs.boundary_ms_per_element
        q = {i: alone.int8.get(i) or 0.0 for i in lg.layers}
        f = {i: alone.float32.get(i) or 0.0 for i in lg.layers}
        r = {op.op: alone.requantize.get(op.op) or 0.0 for op in lg.requantizations}
        int8_parts, float_parts = sum(q.values()) + sum(r.values()), sum(f.values())
        int8_rest = int8_ms - c * _converted(lg, frozenset())
        float_rest = float_ms - c * _converted(lg, frozenset(lg.layers))
        if int8_parts <= 0 or float_parts <= 0 or int8_rest <= 0 or float_rest <= 0:
            return by_macs
        sq, sf = int8_rest / int8_parts, float_rest / float_parts
        ops = OpCosts({i: sq * v for i, v in q.items()}, {i: sf * v for i, v in f.items()}, {k: sq * v for k, v in r.items()})
        return cls(by_macs.int8_ms_per_mac, by_macs.float_ms_per_mac, c, ops)

    @classmethod
    def fit(cls, lg: LayerGraph, int8_ms: float, float_ms: float, probe: Iterable[int], probe_ms: float) -> CostModel:
        """The three costs solved from three measured models: full int8, full float32, and int8 with the
        ``probe`` layers float (few MACs, many crossings), so the conversion cost is measured too."""
        total = max(1, sum(lg.macs.values()))
        rows, times = [], []
        for fs, ms in ((frozenset(), int8_ms), (frozenset(lg.macs), float_ms), (frozenset(probe), probe_ms)):
            f_macs = sum(lg.macs[i] for i in fs)
            rows.append([total - f_macs, f_macs, _converted(lg, fs)])
            times.append(ms)
        a, b, c = np.linalg.lstsq(np.asarray(rows, np.float64), np.asarray(times, np.float64), rcond=None)[0]
        if c < 0 or a <= 0 or b <= 0:  # noise: fall back to MACs only, conversions free
            return cls(int8_ms / total, float_ms / total, max(0.0, float(c)))
        return cls(float(a), float(b), float(c))

    def latency_ms(self, lg: LayerGraph, float_set: Iterable[int]) -> float:
        fs = frozenset(float_set)
        converted = _converted(lg, fs) * self.boundary_ms_per_element
        if self.ops is not None:
            ops = self.ops
            return (sum(ops.float_ms[i] if i in fs else ops.int8_ms[i] for i in lg.layers)
                    + sum(ops.requantize_ms[k] for k in lg.requantizations_kept(fs)) + converted)
        f_macs = sum(lg.macs[i] for i in fs)
        i_macs = sum(lg.macs.values()) - f_macs
        return i_macs * self.int8_ms_per_mac + f_macs * self.float_ms_per_mac + converted

    @classmethod
    def from_record(cls, d: dict) -> CostModel:
        """A per-MAC model back from :meth:`record` (a device's costs, kept per target)."""
        return cls(d["int8_ms_per_mac"], d["float_ms_per_mac"], d["boundary_ms_per_element"])

    def record(self) -> dict:
        """What tune.json keeps of it: the per-op tables stay in host_latency.json."""
        return {"int8_ms_per_mac": self.int8_ms_per_mac, "float_ms_per_mac": self.float_ms_per_mac,
                "boundary_ms_per_element": self.boundary_ms_per_element, "priced": "per MAC" if self.ops is None else "per op"}


def _converted(lg: LayerGraph, float_set: frozenset[int]) -> int:
    """Elements passing through a QUANTIZE or DEQUANTIZE the mixed model holds."""
    return sum(lg.elements.get(t, 1) for t in _crossings(lg, float_set))


def boundary_probe(lg: LayerGraph, size: int = 8) -> frozenset[int]:
    """Cheap layers, no two adjacent: keeping them float adds many int8<->float crossings and few
    float MACs, which is what measuring the conversion cost needs."""
    chosen: set[int] = set()
    for i in sorted(lg.macs, key=lambda i: (lg.macs[i], i)):
        if len(chosen) >= size:
            break
        if not (lg.neighbours(i) & chosen):
            chosen.add(i)
    return frozenset(chosen)


# A growth step saving less than this share of the full-int8 estimate is not worth a layer: paired
# latency measurements on a host or board scatter by about as much, while every extra float layer
# moves accuracy (on EfficientNet-Lite0 per-tensor, growing {stem, b0 dw} by b0 project for a 0.2 %
# estimated saving cost 0.6 top-1 points on held-out images).
MIN_GROWTH_SAVING = 0.01


def grow_regions(lg: LayerGraph, float_set: Iterable[int], cost: CostModel, never: Iterable[int] = (),
                 predicted_gain: Mapping[int, float] | None = None, min_saving: float = MIN_GROWTH_SAVING) -> frozenset[int]:
    """Add neighbouring layers (except ``never``) to the float set while each addition lowers the
    estimated latency by at least ``min_saving`` of the full-int8 estimate.

    A layer whose ``predicted_gain`` (the analysis's first-order estimate of what keeping it float does
    to the output error, e.g. its output share) is negative is never added: latency is not bought
    with accuracy the analysis already expects to lose.
    """
    current, never = frozenset(float_set), frozenset(never)
    if predicted_gain is not None:
        never |= {i for i, g in predicted_gain.items() if g is not None and g < 0}
    threshold = min_saving * cost.latency_ms(lg, ())
    best = cost.latency_ms(lg, current)
    improved = True
    while improved:
        improved = False
        frontier = sorted({n for i in current for n in lg.neighbours(i)} - current - never)
        for candidate in frontier:
            trial = lg.closed(current | {candidate}, never)
            latency = cost.latency_ms(lg, trial)
            if latency < best - max(threshold, 1e-12):
                current, best, improved = trial, latency, True
    return current


def prefix_choices(order: Sequence[int], lg: LayerGraph, cost: CostModel | None, always: Iterable[int] = (),
                   never: Iterable[int] = (), predicted_gain: Mapping[int, float] | None = None) -> list[frozenset[int]]:
    """Float set for k = 0 … n most sensitive layers (plus ``always``), fusion-aware (grown into
    regions, never over a layer in ``never`` or one predicted to lose accuracy) when ``cost`` is given."""
    base = frozenset(always)
    choices = []
    for k in range(len(order) + 1):
        chosen = lg.closed(base | frozenset(order[:k]), never)
        choices.append(grow_regions(lg, chosen, cost, never, predicted_gain) if cost is not None and chosen else chosen)
    return choices


@dataclass
class SearchResult:
    k: int | None  # smallest k found that meets the budget (None: unreachable)
    evaluated: dict[int, dict]  # k -> evaluation
    best_k: int  # best k evaluated (meets the budget, else highest score)


def bisect_smallest(n: int, evaluate: Callable[[int], dict], meets: Callable[[dict], bool],
                    score: Callable[[dict], float], first: int | Callable[[], int | None] | None = None) -> SearchResult:
    """Smallest k in 0…n whose evaluation meets the budget, in at most :func:`max_evaluations`.

    Accuracy is not monotonic in k (one more float layer can lower it), so this finds a k that meets
    the budget with k − 1 (or a smaller evaluated k) failing, not a global minimum; every evaluation
    is kept so the caller can report them. ``first``: a k the analysis expects to meet the budget (or
    what computes it, asked only once k = 0 has failed), tried right after k = 0; when it falls short the search doubles k from there (the analysis was
    right about where the error sits, not about how much of it matters), then bisects the last doubling.
    """
    evaluated: dict[int, dict] = {}

    def ev(k: int) -> dict:
        if k not in evaluated:
            evaluated[k] = evaluate(k)
        return evaluated[k]

    def best() -> int:
        passing = [k for k, e in evaluated.items() if meets(e)]
        return min(passing) if passing else max(evaluated, key=lambda k: (score(evaluated[k]), -k))

    if meets(ev(0)):
        return SearchResult(0, evaluated, 0)
    lo, hi = 0, n
    if callable(first):
        first = first()
    if first is not None and 0 < first < n:
        k = first
        while k < n and not meets(ev(k)):
            lo, k = k, min(2 * k, n)
        hi = k
    if hi == n and not meets(ev(n)):
        return SearchResult(None, evaluated, best())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(ev(mid)):
            hi = mid
        else:
            lo = mid
    return SearchResult(hi, evaluated, hi)


def max_evaluations(n: int, first: int | None = None) -> int:
    """The most evaluations :func:`bisect_smallest` makes: ⌈log2 n⌉ + 2; with a ``first`` guess, k = 0,
    the doublings from it up to n, and a bisection of the last one."""
    plain = math.ceil(math.log2(max(n, 1))) + 2
    if first is None or not 0 < first < n:
        return plain
    return 1 + math.ceil(math.log2(n / first)) + 1 + plain - 3
