"""``bench``: deploy models to one or more targets (in parallel) and keep the agent's reports.

Each target works in its own thread with its own connection; one target failing never stops the
others, and its outcome says why. Every report is saved as
``RESULTS/<target>/<model sha256[:12]>/<timestamp>.json`` (the agent's JSON plus what the host knows:
target facts, local path, model label, deploy and round-trip times).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantune_edge.common.console import Reporter
from quantune_edge.common.outputs import RESULTS_FOLDER, check_output_folder, refuse_inputs
from quantune_edge.common.records import write_json
from quantune_edge.deploy.device import check_model_file, open_device
from quantune_edge.deploy.targets import Target
from quantune_edge.deploy.transport import resolve
from quantune_edge.errors import InputError, QuantuneError
from quantune_edge.measure.saved import load_reports

Status = Callable[[str, str, int], None]


@dataclass
class BenchOptions:
    warmup: int = 10
    runs: int = 100
    threads: int | None = None
    xnnpack: bool = True
    install_runtime: bool = False
    trust_new_host_key: bool = False
    results_dir: Path = Path("results")


@dataclass
class TargetOutcome:
    target: str
    ok: bool
    reports: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def model_label(path: str | Path) -> str:
    """What a model is, from its file name: ``model_int8.tflite`` -> ``int8``."""
    stem = Path(path).stem
    return stem[len("model_"):] if stem.startswith("model_") else stem


def check_results_folder(results_dir: Path, models: list[Path]) -> None:
    """Bench adds reports to a results folder and never removes one, but it writes only into a new,
    empty or earlier results folder (one made before the marker existed is known by its reports),
    never into a folder of the user's other files or the models' own."""
    inputs = {f"the model {m.name}": m for m in models}
    if results_dir.is_dir() and not (results_dir / RESULTS_FOLDER.marker).is_file() and load_reports(results_dir):
        refuse_inputs(results_dir, "--results", inputs)
    else:
        check_output_folder(results_dir, RESULTS_FOLDER, "--results", inputs)


def save_report(results_dir: Path, report: dict) -> Path:
    """One file per run, written atomically; the results folder is made (and marked) by the first."""
    folder = results_dir / report["target"]["name"] / report["model"]["sha256"][:12]
    folder.mkdir(parents=True, exist_ok=True)
    (results_dir / RESULTS_FOLDER.marker).touch()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 1_000_000:06d}"
    path = folder / f"{stamp}.json"
    write_json(path, report)
    return path


def _bench_target(target: Target, models: list[Path], options: BenchOptions, status: Status,
                  log: Callable[[str], None]) -> TargetOutcome:
    start = time.monotonic()
    outcome = TargetOutcome(target.name, ok=False)
    status(target.name, "connecting", 0)
    try:
        device = open_device(target, trust_new_host_key=options.trust_new_host_key,
                             install_runtime=options.install_runtime, log=log)
    except QuantuneError as exc:
        outcome.error, outcome.seconds = str(exc), time.monotonic() - start
        status(target.name, "[red]failed[/]", 0)
        return outcome
    try:
        for done, model in enumerate(models):
            status(target.name, f"deploying {model.name}", done)
            deployment = device.deploy(model, by_content=True)
            status(target.name, f"benchmarking {model.name}", done)
            args = ["bench", deployment.remote_path, "--warmup", str(options.warmup), "--runs", str(options.runs),
                    "--threads", str(options.threads or target.threads)]
            if not options.xnnpack:
                args.append("--no-xnnpack")
            t0 = time.monotonic()
            report = device.agent(args)
            if options.xnnpack and report.get("kernels", "xnnpack") != "xnnpack":
                log(f"{target.name}: {model.name} runs on the device's {report['kernels']}")
            report["host"] = {"local_path": str(model), "label": model_label(model), "deploy": deployment.to_dict(),
                              "agent_roundtrip_s": time.monotonic() - t0}
            report["target"] = {"name": target.name, "address": target.address, "emulated": target.emulated,
                                "description": target.description}
            outcome.reports.append(str(save_report(options.results_dir, report)))
        outcome.ok = True
        status(target.name, "[green]done[/]", len(models))
    except QuantuneError as exc:
        outcome.error = str(exc)
        status(target.name, "[red]failed[/]", len(outcome.reports))
    finally:
        device.conn.close()
        outcome.seconds = time.monotonic() - start
    return outcome


def bench(models: list[str | Path], targets: list[Target], options: BenchOptions | None = None,
          status: Status = lambda _t, _s, _n: None, log: Callable[[str], None] = lambda _m: None) -> list[TargetOutcome]:
    """Benchmark every model on every target: targets on different machines in parallel, targets
    that share one (:func:`machine_of`) and the models of a target one after another."""
    options = options or BenchOptions()
    paths = [Path(m) for m in models]
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path}: no such model file")
        if path.suffix != ".tflite":
            raise InputError(f"{path}: not a .tflite model")
    if not targets:
        raise InputError("no target given")
    if options.runs < 1 or options.warmup < 0:
        raise InputError("--runs must be >= 1 and --warmup >= 0")
    check_results_folder(options.results_dir, paths)
    for path in paths:  # a file the device could not load is refused here, before any connection
        check_model_file(path)
    lock = threading.Lock()

    def locked_status(name: str, text: str, done: int) -> None:
        with lock:
            status(name, text, done)

    def one_machine(group: list[int]) -> list[tuple[int, TargetOutcome]]:
        return [(i, _bench_target(targets[i], paths, options, locked_status, log)) for i in group]

    groups: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(machine_of(t), []).append(i)
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        outcomes = dict(o for f in [pool.submit(one_machine, g) for g in groups.values()] for o in f.result())
    return [outcomes[i] for i in range(len(targets))]


LOCAL_HOSTS = ("localhost", "::1", "0.0.0.0")


def machine_of(target: Target) -> str:
    """The machine a target's timings are taken on. Targets on one machine (this host: loopback
    and emulated ones; or one address behind several ports) are benchmarked one after another, as
    timing them at once makes each slower: a loopback target read 3x its own float32 latency
    beside an emulated board's bench."""
    try:
        target = resolve(target)
    except QuantuneError:  # an unreadable ssh config: connecting will say so
        pass
    host = (target.host or target.ssh_config_host or "").lower()
    return "this host" if target.emulated or host in LOCAL_HOSTS or host.startswith("127.") else host


def bench_with_progress(models: list[str | Path], targets: list[Target], options: BenchOptions,
                        reporter: Reporter) -> list[TargetOutcome]:
    """bench() with one progress line per target."""
    with reporter.progress() as progress:
        tasks = {t.name: progress.add_task(f"{t.name}: queued", total=len(models)) for t in targets}

        def status(name: str, text: str, done: int) -> None:
            progress.update(tasks[name], description=f"{name}: {text}", completed=done)

        return bench(models, targets, options, status=status, log=reporter.info)
