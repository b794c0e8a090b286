"""Local metrics from exactly one float run and one int8 run (QuantuneV2's O(n) analysis).

Both interpreters keep every intermediate tensor; each sample goes through the float model once
and the int8 model once, and every matched layer's output (and its inputs) is compared on the fly,
so the cost is 2·K invocations whatever the number of layers. On the first samples each layer's own
error is measured too: a kernel model holding one copy of every layer's float op runs them all on the
int8 model's tensors in one invocation per sample (a float pass's work, counted apart as
``layer_kernels``). Between invocations, the comparisons of a sample's tensors run in as many
threads as the interpreters use. A small separate check confirms
that keeping all tensors did not change the models' outputs (google-ai-edge/LiteRT#413); its
invocations are counted apart.
"""
from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from quantune_edge.analyze import sensitivity
from quantune_edge.analyze.grad import adjoint_model, backprop, kernel_model
from quantune_edge.common.console import Reporter, captured_native_output
from quantune_edge.common.metrics import ErrorStats, pooled_sqnr_db, sqnr_db
from quantune_edge.common.preprocessing import Preprocessing, Samples
from quantune_edge.common.records import SCHEMA_VERSION, now_iso, write_json
from quantune_edge.compile.artifacts import ANALYSIS_CSV, ANALYSIS_JSON, ANALYSIS_PNG, CompiledModel
from quantune_edge.errors import InputError, QuantuneError
from quantune_edge.model import tflite_graph
from quantune_edge.model.layers import WEIGHTED_OPS, Layer, LayerMatch, dequantized_weights, match_layers, requantized_tails, unit_notes
from quantune_edge.model.runtime import TfliteRunner, stack_samples
from quantune_edge.tasks.base import compare

CONSISTENCY_SAMPLES = 2
# Layers whose own error is measured: weighted ops and ops that join tensors.
LOCAL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "CONCATENATION")
# Samples on which each layer's own error is measured (its float op on the int8 input, all layers in
# one kernel-model invocation) and traced to the logits by one backward pass (one adjoint-model
# invocation); the output attribution keeps improving up to ~32 samples, the local metrics converge fast.
LOCAL_SAMPLES = 16


class AnalysisError(QuantuneError):
    """The analysis met values it cannot compare (NaN/Inf) or models that do not belong together."""


@dataclass
class AnalysisOptions:
    num_samples: int = 32
    seed: int = 0
    threads: int = 2
    metric: str = sensitivity.DEFAULT_METRIC
    local_samples: int = LOCAL_SAMPLES
    preprocessing: Preprocessing | None = None  # default: the compile's
    oracle: bool = False
    verbose: bool = False


@dataclass
class AnalysisReport:
    model: dict
    samples: dict
    metric: str
    layers: list[dict]
    sensitivity_order: list[int]
    scores: dict[str, list[float]]
    invocations: dict
    preserve_all_tensors_check: dict
    timings_s: dict
    unmatched: dict
    model_output: dict
    oracle: dict | None = None
    kind: str = "quantune-edge/analysis"
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=now_iso)

    def to_dict(self) -> dict:
        return asdict(self)

    def layer_metrics(self) -> list[sensitivity.LayerMetrics]:
        return [sensitivity.LayerMetrics(**d) for d in self.layers]

    def most_sensitive(self, n: int) -> list[dict]:
        by_index = {d["index"]: d for d in self.layers}
        return [by_index[i] for i in self.sensitivity_order[:n]]


def _weight_metrics(layer: Layer, fg: tflite_graph.TfliteGraph, qg: tflite_graph.TfliteGraph) -> tuple[float | None, float | None]:
    if layer.float_weight is None or layer.int8_weight is None:
        return None, None
    w_float = fg.tensors[layer.float_weight].data
    w_int8 = qg.tensors[layer.int8_weight]
    if w_float is None or w_int8.data is None:
        return None, None
    if w_float.shape != w_int8.data.shape:
        raise AnalysisError(f"layer {layer.name!r}: float weights {w_float.shape} and int8 weights {w_int8.data.shape} differ")
    approx = dequantized_weights(w_int8)
    return sqnr_db(w_float, approx), float(np.mean((w_float.astype(np.float64) - approx) ** 2))


def _kernel_jobs(match: LayerMatch, fg: tflite_graph.TfliteGraph, qg: tflite_graph.TfliteGraph) -> dict[int, int | kernel_model.Group]:
    """Layer index -> what its own error is measured on: its float op, for the ops with weights or
    several activation inputs (LOCAL_OPS), where the int8 op reads exactly the float op's activation
    inputs; and for the first layer reading a requantized tensor, the float ops of the whole
    requantized tail (``model.layers.requantized_tails``), read at the tail's exits."""
    jobs: dict[int, int | kernel_model.Group] = {}
    for layer in match.layers:
        if layer.op_type in LOCAL_OPS and layer.int8_inputs and len(layer.int8_inputs) == len(layer.float_inputs):
            if layer.op_type not in WEIGHTED_OPS or fg.tensors[fg.ops[layer.float_op].inputs[1]].is_constant:
                jobs[layer.index] = layer.float_op
    by_index = {layer.index: layer for layer in match.layers}
    for tail in requantized_tails(match, qg):
        members = {by_index[i].float_op for i in tail.layers}
        outputs = {t: i for i in tail.layers for t in fg.ops[by_index[i].float_op].outputs}
        exits = [t for t in outputs if t in fg.outputs or any(op.index not in members for op in fg.consumers(t))]
        jobs[tail.entry] = kernel_model.Group(tuple(sorted(members)), tuple(exits))
    return jobs


@dataclass
class Collected:
    """What the two passes yield: per-int8-tensor error stats, per-layer local error stats, per-layer
    output attribution (share of the logit error energy, first order), and both models' outputs."""

    stats: dict[int, ErrorStats]
    local: dict[int, ErrorStats]
    attribution: dict[int, float]
    attribution_note: str | None  # why there is no attribution, when there is none
    float_out: np.ndarray
    int8_out: np.ndarray
    float_outputs: list[np.ndarray] = field(default_factory=list)  # every model output, stacked (several-output models only)
    int8_outputs: list[np.ndarray] = field(default_factory=list)
    kernel_invocations: int = 0  # of the layer-kernel model (one per local sample)
    backward_engine: str | None = None  # what ran the backward passes: "tflite" or "numpy"
    backward_passes: int = 0
    clock: dict[str, float] = field(default_factory=dict)  # seconds spent per part of the loop


def _output_grid(qg: tflite_graph.TfliteGraph, tensor: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """Rounding (and clipping), in place, to the int8 grid of ``tensor``, when an int8 op reads it (not
    only a DEQUANTIZE to the model output); None when the value leaves the model unrounded."""
    info = qg.tensors[tensor]
    if not info.scales or info.dtype != "int8" or all(op.type == "DEQUANTIZE" for op in qg.consumers(tensor)):
        return None
    scale, zero_point = np.float32(info.scales[0]), np.float32(info.zero_points[0])

    def regrid(y: np.ndarray) -> np.ndarray:  # runtime.quantize + dequantize of y, in place, without an int8 copy
        y /= scale
        y += zero_point
        np.round(y, out=y)
        np.minimum(y, 127, out=y)
        np.maximum(y, -128, out=y)
        y -= zero_point
        y *= scale
        return y

    return regrid


def balanced(items: list[int], size: Callable[[int], int], parts: int) -> list[list[int]]:
    """``items`` dealt into ``parts`` lists of about equal total size, largest first."""
    out: list[list[int]] = [[] for _ in range(max(parts, 1))]
    load = [0] * len(out)
    for item in sorted(items, key=size, reverse=True):
        k = load.index(min(load))
        out[k].append(item)
        load[k] += size(item)
    return [part for part in out if part]


def _lap(clock: dict[str, float], part: str, since: float) -> float:
    now = time.perf_counter()
    clock[part] += now - since
    return now


def _kernel_key(layer: int, job: int | kernel_model.Group) -> Hashable:
    """A layer's job in the kernel model: its float op's index, or ("tail", layer) for a group."""
    return ("tail", layer) if isinstance(job, kernel_model.Group) else job


def _float_side_needs(match: LayerMatch, jobs: dict[int, int | kernel_model.Group], copies: bool = True
                      ) -> tuple[dict[Hashable, int | kernel_model.Group], set[int]]:
    """For the layers of ``jobs``: the kernel jobs (op -> op; ``-1 - op`` -> op for a second copy fed
    what a float copy of the layer reads, for a layer whose int8 op reads a quantized or requantized
    copy of a value, unless ``copies`` is False: without local statistics the op's one copy is fed
    that; ("tail", layer) -> a requantized tail's group) and the float tensors the backward pass must
    reach."""
    by_index = {layer.index: layer for layer in match.layers}
    int8_of = match.int8_tensors()
    kernel_jobs: dict[Hashable, int | kernel_model.Group] = {}
    wanted: set[int] = set()
    for i, job in jobs.items():
        kernel_jobs[_kernel_key(i, job)] = job
        if isinstance(job, kernel_model.Group):
            wanted.update(job.exits)
            continue
        wanted.add(by_index[i].float_output)
        if copies and any(int8_of[match.tensor_map[t]] != t for t in by_index[i].int8_inputs if t in match.tensor_map):
            kernel_jobs[-1 - job] = job
    return kernel_jobs, wanted


@dataclass
class FloatSide:
    """What an analysis runs on the float side besides the float model itself: one kernel-model copy
    of each float op whose own error is measured (keyed by op index; ``-1 - op`` for a copy fed the
    float model input), and the backward pass from the logits to those ops' outputs. None of it
    depends on the int8 model compared, so tune's re-ranking builds it once for all its mixed models."""

    kernels: kernel_model.KernelRunner
    jobs: frozenset[Hashable]
    backward: Callable[[dict[int, np.ndarray], Callable[[int], np.ndarray]], dict[int, np.ndarray]] | None
    engine: str | None
    wanted: frozenset[int]

    @classmethod
    def build(cls, float_runner: TfliteRunner, fg: tflite_graph.TfliteGraph, jobs: dict[Hashable, int | kernel_model.Group],
              logits: list[int] | None, wanted: set[int]) -> FloatSide:
        """``jobs``: kernel job -> float op index or group; ``logits``: where the backward pass starts (None: no backward pass)."""
        kernels = kernel_model.KernelRunner(kernel_model.build(float_runner.path, jobs), float_runner.threads)
        backward, engine = (None, None) if logits is None else adjoint_model.backward_pass(fg, logits, wanted, float_runner.threads)
        return cls(kernels, frozenset(jobs), backward, engine, frozenset(wanted) if logits is not None else frozenset())

    def covers(self, jobs: dict[Hashable, int | kernel_model.Group], wanted: set[int] | None) -> bool:
        """Whether it holds these kernel jobs and (unless None) a backward pass reaching ``wanted``."""
        return self.jobs >= jobs.keys() and (wanted is None or (self.backward is not None and self.wanted >= wanted))


def collect_tensor_stats(
    match: LayerMatch,
    float_runner: TfliteRunner,
    int8_runner: TfliteRunner,
    fg: tflite_graph.TfliteGraph,
    qg: tflite_graph.TfliteGraph,
    inputs: np.ndarray,
    attributed: list[int],
    on_item: Callable[[], None] | None = None,
    local_samples: int = LOCAL_SAMPLES,
    shares_only: bool = False,
    float_side: FloatSide | None = None,
) -> Collected:
    """One float and one int8 invocation per sample. On the first ``local_samples`` samples each
    layer's own error is also measured (its float op, run by a kernel model on the int8 model's
    input), and the part of it that keeping the layer float would remove is attributed to the logit
    error by one backward pass, linearised around the int8 run (whose activations decide which ReLUs
    let an error through).

    ``shares_only`` skips every error statistic (tensor and local), which callers of the attribution
    alone do not read (tune's re-ranking rounds: about 0.3 s of each round's 2.4 s). ``float_side`` is
    used when it covers this match's layers; otherwise one is built for them. ``attributed``: the float
    model's tensors the task attributes error to (a classifier's logits; every output of a detector,
    each weighted by its own float energy, so a box output in pixels and a score output in 0..1 count alike)."""
    run = _StatsPass(match, float_runner, int8_runner, fg, qg, attributed, local_samples, shares_only, float_side)
    # The numpy comparisons run between invocations, when XNNPACK's threads are idle: each sample's
    # tensors (and jobs) are dealt to as many threads, numpy releasing the GIL in its loops.
    with ThreadPoolExecutor(max(len(run.tensor_parts), 1)) as pool:
        for n, x in enumerate(inputs):
            run.sample(pool, x, local=n < local_samples)
            if on_item:
                on_item()
    return run.collected()


class _StatsPass:
    """The state of one ``collect_tensor_stats`` pass, with one method per step of a sample."""

    def __init__(self, match: LayerMatch, float_runner: TfliteRunner, int8_runner: TfliteRunner, fg: tflite_graph.TfliteGraph,
                 qg: tflite_graph.TfliteGraph, attributed: list[int], local_samples: int, shares_only: bool,
                 float_side: FloatSide | None) -> None:
        self.match, self.float_runner, self.int8_runner, self.qg = match, float_runner, int8_runner, qg
        self.shares_only = shares_only
        needed: set[int] = set()
        if not shares_only:
            needed = {layer.int8_output for layer in match.layers}
            needed |= {t for layer in match.layers for t in layer.int8_inputs if t in match.tensor_map}
        self.stats = {t: ErrorStats() for t in needed}
        self.names = {layer.int8_output: layer.name for layer in match.layers}
        self.by_index = {layer.index: layer for layer in match.layers}
        self.jobs = jobs = _kernel_jobs(match, fg, qg)
        self.local = {i: ErrorStats() for i, job in jobs.items() if not isinstance(job, kernel_model.Group)}
        self.int8_of = match.int8_tensors()
        self.float_logits = attributed
        self.int8_logits = [self.int8_of.get(t) for t in attributed]
        self.note = None if None not in self.int8_logits else "the int8 model's logits are not matched to the float model's"
        self.attribution = {i: 0.0 for i in jobs}
        self.residual_energy = 0.0
        # What keeping a layer float removes: its float copy reads the values before any (re)quantizing
        # copy (the spliced mixed model looks through QUANTIZE ops), and its output is re-quantized to the
        # same grid wherever an int8 op reads it.
        kernel_jobs, wanted = _float_side_needs(match, jobs, copies=not shares_only)
        self.kernel_key = {i: _kernel_key(i, job) for i, job in jobs.items()}
        self.float_runner_inputs = set(fg.inputs)
        self.reads_copy = {i for i, job in jobs.items() if not isinstance(job, kernel_model.Group) and -1 - job in kernel_jobs}
        self.regrid = {t: g for t in {self.int8_of[f] for f in wanted if f in self.int8_of}
                       if (g := _output_grid(qg, t)) is not None}
        self.float_side: FloatSide | None = None
        self.first_invocation = 0
        if jobs and local_samples > 0:
            if float_side is None or not float_side.covers(kernel_jobs, wanted if self.note is None else None):
                float_side = FloatSide.build(float_runner, fg, kernel_jobs, attributed if self.note is None else None, wanted)
            self.float_side = float_side
            self.first_invocation = float_side.kernels.invocations
        self.passes = 0
        self.tensor_parts = balanced(sorted(needed), self._size, float_runner.threads)
        self.job_parts = balanced(sorted(jobs), lambda i: self._size(self.by_index[i].int8_output), float_runner.threads)
        self.float_outs: list[np.ndarray] = []
        self.int8_outs: list[np.ndarray] = []
        self.several = len(float_runner.outputs) > 1
        self.float_all: list[list[np.ndarray]] = []
        self.int8_all: list[list[np.ndarray]] = []
        self.clock = dict.fromkeys(("invocations", "compare", "local_errors", "backward"), 0.0)  # where the time goes, seconds
        self.values: dict[int, np.ndarray] = {}

    def _size(self, t: int) -> int:
        return math.prod(self.qg.tensors[t].shape)

    def _int8_value(self, t: int) -> np.ndarray:
        """The dequantized int8 tensor ``t`` of the current sample, computed once per sample."""
        if t not in self.values:
            self.values[t] = self.int8_runner.tensor(t)
        return self.values[t]

    def sample(self, pool: ThreadPoolExecutor, x: np.ndarray, local: bool) -> None:
        mark = time.perf_counter()
        self.float_outs.append(self.float_runner.invoke(x[None]))
        self.int8_outs.append(self.int8_runner.invoke(x[None]))
        if self.several:
            self.float_all.append(self.float_runner.last_outputs())
            self.int8_all.append(self.int8_runner.last_outputs())
        self.values = {}
        mark = _lap(self.clock, "invocations", mark)
        self._compare(pool)
        mark = _lap(self.clock, "compare", mark)
        if local and self.float_side is not None:
            errors = self._removable_errors(pool)
            mark = _lap(self.clock, "local_errors", mark)
            self._attribute(errors)
            _lap(self.clock, "backward", mark)

    def _compare(self, pool: ThreadPoolExecutor) -> None:
        """Adds this sample to every compared tensor's stats; refuses NaN or Inf."""
        def compare(part: list[int]) -> int | None:
            for t in part:
                if not self.stats[t].add(self.float_runner.view(self.match.tensor_map[t]), self._int8_value(t)):
                    return t
            return None

        for t in pool.map(compare, self.tensor_parts):
            if t is not None:
                raise AnalysisError(f"NaN or Inf in layer {self.names.get(t, self.qg.tensors[t].name)!r} (float or int8 output); cannot compare")

    def _removable_errors(self, pool: ThreadPoolExecutor) -> dict[int, list[tuple[int, np.ndarray]]]:
        """Layer -> (float tensor, what keeping the layer float removes from this sample's int8 value
        there) for each tensor its float copy writes; each single op's own error (on its own int8
        input) is added to its local stats on the way."""
        assert self.float_side is not None
        jobs, by_index, int8_of = self.jobs, self.by_index, self.int8_of
        sources = self.float_side.kernels.kernels.sources
        seen = self._seen_value
        own_input = set() if self.shares_only else set(self.local)  # else fed what a float copy reads
        feeds = {self.kernel_key[i]: [self._int8_value(t) for t in by_index[i].int8_inputs] for i in own_input}
        feeds.update({-1 - jobs[i]: [seen(f) for f in sources[-1 - jobs[i]]] for i in self.reads_copy})  # type: ignore[operator]
        feeds.update({self.kernel_key[i]: [seen(f) for f in sources[self.kernel_key[i]]] for i in jobs if i not in own_input})
        refs = self.float_side.kernels.run(feeds)
        errors: dict[int, list[tuple[int, np.ndarray]]] = {}

        def removable(i: int) -> list[tuple[int, np.ndarray]]:
            job = jobs[i]
            if isinstance(job, kernel_model.Group):
                pairs = list(zip(job.exits, refs[self.kernel_key[i]]))
            else:
                own = self._int8_value(by_index[i].int8_output)
                if not self.shares_only:
                    self.local[i].add(refs[job][0], own)
                pairs = [(by_index[i].float_output, refs.get(-1 - job, refs[job])[0])]  # type: ignore[operator]
            out = []
            for f, ref in pairs:  # the kernel runner's own copies: rewritten in place
                t = int8_of[f]
                ref = self.regrid[t](ref) if t in self.regrid else ref
                out.append((f, np.subtract(self._int8_value(t), ref, out=ref)))
            return out

        def local_errors(part: list[int]) -> None:
            for i in part:
                errors[i] = removable(i)

        list(pool.map(local_errors, self.job_parts))
        return errors

    def _seen_value(self, f: int) -> np.ndarray:
        """What a float copy reading float tensor ``f`` gets in the mixed model: the int8 value at its own
        scale (before any requantize), or the float model input itself."""
        t = self.int8_of.get(f)
        return self.float_runner.tensor(f) if t is None or f in self.float_runner_inputs else self._int8_value(t)

    def _attribute(self, errors: dict[int, list[tuple[int, np.ndarray]]]) -> None:
        """One backward pass from this sample's logit error; adds each layer's share of it."""
        if self.note is not None:
            return
        assert self.float_side is not None and self.float_side.backward is not None
        seeds = {}
        for f, q in zip(self.float_logits, self.int8_logits):
            assert q is not None
            reference = self.float_runner.tensor(f)
            residual = self._int8_value(q) - reference
            weight = 1.0 if len(self.float_logits) == 1 else 1.0 / max(float(np.mean(np.square(reference, dtype=np.float64))), 1e-12)
            self.residual_energy += weight * float(np.vdot(residual, residual))
            seeds[f] = weight * residual
        int8_of = self.int8_of
        try:
            self.passes += 1
            back = self.float_side.backward(seeds, lambda t: self._int8_value(int8_of[t]) if t in int8_of else self.float_runner.tensor(t))
            shares = backprop.output_error_attribution(back, errors)
        except backprop.Unsupported as exc:
            self.note = f"no backward rule for {exc} between a layer and the logits"
        else:
            for i in self.jobs:
                self.attribution[i] += shares.get(i, math.nan)

    def collected(self) -> Collected:
        note, side = self.note, self.float_side
        if note is None and side is None:
            note = "no layer whose own error is measured reaches the logits" if not self.jobs else "no sample was local"
        if note is None and self.residual_energy == 0:
            note = "the int8 model's logits equal the float model's"
        attribution = {} if note else {i: v / self.residual_energy for i, v in self.attribution.items() if not math.isnan(v)}
        if not attribution and note is None:
            note = "no layer whose own error is measured reaches the logits"
        every = [[stack_samples([s[k] for s in runs]) for k in range(len(runs[0]))] if runs else [] for runs in (self.float_all, self.int8_all)]
        return Collected(self.stats, self.local, attribution, note, stack_samples(self.float_outs), stack_samples(self.int8_outs),
                         every[0], every[1], side.kernels.invocations - self.first_invocation if side else 0, side.engine if side else None, self.passes,
                         {k: round(v, 3) for k, v in self.clock.items()})


class OutputShares:
    """Output shares of the layers still int8 in a mixed model from this compile, by layer name: what
    keeping each of them float too would take off that model's own logit error, to first order. Every
    sample of ``inputs`` is local (one float, one mixed invocation and one backward pass each).

    One object serves one mixed model after another (tune's re-ranking): the float model's
    interpreter, kernel model and backward pass are built once, for every layer of the full-int8
    model (a superset of any mixed model's int8 layers), which saves about 0.4 s per model."""

    def __init__(self, compiled: CompiledModel, threads: int = 2, quiet: bool = True) -> None:
        self.compiled, self.threads, self.quiet = compiled, threads, quiet
        with captured_native_output(quiet):
            self.float_runner = TfliteRunner(compiled.float_model, threads, preserve_all_tensors=True)
        self.float_side: FloatSide | None = None

    def __call__(self, model: Path, inputs: np.ndarray) -> dict[str, float]:
        """Raises AnalysisError when the attribution cannot be made (the reason is in the message)."""
        compiled = self.compiled
        fg, mg = compiled.float_graph, tflite_graph.read(model)
        match = match_layers(fg, mg, compiled.calibrated_graph)
        with captured_native_output(self.quiet):
            mixed_runner = TfliteRunner(model, self.threads, preserve_all_tensors=True)
            if self.float_side is None:
                self.float_side = self._full_int8_side()
        collected = collect_tensor_stats(match, self.float_runner, mixed_runner, fg, mg, inputs, compiled.task.attributed_tensors(fg),
                                         local_samples=len(inputs),
                                         shares_only=True, float_side=self.float_side)
        if collected.attribution_note:
            raise AnalysisError(f"no output shares for {model.name}: {collected.attribution_note}")
        return {layer.name: collected.attribution[layer.index] for layer in match.layers if layer.index in collected.attribution}

    def _full_int8_side(self) -> FloatSide | None:
        """The float side for every layer of the full-int8 model; None when that model has no such
        layers or unmatched logits (each call then builds what it needs, or says why it cannot)."""
        match, fg = self.compiled.layer_match, self.compiled.float_graph
        logits = self.compiled.task.attributed_tensors(fg)
        kernel_jobs, wanted = _float_side_needs(match, _kernel_jobs(match, fg, self.compiled.int8_graph), copies=False)
        if not kernel_jobs or not set(logits) <= set(match.tensor_map.values()):
            return None
        return FloatSide.build(self.float_runner, fg, kernel_jobs, logits, wanted)


def output_shares(compiled: CompiledModel, model: Path, inputs: np.ndarray, threads: int = 2, quiet: bool = True) -> dict[str, float]:
    """:class:`OutputShares` of one mixed model."""
    return OutputShares(compiled, threads, quiet)(model, inputs)


def layer_metrics(match: LayerMatch, collected: Collected, fg, qg, sources: dict[int, dict] | None = None) -> list[sensitivity.LayerMetrics]:
    """``sources``: float32 op index -> its ONNX trace entry (:meth:`CompiledModel.onnx_sources`)."""
    out = []
    stats, local, sources = collected.stats, collected.local, sources or {}
    units = unit_notes(match, qg)
    for layer in match.layers:
        source = sources.get(layer.float_op, {})
        s = stats[layer.int8_output]
        in_stats = [stats[t] for t in layer.int8_inputs if t in stats]
        in_sqnr = pooled_sqnr_db(in_stats) if in_stats else math.inf
        w_sqnr, w_mse = _weight_metrics(layer, fg, qg)
        q = qg.tensors[layer.int8_output]
        own = local.get(layer.index)
        own_ok = own is not None and own.count > 0
        scale = q.scales[0] if q.scales else None
        out.append(
            sensitivity.LayerMetrics(
                index=layer.index, name=layer.name, short_name=layer.short_name, op_type=layer.op_type,
                params=layer.params, macs=layer.macs, fused_activation=layer.fused_activation,
                act_sqnr_db=s.sqnr_db, act_mse=s.mse, act_nmse=s.nmse, act_max_abs_err=s.max_abs,
                act_scale=scale, act_zero_point=q.zero_points[0] if q.zero_points else None,
                input_sqnr_db=in_sqnr, sqnr_delta_db=sensitivity.sqnr_delta(in_sqnr, s.sqnr_db),
                weight_sqnr_db=w_sqnr, weight_mse=w_mse,
                local_sqnr_db=own.sqnr_db if own_ok else None,
                local_rmse_lsb=math.sqrt(own.mse) / scale if own_ok and scale else None,
                output_share=collected.attribution.get(layer.index),
                onnx_nodes=list(source.get("onnx_nodes", [])), onnx_ops=list(source.get("onnx_ops", [])),
                unit=units.get(layer.index),
            )
        )
    return out


def _onnx_sources(compiled: CompiledModel, reporter: Reporter) -> dict[int, dict]:
    try:
        return compiled.onnx_sources()
    except InputError as exc:
        reporter.warn(f"layers keep their TFLite names only: {exc}")
        return {}


def _consistency_check(compiled: CompiledModel, inputs: np.ndarray, float_out: np.ndarray, int8_out: np.ndarray, threads: int) -> dict:
    """Outputs with experimental_preserve_all_tensors vs without, on the first few samples."""
    n = min(CONSISTENCY_SAMPLES, len(inputs))
    plain_f = TfliteRunner(compiled.float_model, threads)
    plain_q = TfliteRunner(compiled.int8_model, threads)
    diff_f = float(np.max(np.abs(plain_f.run(inputs[:n]) - float_out[:n])))
    diff_q = float(np.max(np.abs(plain_q.run(inputs[:n]) - int8_out[:n])))
    return {"samples": n, "invocations": plain_f.invocations + plain_q.invocations,
            "float32_max_abs_diff": diff_f, "int8_max_abs_diff": diff_q, "identical": diff_f == 0.0 and diff_q == 0.0}


def analyze(
    compile_dir: str | Path,
    calib: str | Path,
    options: AnalysisOptions | None = None,
    reporter: Reporter | None = None,
) -> AnalysisReport:
    """Per-layer local metrics and the sensitivity ranking; writes analysis.json/.csv/.png."""
    options = options or AnalysisOptions()
    reporter = reporter or Reporter(quiet=True)
    _check_options(options)
    compiled = CompiledModel.open(compile_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    fg, qg, match = compiled.float_graph, compiled.int8_graph, _checked_match(compiled)
    timings["match_layers"] = round(time.perf_counter() - start, 3)

    with reporter.progress() as progress:
        task = progress.add_task("reading samples", total=options.num_samples)
        samples = compiled.load_samples(calib, options.num_samples, options.seed, options.preprocessing, lambda: progress.advance(task))
        progress.update(task, completed=len(samples) + len(samples.skipped), total=len(samples) + len(samples.skipped))
        inputs = compiled.tflite_inputs(samples)
        task = progress.add_task("one float + one int8 pass", total=len(samples))
        start = time.perf_counter()
        with captured_native_output(not options.verbose):
            float_runner = TfliteRunner(compiled.float_model, options.threads, preserve_all_tensors=True)
            int8_runner = TfliteRunner(compiled.int8_model, options.threads, preserve_all_tensors=True)
        collected = collect_tensor_stats(match, float_runner, int8_runner, fg, qg, inputs, compiled.task.attributed_tensors(fg),
                                         lambda: progress.advance(task), options.local_samples)
        float_out, int8_out = collected.float_out, collected.int8_out
        metrics = layer_metrics(match, collected, fg, qg, _onnx_sources(compiled, reporter))
        metric = options.metric
        if collected.attribution_note:
            fallback = metric == "output_share"
            metric = "local_rmse" if fallback else metric
            reporter.warn(f"no output_share: {collected.attribution_note}" + ("; ranking by local_rmse" if fallback else ""))
        timings["analysis"] = round(time.perf_counter() - start, 3)
        timings["analysis_parts"] = collected.clock
        start = time.perf_counter()
        with captured_native_output(not options.verbose):
            check = _consistency_check(compiled, inputs, float_out, int8_out, options.threads)
        timings["preserve_all_tensors_check"] = round(time.perf_counter() - start, 3)
        oracle_section = None
        if options.oracle:
            from quantune_edge.analyze.oracle import oracle_section as run_oracle_section

            task = progress.add_task(f"oracle: {len(metrics) + 1} builds, one layer float each", total=len(metrics))
            oracle_section = run_oracle_section(compiled, metrics, inputs, samples.labels, options.threads, timings["analysis"],
                                                lambda: progress.advance(task), quiet=not options.verbose)
            timings["oracle"] = oracle_section["wall_time_s"]
    if not check["identical"]:
        reporter.warn(f"keeping all tensors changed the model outputs (max diff float {check['float32_max_abs_diff']:.3g}, "
                      f"int8 {check['int8_max_abs_diff']:.3g}); metrics describe the preserved-tensor run")

    output = _model_output(compiled, collected, samples)
    scores = {name: [float(v) for v in sensitivity.score(metrics, name)] for name in sensitivity.SCORES}
    report = AnalysisReport(
        model={"compile_dir": str(compiled.folder.resolve()), "sha256": compiled.report.model["sha256"],
               "weights": compiled.report.quantization["weights"], "layers": len(metrics)},
        samples={"source": samples.source, "count": len(samples), "seed": options.seed, "files": samples.names,
                 "skipped": samples.skipped, "labelled": samples.labelled,
                 "local": min(options.local_samples, len(samples)), "output_share_note": collected.attribution_note,
                 "backward_pass": collected.backward_engine},
        metric=metric,
        layers=[m.to_dict() for m in metrics],
        sensitivity_order=sensitivity.ranking(metrics, metric),
        scores=scores,
        invocations={"float32": float_runner.invocations, "int8": int8_runner.invocations, "layer_kernels": collected.kernel_invocations,
                     "backward": collected.backward_passes if collected.backward_engine == "tflite" else 0},
        preserve_all_tensors_check=check,
        timings_s=timings,
        unmatched={"float32": match.unmatched_float, "int8": match.unmatched_int8},
        model_output=output,
        oracle=oracle_section,
    )
    save(report, compiled.folder)
    return report


def _check_options(options: AnalysisOptions) -> None:
    if options.metric not in sensitivity.SCORES:
        raise InputError(f"unknown metric {options.metric!r}; choose one of {', '.join(sensitivity.SCORES)}")
    if options.num_samples <= 0:
        raise InputError(f"--num-samples must be positive, got {options.num_samples}")
    if options.local_samples <= 0:
        raise InputError(f"--local-samples must be positive, got {options.local_samples}")


def _checked_match(compiled: CompiledModel) -> LayerMatch:
    """The layer match of the compile's float32/int8 pair, refused when the two are not from one compile."""
    fg, qg, match = compiled.float_graph, compiled.int8_graph, compiled.layer_match
    quantized_ops = sum(op.type not in ("QUANTIZE", "DEQUANTIZE") for op in qg.ops)
    matched = len(match.layers) + len(match.exact)
    if not match.layers or matched < 0.5 * quantized_ops:
        raise InputError(
            f"{compiled.float_model.name} and {compiled.int8_model.name} in {compiled.folder} are not a pair from one compile "
            f"({matched} of {quantized_ops} int8 ops matched); re-run 'quantune-edge compile'"
        )
    if fg.tensors[fg.inputs[0]].shape != qg.tensors[qg.inputs[0]].shape:
        raise InputError(f"float and int8 models in {compiled.folder} take different input shapes: not a pair from one compile")
    return match


def _model_output(compiled: CompiledModel, collected: Collected, samples: Samples) -> dict:
    """The whole model's int8 error, and the task's metric of both models where there are labels.
    A model with several outputs gets each output's SQNR too (its error normalised by its own float
    RMS, so a box output in pixels and a score output in 0..1 weigh alike); the worst is named."""
    float_out, int8_out = collected.float_out, collected.int8_out
    output = compare(compiled.task, float_out, int8_out)
    output["metric"] = compiled.task.metric_name
    if collected.float_outputs:
        names = list(compiled.output_shapes) or [f"output_{k}" for k in range(len(collected.float_outputs))]
        per_output = {n: sqnr_db(f, q) for n, f, q in zip(names, collected.float_outputs, collected.int8_outputs)}
        output["outputs_sqnr_db"] = per_output
        output["worst_output"] = min(per_output, key=lambda n: per_output[n])
        output["outputs_note"] = ("each output's SQNR: its int8 error normalised by its own float32 RMS; sqnr_db is the "
                                  "first output's; the layer shares are attributed to every output, each weighted so")
    if (samples.has_labels or not compiled.task.needs_labels) and compiled.task.reads_all_outputs:
        # A metric over every output (a detector's mAP) needs runs that keep them all: two more
        # passes over the samples, counted apart from the analysis's own (as the consistency check is).
        for key, model in (("float32", compiled.float_model), ("int8", compiled.int8_model)):
            scores = compiled.task_scores(model, samples) or {}
            output[f"{key}_top1"] = scores.get(compiled.task.metric_name)
    elif samples.has_labels:
        output["float32_top1"] = compiled.task.metric(float_out, samples.labels)
        output["int8_top1"] = compiled.task.metric(int8_out, samples.labels)
    return output


def save(report: AnalysisReport, folder: Path) -> None:
    """analysis.json, analysis.csv and analysis.png of one analysis. The csv and the picture are
    written beside their places first, and nothing replaces the last analysis's files until all three
    are written: a plot that fails leaves the previous three together."""
    from quantune_edge.analyze.figures import plot_analysis

    csv_tmp, png_tmp = folder / f".{ANALYSIS_CSV}.tmp", folder / ".analysis.tmp.png"
    try:
        write_csv(report, csv_tmp)
        plot_analysis(report, png_tmp)
        write_json(folder / ANALYSIS_JSON, report.to_dict())
    except BaseException:
        csv_tmp.unlink(missing_ok=True)
        png_tmp.unlink(missing_ok=True)
        raise
    csv_tmp.replace(folder / ANALYSIS_CSV)
    png_tmp.replace(folder / ANALYSIS_PNG)


def write_csv(report: AnalysisReport, path: Path) -> None:
    rank_of = {idx: r + 1 for r, idx in enumerate(report.sensitivity_order)}
    oracle = {row["index"]: row for row in (report.oracle or {}).get("layers", [])}
    columns = ["index", "rank", "name", "short_name", "onnx_nodes", "onnx_ops", "op_type", "fused_activation", "params", "macs",
               "weight_sqnr_db", "weight_mse", "act_sqnr_db", "act_mse", "act_nmse", "act_max_abs_err",
               "act_scale", "act_zero_point", "input_sqnr_db", "sqnr_delta_db", "local_sqnr_db", "local_rmse_lsb", "output_share",
               f"score_{report.metric}"]
    if oracle:
        columns += ["oracle_output_sqnr_gain_db", "oracle_top1_agreement"]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for i, layer in enumerate(report.layers):
            values = [layer.get(c) for c in columns[2:-1 if not oracle else -3]]
            row = [layer["index"], rank_of[layer["index"]]] + [";".join(v) if isinstance(v, list) else v for v in values]
            row.append(report.scores[report.metric][i])
            if oracle:
                o = oracle.get(layer["index"], {})
                row += [o.get("output_sqnr_gain_db"), o.get("top1_agreement")]
            writer.writerow(row)
