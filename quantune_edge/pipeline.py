"""``run``: ONNX model to on-device report in one call, each stage cached by the hashes of its inputs.

Stages: compile -> analyze -> tune -> bench (every target) -> device-eval (with ``eval_on_device``)
-> report. ``OUT/stages.json`` records each
stage's key (a hash of its inputs and of the previous stage's key), status and time; a stage whose
key is unchanged and whose outputs exist is skipped, so re-running with only a new budget redoes
tune, bench and report but not compile or analysis. A failing stage leaves the outputs of earlier
stages in place and is named in the error.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantune_edge.common.console import Reporter
from quantune_edge.common.inputs import is_loader, loader_file
from quantune_edge.common.outputs import RUN_FOLDER, check_output_folder, write_page
from quantune_edge.common.preprocessing import Preprocessing
from quantune_edge.common.records import jsonable, now_iso, sha256_file, write_json
from quantune_edge.compile.artifacts import COMPILE_FOLDER
from quantune_edge.deploy.targets import Target
from quantune_edge.errors import QuantuneError
from quantune_edge.tasks.base import Task

STAGES = ("compile", "analyze", "tune", "bench", "device-eval", "report")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".csv", ".npy"}


class StageError(QuantuneError):
    """One stage of ``run`` failed; the message names it."""

    def __init__(self, stage: str, cause: QuantuneError) -> None:
        super().__init__(f"stage '{stage}' failed: {cause}")
        self.stage = stage
        self.exit_code = cause.exit_code


@dataclass
class RunOptions:
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    label_offset: int = 0
    judge: Task | None = None  # what judges the model (compile's --task); None: an image classifier
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    min_sqnr: float | None = None  # the fidelity task's budget, instead of max_drop
    per_tensor: bool = False
    num_calib: int = 100
    analysis_samples: int = 32
    max_drop: float | None = None  # in the task metric's points; None: the task's default (tune's)
    max_latency_ratio: float | None = None  # instead of max_drop: timed on the first target (the host without one)
    num_eval: int = 200
    best_effort: bool = False
    pareto: bool = False
    eval_on_device: bool = False
    runs: int = 20
    warmup: int = 3
    threads: int = 2
    trust_new_host_key: bool = False
    install_runtime: bool = False
    verbose: bool = False


def data_fingerprint(source: str | Path) -> str:
    """sha256 over a data file (a loader's module and function name), or over every image (and
    labels.csv) of a folder, names included."""
    if is_loader(source):
        function = str(source).rpartition(":")[2]
        return hashlib.sha256(bytes.fromhex(sha256_file(loader_file(source))) + function.encode()).hexdigest()
    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES):
            digest.update(str(f.relative_to(path)).encode() + b"\0" + bytes.fromhex(sha256_file(f)))
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the host SDK's and the device agent's source: a stage cached by other code (say, an
    older tune) is run again, not reused."""
    digest = hashlib.sha256()
    for package in ("quantune_edge", "device_agent"):
        spec = importlib.util.find_spec(package)
        for path in sorted(Path(spec.origin).parent.rglob("*.py")) if spec and spec.origin else ():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable((code_fingerprint(), *parts)), sort_keys=True, default=str).encode()).hexdigest()


class _Stages:
    """stages.json: what ran, with which key, how it ended."""

    def __init__(self, out: Path) -> None:
        self.path = out / RUN_FOLDER.marker
        try:
            self.state: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.state = {}
        self.ran: dict[str, dict] = {}

    def cached(self, stage: str, key: str | None, outputs: list[Path]) -> bool:
        """Same key, ended well, and every output (given, or recorded by the stage) still there."""
        entry = self.state.get(stage, {})
        if key is None:
            return False
        recorded = [Path(p) for p in entry.get("outputs", [])]
        return entry.get("key") == key and entry.get("status") == "done" and all(p.exists() for p in outputs + recorded)

    def run(self, stage: str, key: str | None, outputs: Callable[[], list[Path]], work: Callable[[], Any], reporter: Reporter) -> Any:
        """The stage's result; for a cached stage, the outputs it recorded."""
        if self.cached(stage, key, outputs()):
            reporter.info(f"[dim]{stage}: cached (inputs unchanged)[/]")
            self.ran[stage] = {**self.state[stage], "cached": True}
            return self.state[stage].get("outputs")
        reporter.info(f"[bold]{stage}[/]")
        start = time.perf_counter()
        try:
            result = work()
        except QuantuneError as exc:
            self.state[stage] = {"key": key, "status": "failed", "error": str(exc), "finished": now_iso()}
            self.ran[stage] = {**self.state[stage], "cached": False}
            self.save()
            raise StageError(stage, exc) from None
        self.state[stage] = {"key": key, "status": "done", "seconds": round(time.perf_counter() - start, 2),
                             "finished": now_iso(), **({"outputs": result} if isinstance(result, list) else {})}
        self.ran[stage] = {**self.state[stage], "cached": False}
        self.save()
        return result

    def save(self) -> None:
        write_json(self.path, self.state)


def run_pipeline(model: str | Path, calib: str | Path, eval_data: str | Path, targets: list[Target], out: str | Path,
                 options: RunOptions | None = None, reporter: Reporter | None = None) -> dict:
    """Compile, analyze, tune, benchmark on every target, and write OUT/report.json + report.html."""
    from quantune_edge.analyze.analysis import AnalysisOptions, analyze
    from quantune_edge.compile import artifacts as layout
    from quantune_edge.compile.compiler import CompileOptions, compile_model
    from quantune_edge.errors import DeviceError
    from quantune_edge.measure.latency import BenchOptions, bench_with_progress
    from quantune_edge.report import run_report as report_mod
    from quantune_edge.tune.tuning import TuneOptions, tune

    options = options or RunOptions()
    reporter = reporter or Reporter(quiet=True)
    model, out = Path(model), Path(out)
    compiled = out / "compiled"
    _check_before_any_work(model, calib, eval_data, out, compiled, options)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out)
    if not stages.path.exists():  # marks the folder as a run's from the start: an interrupted first run can be resumed
        stages.save()
    o = options

    compile_key = _key("compile", sha256_file(model), data_fingerprint(calib), o.preprocessing.to_dict(), o.label_offset,
                       o.per_tensor, o.num_calib, o.judge.to_dict() if o.judge else None, o.input_shapes)
    stages.run("compile", compile_key, lambda: [compiled / layout.REPORT, compiled / layout.INT8_MODEL],
               lambda: compile_model(model, calib, compiled, CompileOptions(
                   preprocessing=o.preprocessing, num_calib=o.num_calib, per_channel=not o.per_tensor,
                   label_offset=o.label_offset, force=True, verbose=o.verbose, threads=o.threads, judge=o.judge,
                   input_shapes=o.input_shapes), reporter), reporter)

    analyze_key = _key("analyze", compile_key, o.analysis_samples)
    stages.run("analyze", analyze_key, lambda: [compiled / layout.ANALYSIS_JSON],
               lambda: analyze(compiled, calib, AnalysisOptions(num_samples=o.analysis_samples, threads=o.threads,
                                                                  verbose=o.verbose), reporter), reporter)

    eval_fingerprint = data_fingerprint(eval_data)
    timed_on = targets[0] if o.max_latency_ratio is not None and targets else None
    tune_key = _key("tune", analyze_key, eval_fingerprint, o.max_drop, o.max_latency_ratio, timed_on.to_dict() if timed_on else None,
                    o.num_eval, o.best_effort, o.pareto, o.min_sqnr)
    stages.run("tune", tune_key, lambda: [compiled / layout.TUNE_JSON, compiled / layout.MIXED_MODEL],
               lambda: tune(compiled, eval_data, TuneOptions(
                   max_drop=_drop_budget(o), max_latency_ratio=o.max_latency_ratio, min_sqnr=o.min_sqnr,
                   latency_source=timed_on, num_eval=o.num_eval, threads=o.threads, best_effort=o.best_effort, pareto=o.pareto,
                   verbose=o.verbose), reporter), reporter)

    models = [compiled / name for name in (layout.FLOAT_MODEL, layout.INT8_MODEL, layout.MIXED_MODEL)]
    bench_key = _key("bench", tune_key, [t.to_dict() for t in targets], o.runs, o.warmup)

    def do_bench() -> list[str]:
        outcomes = bench_with_progress(models, targets, BenchOptions(warmup=o.warmup, runs=o.runs, results_dir=out / "results",
                                                                     trust_new_host_key=o.trust_new_host_key,
                                                                     install_runtime=o.install_runtime), reporter)
        failed = [x for x in outcomes if not x.ok]
        if failed:
            raise DeviceError("; ".join(f"{x.target}: {x.error}" for x in failed))
        return [p for x in outcomes for p in x.reports]

    reports = stages.run("bench", bench_key, lambda: [], do_bench, reporter) if targets else []

    device_eval = out / "device_eval.json"
    if o.eval_on_device and targets:
        from quantune_edge.compile.artifacts import CompiledModel
        from quantune_edge.measure.accuracy import evaluate_on_device

        def do_device_eval() -> list[str]:
            result = evaluate_on_device(CompiledModel.open(compiled), models, eval_data, o.num_eval, TuneOptions.seed,
                                        targets, o.threads, reporter.info)
            write_json(device_eval, result)
            return [str(device_eval)]

        stages.run("device-eval", _key("device-eval", bench_key, eval_fingerprint, o.num_eval),
                   lambda: [device_eval], do_device_eval, reporter)

    report: dict = {}

    def do_report() -> list[str]:
        report.update(report_mod.build(out, compiled, [Path(p) for p in reports], stages.ran,
                                       json.loads(device_eval.read_text()) if o.eval_on_device and device_eval.is_file() else None))
        write_page(out / "report.html", report_mod.render(report, compiled))
        return [str(out / "report.html")]

    stages.run("report", None, lambda: [], do_report, reporter)
    report["stages"] = stages.ran  # now including the report stage itself
    write_json(out / "report.json", report)
    return report


def _drop_budget(options: RunOptions) -> float | None:
    """The accuracy budget in the task metric's points, unless another budget was given."""
    return options.max_drop if options.max_latency_ratio is None and options.min_sqnr is None else None


def _check_before_any_work(model: Path, calib: str | Path, eval_data: str | Path, out: Path, compiled: Path, options: RunOptions) -> None:
    """Inputs that exist, a budget that means something, and outputs that may be written: a run that
    would fail on them fails before compiling anything."""
    from quantune_edge.errors import InputError
    from quantune_edge.tasks import make_task
    from quantune_edge.tune.tuning import budget_for_the_task, check_budget

    if not model.is_file():
        raise InputError(f"{model}: no such ONNX model")
    for what, src in (("calibration", calib), ("evaluation", eval_data)):
        if not (loader_file(src).is_file() if is_loader(src) else Path(src).exists()):
            raise InputError(f"{what} data not found: {src}")
    check_budget(_drop_budget(options), options.max_latency_ratio, min_sqnr=options.min_sqnr)
    budget_for_the_task(options.judge or make_task("classify", label_offset=options.label_offset), _drop_budget(options), options.min_sqnr,
                        options.max_latency_ratio)  # tune's own refusal, said before anything is compiled
    inputs = {"the ONNX model": model, "the --calib data": calib, "the --eval data": eval_data}
    check_output_folder(out, RUN_FOLDER, "--out", inputs)
    check_output_folder(compiled, COMPILE_FOLDER, "--out", inputs)
