"""Mixed precision: pick the float layers from the sensitivity list to meet a budget, emit the model.

Candidates for k = 0 … n are the k most sensitive layers grown into fusion-aware float regions
(:mod:`selection`). The first picks are re-ranked: each after the first is the top output share in an
analysis of the mixed model with the earlier picks float, because which error matters next depends on
what is float already. Each evaluation splices the float set's float32 ops into the full-int8 model
(``model.splice``: same scales, no int8 round trip between float ops) and runs it on the evaluation images. The accuracy
budget is met by bisection over k (≤ ⌈log2 n⌉ + 2 evaluations); the latency budget by bisection over
measured latency: on the host, or on the ``latency_source`` target when one is given.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from quantune_edge.analyze import sensitivity
from quantune_edge.analyze.analysis import ANALYSIS_JSON, LOCAL_SAMPLES, AnalysisError, OutputShares
from quantune_edge.common.console import Reporter, captured_native_output
from quantune_edge.common.metrics import paired_top1
from quantune_edge.common.outputs import temp_folder
from quantune_edge.common.preprocessing import Preprocessing, labelled_count
from quantune_edge.common.records import SCHEMA_VERSION, now_iso, write_atomic, write_json
from quantune_edge.compile.artifacts import BEST_FOUND, MIXED_MODEL, PARETO_PNG, TUNE_JSON, CompiledModel
from quantune_edge.deploy.targets import Target
from quantune_edge.errors import InputError, QuantuneError
from quantune_edge.model import tflite_graph
from quantune_edge.model.layers import float_units, requantizations, tensor_key
from quantune_edge.model.runtime import TfliteRunner, median_ratio, paired_latency_ms
from quantune_edge.tasks.base import FLOAT32_FOR_LABELS, Task, compare, reference_labels
from quantune_edge.tune import selection

RERANK_SAMPLES = LOCAL_SAMPLES  # evaluation images each re-ranking analysis runs on
# On per-tensor EfficientNet-Lite0 (500 images) re-ranking 10 picks met --max-drop 1 with 7 float layers
# at 0.84x int8 latency, where the analysis order needed 44 at 1.37x (bench/mixed_precision.py).
DEFAULT_RERANK = 10
# One paired mixed/int8 ratio can jump by 0.2 on a machine hiccup (1.19x vs 1.38x for one model
# here), so a ratio this close to --max-latency-ratio is measured twice more and the median decides.
REMEASURE_MARGIN = 0.05
# A first guess for the accuracy search: the fewest picks whose float set holds this much of the
# analysis's positive output shares (YOLOv5n: its three head requantizations hold 1.04 of 1.04).
PREDICTED_SHARE = 0.9


class BudgetError(QuantuneError):
    """No choice meets the budget, even with every layer float (the best found is still written)."""


@dataclass
class TuneOptions:
    max_drop: float | None = None  # top-1 points vs float (default 1.0 when no budget is given)
    min_sqnr: float | None = None  # the fidelity task's budget: the worst output's SQNR vs float32, dB
    max_latency_ratio: float | None = None  # vs full int8 on the host, or on latency_source when given
    float_layers: int | None = None  # exactly the k most sensitive (grown into regions)
    keep_float: list[str] = field(default_factory=list)
    keep_int8: list[str] = field(default_factory=list)  # never float, even to close a region
    metric: str | None = None  # rank by this analysis score instead of the analysis's own order
    rerank: int | None = None  # analyses of the mixed model so far, one per pick after the first (0: the
    # analysis order; default DEFAULT_RERANK when ranking by output share, else 0)
    latency_source: Target | None = None  # price layers with costs measured on this target, not the host; the
    # chosen model's latency is measured there too, and so is a --max-latency-ratio budget
    num_eval: int = 200
    seed: int = 1
    threads: int = 2
    fusion_aware: bool = True
    best_effort: bool = False
    pareto: bool = False
    latency_runs: int = 50  # per model, in 5 rounds alternating with the full-int8 model
    remeasure: bool = False  # measure the host's float32/int8 latencies again instead of reusing host_latency.json
    preprocessing: Preprocessing | None = None
    verbose: bool = False


@dataclass
class TuneReport:
    budget: dict
    reference: dict
    chosen: dict
    evaluations: list[dict]
    search: dict
    files: dict
    pareto: list[dict] | None = None
    kind: str = "quantune-edge/tune"
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=now_iso)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_layer_names(patterns: list[str], layers: list[dict], option: str = "--keep-float") -> set[int]:
    """Layers named by ONNX node names, TFLite tensor names or short names, or a glob or ``re:REGEX``
    on any of them (like OpenVINO's ignored scope); an unknown name lists the closest matches."""
    chosen: set[int] = set()
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as exc:
                raise InputError(f"{option} {pattern!r}: not a regular expression ({exc})") from None
            hit = lambda name: regex.search(name) is not None  # noqa: E731
        else:
            hit = lambda name: name == pattern or fnmatch.fnmatchcase(name, pattern)  # noqa: E731
        hits = {l["index"] for l in layers if any(hit(n) for n in _names(l))}
        if not hits:
            names = sorted({n for l in layers for n in _names(l)})
            close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=3, cutoff=0.4)
            raise InputError(f"{option} {pattern!r} matches no layer (ONNX node, TFLite tensor or short name)"
                             + (f"; closest: {', '.join(close)}" if close else ""))
        chosen |= hits
    return chosen


def _names(layer: dict) -> list[str]:
    return [layer["name"], layer["short_name"], *layer.get("onnx_nodes", [])]


def layer_summary(layer: dict) -> dict:
    """How tune.json and the report name a layer: TFLite and ONNX names side by side."""
    return {key: layer.get(key) for key in ("index", "name", "short_name", "op_type", "onnx_nodes", "onnx_ops", "unit")}


def _load_analysis(compiled: CompiledModel, metric: str | None = None) -> dict:
    path = compiled.folder / ANALYSIS_JSON
    if not path.is_file():
        raise InputError(f"no {ANALYSIS_JSON} in {compiled.folder}; run 'quantune-edge analyze {compiled.folder} --calib DATA' first")
    try:
        data = json.loads(path.read_text())
        layers, order, used = data["layers"], data["sensitivity_order"], data["metric"]
        sha = data["model"]["sha256"]
        if metric is not None and metric != used:
            if metric not in data["scores"]:
                raise InputError(f"--metric {metric!r} is not in {path} (it has {', '.join(data['scores'])}); re-run analyze")
            order = sensitivity.order_by_score([layer["index"] for layer in layers], data["scores"][metric])
            used = metric
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a quantune-edge analysis ({exc})") from None
    if sha != compiled.report.model["sha256"]:
        raise InputError(f"{path} was made for another model (sha256 {sha[:12]}…, compile has {compiled.report.model['sha256'][:12]}…); re-run analyze")
    return {"layers": layers, "order": order, "metric": used, "weights": data["model"].get("weights"),
            "predicted_gain": predicted_gain(data)}


def predicted_gain(analysis: dict) -> dict[int, float | None] | None:
    """Layer index -> its output share in an analysis (as a dict): the analysis's signed first-order
    estimate of what keeping the layer float does to the logit error; None when it has none."""
    share = analysis["scores"].get("output_share")
    return None if share is None else {layer["index"]: g for layer, g in zip(analysis["layers"], share)}


class Evaluator:
    """Builds and runs one candidate float set; keeps every evaluation."""

    def __init__(self, compiled: CompiledModel, names: dict[int, str], inputs: np.ndarray, float_values: list[np.ndarray],
                 labels: np.ndarray, threads: int, work: Path, quiet: bool) -> None:
        self.compiled, self.names, self.inputs, self.float_out = compiled, names, inputs, float_values[0]
        self.labels, self.threads, self.work, self.quiet = labels, threads, work, quiet
        self.labelled = labelled_count(labels) > 0 or not compiled.task.needs_labels
        self.builds = 0
        # per image, for the paired comparison with float32; None for a task judged over the whole set (mAP)
        self.correct: dict[frozenset[int], np.ndarray | None] = {}
        self.float_correct = self.image_correct(float_values)

    @property
    def per_image(self) -> bool:
        """Whether the task judges image by image (top-1) rather than over the whole set (mAP)."""
        return not self.compiled.task.reads_all_outputs

    def image_correct(self, values: list[np.ndarray]) -> np.ndarray | None:
        """Per image: right by the task (labelled), or deciding as float32 does (unlabelled)."""
        if not self.per_image:
            return None
        if self.labelled:
            return self.compiled.task.correct(values[0], self.labels)
        return self.compiled.task.agreement(values[0], self.float_out)

    def accuracy(self, values: list[np.ndarray], correct: np.ndarray | None) -> float:
        """The task's judge: the per-image rate, or the metric over the set (a detector's mAP)."""
        if correct is not None:
            return float(correct.mean()) if correct.size else 0.0
        value = self.compiled.task.metric(self.compiled.judged_outputs(values), self.labels)
        return 0.0 if value is None else value

    def model_bytes(self, float_set: frozenset[int]) -> bytes:
        with captured_native_output(self.quiet):
            return self.compiled.mixed([self.names[i] for i in sorted(float_set)])

    def evaluate(self, float_set: frozenset[int]) -> tuple[dict, Path]:
        path = self.work / f"candidate_{self.builds}.tflite"
        path.write_bytes(self.model_bytes(float_set))
        self.builds += 1
        with captured_native_output(self.quiet):
            values = TfliteRunner(path, self.threads).run_all(self.inputs)
        cmp = compare(self.compiled.task, self.float_out, values[0])
        correct = self.correct[float_set] = self.image_correct(values)
        accuracy = self.accuracy(values, correct)
        graph = tflite_graph.read(path)
        result = {
            "float_layers": sorted(float_set),
            "top1": accuracy if self.labelled else None,
            "top1_agreement": cmp.get("top1_agreement"),
            "output_sqnr_db": cmp["sqnr_db"],
            "quantize_ops": graph.count("QUANTIZE") + graph.count("DEQUANTIZE"),
            "size_bytes": path.stat().st_size,
        }
        result["accuracy"] = accuracy  # the task's judge: per image averaged, or over the set
        return result, path


def _float_op_names(path: Path) -> set[str]:
    """Keys of the ops computing in float (float32 output, not a DEQUANTIZE)."""
    g = tflite_graph.read(path)
    return {tensor_key(g.tensors[op.outputs[0]].name) for op in g.ops
            if op.type not in ("QUANTIZE", "DEQUANTIZE") and g.tensors[op.outputs[0]].dtype == "float32"}


def check_budget(max_drop: float | None, max_latency_ratio: float | None, float_layers: int | None = None,
                 min_sqnr: float | None = None) -> None:
    """Refuse a budget that means nothing before any work: a search run for it would only replace a
    good result with an all-float model."""
    if sum(b is not None for b in (max_drop, max_latency_ratio, float_layers, min_sqnr)) > 1:
        raise InputError("give one of --max-drop, --min-sqnr, --max-latency-ratio, --float-layers")
    if min_sqnr is not None and not math.isfinite(min_sqnr):
        raise InputError(f"--min-sqnr must be a finite number of dB, got {min_sqnr}")
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise InputError(f"--max-drop must be a finite number of points, 0 or more, got {max_drop}")
    if max_latency_ratio is not None and not (math.isfinite(max_latency_ratio) and max_latency_ratio > 0):
        raise InputError(f"--max-latency-ratio must be a finite ratio above 0, got {max_latency_ratio}")
    if float_layers is not None and float_layers < 0:
        raise InputError(f"--float-layers must be 0 or more, got {float_layers}")


def tune(compile_dir: str | Path, eval_data: str | Path, options: TuneOptions | None = None,
         reporter: Reporter | None = None) -> TuneReport:
    """Choose the float layers, write model_mixed.tflite and tune.json; raises BudgetError when the
    budget cannot be met (after writing the best model found) unless ``best_effort``."""
    options = options or TuneOptions()
    reporter = reporter or Reporter(quiet=True)
    _check_options(options)
    compiled = CompiledModel.open(compile_dir)
    options.max_drop = budget_for_the_task(compiled.task, options.max_drop, options.min_sqnr, options.max_latency_ratio,
                                           options.float_layers)
    analysis = _load_analysis(compiled, options.metric)
    fg, qg, match = compiled.float_graph, compiled.int8_graph, compiled.layer_match
    if [l.name for l in match.layers] != [l["name"] for l in analysis["layers"]]:
        raise InputError(f"{ANALYSIS_JSON} in {compiled.folder} does not match this compile's layers; re-run analyze")
    n = len(match.layers)
    forced, pinned, order = _fixed_and_free(analysis, options)
    free = len(order)  # k counts the layers neither --keep-float nor --keep-int8 fixed
    names = {l.index: l.name for l in match.layers}

    samples = compiled.load_samples(eval_data, options.num_eval, options.seed, options.preprocessing, what="evaluation")
    inputs = compiled.tflite_inputs(samples)
    judge = compiled.task
    with captured_native_output(not options.verbose):
        float_values = TfliteRunner(compiled.float_model, options.threads).run_all(inputs)
    labels, against = reference_labels(judge, samples, lambda: compiled.judged_outputs(float_values))
    labelled = labels is not None
    if not labelled and judge.agreement_key is None:
        raise InputError(f"{samples.source} has no labels for the {judge.name} task; tune needs labelled images to judge it")
    if not labelled:
        reporter.warn(f"{samples.source} has no labels.csv: accuracy = {judge.metric_name} agreement with the float32 model")
        labels = samples.labels
    elif against == FLOAT32_FOR_LABELS:
        reporter.warn(f"{samples.source} has no labels: {judge.metric_name} is measured against the float32 model's own outputs")
    from quantune_edge.tune.costs import HOST_LATENCY_JSON, host_latencies  # imports paramiko: only when tuning

    host = host_latencies(compiled, inputs[0], options.threads, options.latency_runs, remeasure=options.remeasure,
                          quiet=not options.verbose)
    float_ms, int8_ms = host["float32_ms"], host["int8_ms"]
    if host["reused"]:
        reporter.info(f"host latencies from {HOST_LATENCY_JSON} ({host['created']}): float32 {float_ms:.2f} ms, int8 {int8_ms:.2f} ms; "
                      "--remeasure to measure again")
    float_acc = judge.metric(compiled.judged_outputs(float_values), labels) if labelled else 1.0

    lg = selection.LayerGraph.build(qg, match.layers, float_units(match, qg), requantizations(match, qg))
    alone = selection.AloneTimes.from_dict(host["alone_ms"])
    cost, source = _cost_model(compiled, lg, names, float_ms, int8_ms, alone, options, reporter)
    rerank = options.rerank if options.rerank is not None else DEFAULT_RERANK if analysis["metric"] == "output_share" else 0
    rounds = min(rerank, free if options.float_layers is None else max(options.float_layers - 1, 0))
    reranks = rounds > 0 or (rerank > 0 and bool(forced))  # with --keep-float, one analysis before the first pick

    def prefixes(ranking: list[int]) -> list[frozenset[int]]:
        return selection.prefix_choices(ranking, lg, cost if options.fusion_aware else None, always=forced, never=pinned,
                                        predicted_gain=analysis["predicted_gain"])

    start = time.perf_counter()
    with temp_folder("tune") as tmp, reporter.progress() as progress, contextlib.ExitStack() as stack:
        ev = Evaluator(compiled, names, inputs, float_values, labels, options.threads, Path(tmp), not options.verbose)
        choices = _Candidates(order, prefixes, lambda: _rerank(compiled, order, forced, names, inputs[:RERANK_SAMPLES], rounds,
                                                               options, reporter, progress) if reranks else None)
        task = progress.add_task("evaluating candidates", total=None)
        timer = None  # on the --latency-source target; it connects at its first timing
        if options.latency_source is not None:
            from quantune_edge.tune.costs import DeviceTimer

            timer = stack.enter_context(DeviceTimer(options.latency_source, log=reporter.info))
        search = _Search(compiled, ev, choices, lg, cost, float_acc, inputs[0], options, timer, lambda: progress.advance(task),
                         analysis["predicted_gain"])
        results, paths, evaluate, latency = search.results, search.paths, search.evaluate, search.latency
        if options.float_layers is not None:
            chosen_k, met, mode = search.fixed_count()
        elif options.max_drop is not None or options.min_sqnr is not None:
            chosen_k, met, mode = search.accuracy_budget(free)
        else:
            chosen_k, met, mode = search.latency_budget(free)

        chosen = latency(chosen_k)
        mixed_correct = ev.correct[choices[chosen_k]]
        if mixed_correct is not None and ev.float_correct is not None:
            vs = paired_top1(mixed_correct, ev.float_correct)
            chosen["vs_float32"] = {"images_won": vs["wins"], "images_lost": vs["losses"], "p_value": vs["p_value"],
                                    "drop_points_ci95": sorted(0.0 - 100 * d for d in vs["difference_ci95"])}  # 0.0 - x, not -x: never "-0.0"
        if options.latency_source is not None:
            latency(chosen_k, "device_latency")
        float_ops = _float_op_names(paths[chosen_k])
        wanted = {tensor_key(fg.tensors[match.layers[i].float_output].name) for i in choices[chosen_k]}
        if float_ops != wanted:
            raise QuantuneError(f"the emitted model computes {sorted(float_ops - wanted)[:3]} in float beyond the choice "
                                f"or misses {sorted(wanted - float_ops)[:3]}; not written")
        searched = ev.builds  # the budget's evaluations; the Pareto sweep's are counted apart
        pareto = _pareto(free, choices, evaluate, latency, results) if options.pareto else None
        device_pareto = (_pareto_on_device(pareto, paths, chosen_k, compiled, timer, options.latency_source.name)
                         if pareto and timer is not None else None)
        # Written after everything that can fail (the sweep too), right before tune.json: a failed or
        # interrupted tune leaves the previous model_mixed.tflite and tune.json as they were, together.
        # A missed budget is not a result to replace them with: its best choice goes beside them.
        accepted = met or options.best_effort
        names_out = TuneFiles.accepted() if accepted else TuneFiles.best_found()
        out_path = compiled.folder / names_out.model
        write_atomic(out_path, paths[chosen_k].read_bytes())
        progress.update(task, total=len(results), completed=len(results))

    layer_by_index = {l["index"]: l for l in analysis["layers"]}
    report = TuneReport(
        budget={**mode, "met": met, "keep_float": options.keep_float, "keep_int8": options.keep_int8, "fusion_aware": options.fusion_aware,
                "ranking_metric": analysis["metric"], "latency_source": source},
        reference={"float32_accuracy": float_acc, "accuracy_is": judge.metric_name if labelled else f"{judge.metric_name} agreement with float32",
                   "eval_samples": len(samples), "eval_source": samples.source, "judged_against": against if labelled else FLOAT32_FOR_LABELS,
                   "float32_latency_ms": float_ms, "int8_latency_ms": int8_ms,
                   "host_latency": {"file": HOST_LATENCY_JSON, "reused": host["reused"], "measured": host["created"]},
                   "int8": {k: v for k, v in results.get(0, {}).items() if k != "float_layers"} or None,
                   "threads": options.threads, **({"device_pareto": device_pareto} if device_pareto else {})},
        chosen={**chosen, "layers": [layer_summary(layer_by_index[i]) for i in sorted(choices[chosen_k])],
                "share_of_layers_float": len(choices[chosen_k]) / n},
        evaluations=[results[k] for k in sorted(results)],
        search={"evaluations": searched, "pareto_evaluations": ev.builds - searched,
                "bound": selection.max_evaluations(free, search.guess["k"] if search.guess else None), "first_guess": search.guess,
                "layers": n, "order": choices.order,
                "analysis_order": analysis["order"], "rerank": choices.rerank,
                "wall_time_s": round(time.perf_counter() - start, 2)},
        files={"model": str(out_path), "size_bytes": out_path.stat().st_size},
        pareto=pareto,
    )
    _save(report, compiled.folder, names_out)
    if not accepted:
        kept = "were left as they were" if (compiled.folder / MIXED_MODEL).exists() else "were not written"
        where = (f"even with no {'free ' if free < n else ''}layer float" if options.max_latency_ratio is not None
                 else f"even with all {free} {'free ' if free < n else ''}layers float")
        raise BudgetError(f"budget not met {where} (best: {_describe(chosen, judge.metric_name)}); the best found is in {out_path.name} and "
                          f"{names_out.report} beside {MIXED_MODEL} and {TUNE_JSON}, which {kept}; "
                          "use --best-effort to accept it")
    return report


class _Search:
    """The candidates evaluated so far (by k) and their model files, how each is timed, and the three
    ways to choose k: a fixed count, an accuracy budget (bisection), a latency budget (bisection over
    measured ratios, on the host or on the --latency-source target)."""

    def __init__(self, compiled: CompiledModel, ev: Evaluator, choices: _Candidates, lg: selection.LayerGraph,
                 cost: selection.CostModel, float_acc: float, sample: np.ndarray, options: TuneOptions, timer, advance: Callable[[], None],
                 predicted_gain: dict[int, float | None] | None = None):
        self.compiled, self.ev, self.choices, self.lg, self.cost = compiled, ev, choices, lg, cost
        self.float_acc, self.sample, self.options, self.timer, self.advance = float_acc, sample, options, timer, advance
        self.results: dict[int, dict] = {}
        self.paths: dict[int, Path] = {}
        self.predicted_gain = predicted_gain
        self.guess: dict | None = None  # the k tried first (first_guess), when there was one
        self.by_set: dict[frozenset[int], int] = {}
        # where --max-latency-ratio is measured
        self.budget_on = "latency" if options.latency_source is None else "device_latency"

    def evaluate(self, k: int) -> dict:
        results, paths, choices = self.results, self.paths, self.choices
        if k in results:
            return results[k]
        if choices[k] in self.by_set:  # grown regions can coincide: evaluate each float set once
            same = self.by_set[choices[k]]
            paths[k] = paths[same]
            results[k] = {**results[same], "k": k}
            return results[k]
        result, paths[k] = self.ev.evaluate(choices[k])
        result.update(k=k, drop_points=self.compiled.task.points_per_unit * (self.float_acc - result["accuracy"]),
                      boundaries=selection.boundaries(self.lg, choices[k]),
                      estimated_latency_ms=self.cost.latency_ms(self.lg, choices[k]))
        results[k], self.by_set[choices[k]] = result, k
        self.advance()
        return result

    def latency(self, k: int, on: str = "latency") -> dict:
        """Paired p50 of candidate k and full int8: ``latency_*`` on the host, ``device_latency_*`` on
        the --latency-source target."""
        options, result = self.options, self.results[k]
        if f"{on}_ms" in result:
            return result

        def once() -> tuple[float, float]:
            if on == "device_latency":
                mixed, int8 = self.timer.p50_ms([self.paths[k], self.compiled.int8_model])
                return mixed, int8
            with captured_native_output(not options.verbose):
                return paired_latency_ms(self.paths[k], self.compiled.int8_model, self.sample, options.threads,
                                         runs=max(1, options.latency_runs // 5))

        pairs = [once()]
        limit = options.max_latency_ratio if on == self.budget_on else None
        if limit is not None and abs(pairs[0][0] / pairs[0][1] / limit - 1) < REMEASURE_MARGIN:
            pairs += [once(), once()]
        mixed, int8 = median_ratio(pairs)
        result.update({f"{on}_ms": mixed, f"{on}_ratio": mixed / int8, f"{on}_measurements": len(pairs)})
        return result

    def fixed_count(self) -> tuple[int, bool, dict]:
        k = self.options.float_layers
        assert k is not None
        self.evaluate(k)
        return k, True, {"float_layers": k}

    def first_guess(self, free: int) -> int | None:
        """The smallest k whose float set holds PREDICTED_SHARE of the positive output shares, when a
        few picks do (at most ⌈log2 n⌉): where the analysis says the error sits in a few places (a
        detector's head requantizations), the search starts there instead of at all-float
        (``selection.bisect_smallest``). None without output shares, or when they are spread out."""
        gains = self.predicted_gain
        if not gains:
            return None
        total = sum(max(g or 0.0, 0.0) for g in gains.values())
        if total <= 0:
            return None
        for k in range(1, min(free - 1, selection.max_evaluations(free) - 2) + 1):
            held = sum(max(gains.get(i) or 0.0, 0.0) for i in self.choices[k]) / total
            if held >= PREDICTED_SHARE:
                self.guess = {"k": k, "predicted_share": round(held, 3)}
                return k
        return None

    def accuracy_budget(self, free: int) -> tuple[int, bool, dict]:
        options, results, paths = self.options, self.results, self.paths
        max_drop, min_sqnr = options.max_drop, options.min_sqnr

        def meets(r: dict) -> bool:
            if min_sqnr is not None:
                return r["accuracy"] >= min_sqnr
            assert max_drop is not None
            return r["drop_points"] <= max_drop + 1e-9

        found = selection.bisect_smallest(free, self.evaluate, meets, lambda r: r["accuracy"], lambda: self.first_guess(free))
        chosen_k, met = found.best_k, found.k is not None
        if met and options.latency_source is not None:
            # Among the evaluated choices that meet the budget, the fastest on that device, timed
            # there side by side (one model file per float set) rather than trusted to the estimate.
            ok = sorted(k for k, r in results.items() if meets(r))
            int8_model = self.compiled.int8_model
            if len({paths[k] for k in ok}) > 1:
                ms = self.timer.p50_by_model([*(paths[k] for k in ok), int8_model])
                for k in ok:
                    results[k].update(device_latency_ms=ms[paths[k]], device_latency_ratio=ms[paths[k]] / ms[int8_model],
                                      device_latency_measurements=1)
            chosen_k = min(ok, key=lambda k: (results[k].get("device_latency_ratio", 0.0), k))
        return chosen_k, met, {"min_sqnr_db": min_sqnr} if min_sqnr is not None else {"max_drop_points": max_drop}

    def latency_budget(self, free: int) -> tuple[int, bool, dict]:
        limit = self.options.max_latency_ratio
        assert limit is not None

        def measured(k: int) -> dict:
            self.evaluate(k)
            return self.latency(k, self.budget_on)

        # The most float layers within the latency budget = the smallest k that breaks it, minus one.
        ratio = f"{self.budget_on}_ratio"
        over = selection.bisect_smallest(free, measured, lambda r: r[ratio] > limit, lambda r: -r[ratio])
        chosen_k = free if over.k is None else max(over.k - 1, 0)
        if chosen_k not in self.results:
            measured(chosen_k)
        return chosen_k, over.k != 0, {"max_latency_ratio": limit}


def _check_options(options: TuneOptions) -> None:
    """Everything about the options that can be refused before any work (and the default budget)."""
    check_budget(options.max_drop, options.max_latency_ratio, options.float_layers, options.min_sqnr)
    if options.num_eval <= 0:
        raise InputError(f"--num-eval must be positive, got {options.num_eval}")
    if options.rerank is not None and options.rerank < 0:
        raise InputError(f"--rerank must be 0 or more, got {options.rerank}")


def budget_for_the_task(task: Task, max_drop: float | None, min_sqnr: float | None, max_latency_ratio: float | None = None,
                        float_layers: int | None = None) -> float | None:
    """The --max-drop to tune with, or a one-line refusal of a budget that does not fit the task: the
    fidelity task has no drop from a perfect float32 (its SQNR is infinite), its budget is --min-sqnr;
    every other task's default budget is --max-drop 1."""
    given = any(b is not None for b in (max_drop, max_latency_ratio, float_layers, min_sqnr))
    if task.judged_against_float32 and max_drop is not None:
        raise InputError("the fidelity task's accuracy budget is --min-sqnr DB (float32 is its own reference, with no drop to measure)")
    if min_sqnr is not None and not task.judged_against_float32:
        raise InputError(f"--min-sqnr is the fidelity task's budget; this compile's task is {task.name} (use --max-drop)")
    if not given:
        if task.judged_against_float32:
            raise InputError("the fidelity task needs a budget: --min-sqnr DB, --max-latency-ratio or --float-layers")
        return 1.0
    return max_drop


def _fixed_and_free(analysis: dict, options: TuneOptions) -> tuple[set[int], set[int], list[int]]:
    """The layers --keep-float and --keep-int8 fix, and the rest in the analysis's order (what k counts)."""
    layers = analysis["layers"]
    forced = resolve_layer_names(options.keep_float, layers)
    pinned = resolve_layer_names(options.keep_int8, layers, "--keep-int8")
    if forced & pinned:
        both = ", ".join(layers[i]["short_name"] for i in sorted(forced & pinned))
        raise InputError(f"--keep-float and --keep-int8 both name layer(s) {both}")
    order = [i for i in analysis["order"] if i not in forced | pinned]
    free, n = len(order), len(layers)
    if options.float_layers is not None and not 0 <= options.float_layers <= free:
        raise InputError(f"--float-layers must be between 0 and {free}" + (" (the layers --keep-float/--keep-int8 leave free)" if free < n else "")
                         + f", got {options.float_layers}")
    return forced, pinned, order


def _cost_model(compiled: CompiledModel, lg: selection.LayerGraph, names: dict[int, str], float_ms: float, int8_ms: float,
                alone: selection.AloneTimes, options: TuneOptions, reporter: Reporter) -> tuple[selection.CostModel, dict]:
    """What a float layer costs: from this host's float32/int8 latencies and its ops timed alone, or
    measured on --latency-source (three whole models there, priced by MACs)."""
    cost = selection.CostModel.from_measurements(lg, int8_ms, float_ms, alone)
    if options.latency_source is None:
        return cost, {"kind": "host", "cost_model": cost.record()}
    from quantune_edge.tune.costs import device_cost_model

    with temp_folder("costs") as tmp:
        cost, record = device_cost_model(compiled, lg, names, options.latency_source, Path(tmp), quiet=not options.verbose, log=reporter.info)
    return cost, {"kind": "device", "target": record["target"], "cost_model": cost.record(), "measured_p50_ms": record["measured_p50_ms"]}


def _save(report: TuneReport, folder: Path, files: TuneFiles) -> None:
    """tune.json (or its best-found twin) and the Pareto plot; an accepted result retires a best-found pair."""
    write_json(folder / files.report, report.to_dict())
    if report.pareto:
        from quantune_edge.tune.figures import plot_pareto

        plot_pareto(report, folder / files.pareto)
    else:  # an earlier tune's sweep describes a tune.json that is gone
        (folder / files.pareto).unlink(missing_ok=True)
    if files == TuneFiles.accepted():  # a best-found pair from an earlier missed budget is superseded by this result
        TuneFiles.best_found().remove(folder)


@dataclass(frozen=True)
class TuneFiles:
    """The files one tune writes into the compile folder: the accepted result, or the best found
    for a budget it missed (kept beside the accepted one, never over it)."""

    model: str
    report: str
    pareto: str

    @classmethod
    def accepted(cls) -> TuneFiles:
        return cls(MIXED_MODEL, TUNE_JSON, PARETO_PNG)

    @classmethod
    def best_found(cls) -> TuneFiles:
        return cls(_best(MIXED_MODEL), _best(TUNE_JSON), _best(PARETO_PNG))

    def remove(self, folder: Path) -> None:
        for name in (self.model, self.report, self.pareto):
            (folder / name).unlink(missing_ok=True)


def _best(name: str) -> str:
    """``model_mixed.tflite`` -> ``model_mixed.best-found.tflite``."""
    path = Path(name)
    return f"{path.stem}.{BEST_FOUND}{path.suffix}"


class _Candidates:
    """Float set for each k, from the analysis order, re-ranked (``rerank()``) the first time a k
    between 0 and n (exclusive) is asked for: full int8 and all-float need no order, so a budget met
    by the one or missed by the other costs no re-ranking analysis."""

    def __init__(self, order: list[int], prefixes: Callable[[list[int]], list[frozenset[int]]],
                 rerank: Callable[[], dict | None]) -> None:
        self.order, self._prefixes, self._rerank = order, prefixes, rerank
        self.rerank: dict | None = None
        self._choices: list[frozenset[int]] | None = None
        self._settled = False

    def __getitem__(self, k: int) -> frozenset[int]:
        if 0 < k < len(self.order) and not self._settled:
            self._settled = True
            self.rerank = self._rerank()
            if self.rerank is not None:
                self.order, self._choices = self.rerank.pop("order"), None
        if self._choices is None:
            self._choices = self._prefixes(self.order)
        return self._choices[k]


def _rerank(compiled: CompiledModel, order: list[int], forced: set[int], names: dict[int, str], inputs: np.ndarray,
            rounds: int, options: TuneOptions, reporter: Reporter, progress) -> dict:
    """The first ``rounds`` layers of the order picked one at a time, each the top output share in a
    fresh analysis of the mixed model with the layers picked so far float.

    The analysis's shares are measured against the full-int8 model's logit error; once some layers
    are float that error is smaller and points elsewhere, and a layer whose error cancelled part of
    theirs can become the next best (on EfficientNet-Lite0 per-tensor, block 2's depthwise conv goes
    from a negative share to the second-largest once the stem, block 0 and block 8 are float). Each
    round costs one model build and one float + one mixed pass over ``inputs`` — not an evaluation,
    and not one run per layer. After the last round the rest follow its shares. With ``forced``
    (--keep-float) layers, one analysis more comes first, so the first pick answers their residual too.
    """
    picked: list[int] = []
    rest = list(order)
    index_of = {name: i for i, name in names.items()}
    analyses = 0
    start = time.perf_counter()
    shares_of = OutputShares(compiled, options.threads, not options.verbose)
    with temp_folder("rerank") as tmp:
        task = progress.add_task(f"re-ranking: {rounds + bool(forced)} analyses of the mixed model", total=rounds + bool(forced))

        def reorder() -> bool:
            """Sort the rest by an analysis of the model with ``forced`` and the picks float."""
            nonlocal analyses
            path = Path(tmp) / f"mixed_{analyses}.tflite"
            with captured_native_output(not options.verbose):
                path.write_bytes(compiled.mixed([names[i] for i in sorted(forced | set(picked))]))
            try:
                shares = {index_of[name]: v for name, v in shares_of(path, inputs).items()}
            except AnalysisError as exc:
                reporter.warn(f"re-ranking stopped after {len(picked)} pick(s): {exc}")
                return False
            rest.sort(key=lambda i: -shares.get(i, -math.inf))
            analyses += 1
            progress.advance(task)
            return True

        # Layers kept float by --keep-float already change the residual the first pick should answer.
        if not forced or reorder():
            for _ in range(rounds):
                picked.append(rest.pop(0))
                if not reorder():
                    break
    return {"order": picked + rest, "rounds": len(picked), "analyses": analyses, "samples": len(inputs), "picked": picked,
            "wall_time_s": round(time.perf_counter() - start, 2)}


def _describe(r: dict, metric: str = "top-1") -> str:
    latency = "".join(f", {r[key]:.2f}x int8 latency{where}" for key, where in (("latency_ratio", " on the host"),
                                                                              ("device_latency_ratio", " on the device")) if key in r)
    if metric.startswith("top"):
        judged = f"accuracy {100 * r['accuracy']:.1f} %, drop {r['drop_points']:.2f} points"
    else:
        judged = f"{metric} {r['accuracy'] * (100 if metric.startswith('mAP') else 1):.4g}, drop {r['drop_points']:.4g}"
    return f"{len(r['float_layers'])} float layers, {judged}{latency}"


def _pareto_on_device(points: list[dict], paths: dict[int, Path], chosen_k: int, compiled: CompiledModel, timer, target: str) -> dict:
    """The sweep's models, the chosen one, float32 and full int8 timed side by side on the
    --latency-source device in one profile (``timer``, a :class:`device_costs.DeviceTimer`); adds
    ``device_latency_ms`` to each point."""
    ms = timer.p50_by_model([*(paths[p["k"]] for p in points), paths[chosen_k], compiled.float_model, compiled.int8_model])
    for p in points:
        p["device_latency_ms"] = ms[paths[p["k"]]]
    return {"target": target, "float32_ms": ms[compiled.float_model], "int8_ms": ms[compiled.int8_model], "chosen_ms": ms[paths[chosen_k]]}


def _pareto(n, choices, evaluate, latency, results) -> list[dict]:
    ks = list(range(n + 1)) if n <= 24 else sorted({round(x) for x in np.linspace(0, n, 17)})
    points = []
    for k in ks:
        if k not in results:
            evaluate(k)
        latency(k)
        r = results[k]
        points.append({"k": k, "float_layers": len(choices[k]), "accuracy": r["accuracy"], "latency_ms": r["latency_ms"],
                       "latency_ratio": r["latency_ratio"], "output_sqnr_db": r["output_sqnr_db"]})
    return points
